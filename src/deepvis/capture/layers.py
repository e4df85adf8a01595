"""The layer table: every module whose output is a tensor, in execution order, with its layout.

Viewable layers (maps, channels-last maps, tokens, vectors; see :mod:`.layouts`) are listed with their
canonical per-example shape (C, H, W) or (C,); ``layer_table(..., everything=True)`` adds the others
with the reason they are not viewable.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import LayerError, UnitError
from ..models.cache import CacheSlot
from ..models.model import Model, module_dtype
from ..runtime import item_bytes
from .attention import exposed_attention, weights_owner
from .layouts import GUESSED, Layout, detect_layout, says_nhwc, token_geometry
from .state import eval_mode
from .units import LOGITS, Unit, split_token_layer

__all__ = [
    "LayerInfo",
    "layer_table",
    "get_layer",
    "token_layer_info",
    "resolve_module",
    "check_unit",
    "module_device",
    "activation_bytes",
    "output_problem",
    "not_one_tensor",
    "LAYER_TABLES",
    "FULL_LAYER_TABLES",
]


def module_device(module: nn.Module, default: torch.device | None = None) -> torch.device:
    """The device of the module's first parameter or buffer (``default``, else the CPU, when it has none)."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        return t.device
    return default if default is not None else torch.device("cpu")


@dataclass(frozen=True)
class LayerInfo:
    """A capturable layer.

    ``name`` is the module path (``logits`` for the model's output), ``shape`` the canonical output
    shape of one example — (C, H, W) for maps, channels-last maps and the patch grid of token layers,
    (C,) for vectors; the raw shape for layers that are not viewable — at the model's input size,
    ``raw_shape`` the output shape as the module produces it (without N), ``layout`` how it is read
    (:class:`~deepvis.capture.layouts.Layout`: its ``kind``, prefix tokens, grid, reason), ``calls`` how many
    times the module runs in one forward pass (deepvis captures the last call), ``order`` its position
    in execution order (the order in which modules finish), ``same_as`` the first layer that produced
    the very same tensor with the same values (capture hooks that layer instead: fewer hooks).
    """

    name: str
    type: str
    shape: tuple[int, ...]
    calls: int
    order: int
    #: an earlier layer whose output is this layer's output, value for value (e.g. an ``Identity``)
    same_as: str | None = None
    #: how the output is read; ``maps`` unless the table found otherwise
    layout: Layout = Layout("maps")
    #: the output shape of one example as the module produces it (default: ``shape``)
    raw_shape: tuple[int, ...] = ()

    @property
    def listed(self) -> bool:
        """Whether layer lists show it by default (the page's layer list, its previous / next layer keys,
        the default layer): every layer but ``Identity`` modules, placeholders whose output is their
        input (the page's "all modules" lists them too)."""
        return self.type != "Identity"

    @property
    def units(self) -> int:
        """Channels (the first axis of the canonical shape)."""
        return self.shape[0]

    @property
    def spatial(self) -> bool:
        """True when the canonical form has rows and columns (C, H, W)."""
        return self.viewable and len(self.shape) == 3

    @property
    def viewable(self) -> bool:
        """True when every tool can show the layer (see :mod:`.layouts`)."""
        return self.layout.viewable

    @property
    def prefix(self) -> tuple[str, ...]:
        """The prefix token names of a token layer (``cls``, ``dist``, ``reg0`` ...), else empty."""
        return self.layout.prefix

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["raw_shape"] = list(self.raw_shape or self.shape)
        d["units"] = self.units
        d["layout"] = self.layout.kind
        d["prefix_tokens"] = list(self.layout.prefix)
        d["viewable"] = self.viewable
        if self.layout.grid is not None:
            d["grid"] = list(self.layout.grid)
        if not self.viewable or self.layout.reason:
            d["reason"] = self.layout.reason
        return d


#: a Model's layer table (its viewable layers) per input shape (C, H, W), followed by the sorted
#: declared layouts when there are any
LAYER_TABLES: CacheSlot[tuple[object, ...], list[LayerInfo]] = CacheSlot("layer_table")
#: every layer, viewable or not (``layer_table(..., everything=True)``), per the same key
FULL_LAYER_TABLES: CacheSlot[tuple[object, ...], list[LayerInfo]] = CacheSlot("full_layer_table")


def resolve_module(module: nn.Module, name: str) -> nn.Module:
    """The submodule at path ``name`` (``logits`` or ``""``: the whole model); a :class:`LayerError`
    naming close matches when there is none."""
    owner = weights_owner(module, name)  # PATH.attn_weights: an nn.MultiheadAttention's weights (.attention)
    if owner is not None:
        return owner
    if name in ("", LOGITS):
        try:
            return module.get_submodule(name) if name else module
        except AttributeError:
            return module
    try:
        return module.get_submodule(name)
    except AttributeError:
        names = [n for n, _ in module.named_modules() if n]
        close = difflib.get_close_matches(name, names, n=4, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise LayerError(f"no layer named {name!r} in the model{hint} (see `deepvis layers`)") from None


def _probe(
    module: nn.Module,
    input_shape: tuple[int, ...],
    on_call: Callable[[str, nn.Module, object], None],
    edit: Callable[[torch.Tensor], None] | None = None,
    batch: int = 1,
) -> None:
    """One forward pass of zeros (``batch``, *input_shape), on the module's device and in its floating dtype
    (a half-precision model gets a half input), changed in place by ``edit`` when given, with a hook on
    every module calling ``on_call(name, module, output)`` (the model's output as :data:`LOGITS`)."""
    x = torch.zeros(batch, *input_shape, device=module_device(module), dtype=module_dtype(module))
    if edit is not None:
        edit(x)
    handles = []
    try:
        for name, m in module.named_modules():
            handles.append(m.register_forward_hook(lambda mod, _i, out, name=name or LOGITS: on_call(name, mod, out)))
        with torch.no_grad(), eval_mode(module), exposed_attention(module, on_call):  # attention weights listed too
            module(x)
    finally:
        for h in handles:
            h.remove()


def _finer_than_the_patches(
    found: dict[str, Layout], shapes: dict[str, tuple[int, ...] | None], order: dict[str, int], grid: tuple[int, int]
) -> dict[str, Layout]:
    """Maps guessed from the shape alone inside a transformer (after its first token layer) that are finer
    than its patch grid: not maps of the input but pairs of other axes that happen to look like one
    (XCiT's channel-by-channel attention, 32x32 at a 14x14 grid; CaiT's token-by-token talking heads,
    196x196), left not viewable with the reason. A stem before the tokens (hybrid ViTs) is not affected."""
    starts = [order[n] for n, lay in found.items() if lay.kind == "tokens" and n in order]
    if not starts:
        return {}
    first = min(starts)
    out = {}
    for name, lay in found.items():
        shape = shapes.get(name)
        if lay.reason != GUESSED or lay.kind not in ("maps", "maps-last") or shape is None or order.get(name, -1) <= first:
            continue
        _, h, w = lay.canonical_shape(shape[1:])
        if h > grid[0] or w > grid[1]:
            out[name] = Layout(
                "none",
                reason=f"a {h}x{w} pair of axes inside a transformer whose patch grid is {grid[0]}x{grid[1]}: not a map of the "
                "input (e.g. channel-by-channel or token-by-token attention); declare --layout LAYER=nchw|nhwc if it is one",
            )
    return out


def _token_order(module: nn.Module, input_shape: tuple[int, ...], found: dict[str, Layout], declared: dict[str, str]) -> dict[str, Layout]:
    """Token layers whose tokens are not in row-major order of their grid, made not viewable (with the reason).

    A grid read from a token count assumes row-major order; some models keep another (Hiera's "unrolled"
    mask-unit order), and a row-by-row reshape of them draws a scrambled picture. Measured with one
    forward pass of two inputs: zeros, and zeros with one patch raised (30 % down, 70 % across). A layer
    *agrees* when its largest change (summed over channels) lies within one cell of that patch, and
    *disagrees* when the cells around the patch change by less than half of the largest change: the
    change is elsewhere. Layers that do neither (a change spread evenly, as after global attention)
    follow the others of their grid size: when any of them disagrees, all but the agreeing ones are
    left out (and attention weights over that grid). Declared layouts are not measured.
    """
    tokens = {n: lay for n, lay in found.items() if lay.kind == "tokens" and lay.grid is not None and n not in declared}
    grids = [lay.grid for lay in tokens.values() if lay.grid is not None]
    if not grids:
        return {}
    _, h, w = input_shape
    fine = max(grids, key=lambda g: g[0] * g[1])
    by, bx = max(1, h // fine[0]), max(1, w // fine[1])
    y0, x0 = min(h - by, int(0.3 * fine[0]) * by), min(w - bx, int(0.7 * fine[1]) * bx)
    yc, xc = y0 + by / 2, x0 + bx / 2
    change: dict[str, torch.Tensor] = {}

    def on_call(name: str, _m: nn.Module, out: object) -> None:
        lay = tokens.get(name)
        if lay is None or name in change or not isinstance(out, torch.Tensor) or out.ndim != 3 or out.shape[0] != 2:
            return
        change[name] = (out[1] - out[0]).abs().float().sum(-1)[len(lay.prefix) :].cpu()

    def raise_patch(x: torch.Tensor) -> None:
        x[1, :, y0 : y0 + by, x0 : x0 + bx] = 1.0

    try:
        _probe(module, input_shape, on_call, raise_patch, batch=2)
    except Exception:  # a model that takes one example at a time: nothing measured, nothing changed
        return {}
    verdict: dict[str, str] = {}
    where: dict[tuple[int, int], tuple[str, tuple[int, int], tuple[int, int]]] = {}
    for name, d in change.items():
        gh, gw = tokens[name].grid or (0, 0)
        if d.numel() != gh * gw or not float(d.max()) > 0:
            continue
        d = d.view(gh, gw)
        ey, ex = min(gh - 1, int(yc * gh / h)), min(gw - 1, int(xc * gw / w))
        ay, ax = divmod(int(d.argmax()), gw)
        if abs(ay - ey) <= 1 and abs(ax - ex) <= 1:
            verdict[name] = "agrees"
        elif float(d[max(0, ey - 1) : ey + 2, max(0, ex - 1) : ex + 2].max()) < 0.5 * float(d.max()):
            verdict[name] = "disagrees"
            where.setdefault((gh, gw), (name, (ey, ex), (ay, ax)))
    out: dict[str, Layout] = {}
    for name, lay in found.items():
        grid = lay.grid
        if (
            grid is None
            or grid not in where
            or lay.kind not in ("tokens", "attention")
            or verdict.get(name) == "agrees"
            or name in declared
        ):
            continue
        first, (ey, ex), (ay, ax) = where[grid]
        out[name] = Layout(
            "none",
            reason=f"its {grid[0]}x{grid[1]} tokens are not in row-major order (measured: a change of the input at patch "
            f"{ey},{ex} moved token {ay},{ax} of {first}): deepvis cannot draw them as a map",
        )
    return out


def _second_size(input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Another input size whose rows and columns change by different factors (1/2 and 3/4)."""
    c, h, w = input_shape
    return (c, max(1, h // 2), max(1, (3 * w) // 4))


def layer_table(
    model: Model | nn.Module,
    input_shape: tuple[int, ...] | None = None,
    *,
    everything: bool = False,
    layouts: dict[str, str] | None = None,
) -> list[LayerInfo]:
    """List the model's layers by running a probe forward pass (and a second one at another input size
    when a layout is not told by the model, see :mod:`.layouts`).

    Args:
        model: a :class:`Model`, or a bare ``nn.Module`` (then ``input_shape`` is needed).
        input_shape: one example's input shape (C, H, W); default: the model's input size.
        everything: also list the layers that are not viewable (their ``layout.reason`` says why).
        layouts: declared layouts ``{layer: kind}`` (default: the Model's ``layouts`` attribute);
            kinds as in :func:`~deepvis.capture.layouts.parse_layout`.

    Returns:
        One :class:`LayerInfo` per layer, in execution order; on a :class:`Model` cached per input
        shape and declarations (dropped when the module's structure changes).
    """
    module = model.module if isinstance(model, Model) else model
    if input_shape is None:
        if not isinstance(model, Model):
            raise ValueError("input_shape is needed for a bare nn.Module")
        input_shape = model.preprocessing.input_shape
    if layouts is None:
        layouts = dict(getattr(model, "layouts", None) or {})
    key: tuple[object, ...] = (*input_shape, tuple(sorted(layouts.items()))) if layouts else tuple(input_shape)
    entries = model.cache.entries(module) if isinstance(model, Model) else None
    slot = FULL_LAYER_TABLES if everything else LAYER_TABLES
    found = entries.get(slot, key) if entries is not None else None
    if found is not None:
        return found
    rows = _build_table(module, tuple(input_shape), layouts)
    viewable = [r for r in rows if r.viewable]
    if entries is not None:
        entries.put(FULL_LAYER_TABLES, key, rows)
        entries.put(LAYER_TABLES, key, viewable)
    return rows if everything else viewable


def _build_table(module: nn.Module, input_shape: tuple[int, ...], layouts: dict[str, str]) -> list[LayerInfo]:
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}
    mods: dict[str, nn.Module] = {}
    order: dict[str, int] = {}
    producer: dict[tuple[int, int], str] = {}  # (tensor id, version) -> first layer that output it
    same_as: dict[str, str | None] = {}
    keep: list[torch.Tensor] = []  # keeps outputs alive so that tensor ids stay unique during the probe

    def first_call(name: str, m: nn.Module, out: object) -> None:
        calls[name] = calls.get(name, 0) + 1
        mods[name] = m
        order.setdefault(name, len(order))
        if not isinstance(out, torch.Tensor):
            shapes[name] = None
            order.pop(name)
            return
        shapes[name] = tuple(out.shape)
        keep.append(out)
        sig = (id(out), out._version)
        first = producer.setdefault(sig, name)
        same_as[name] = first if first != name and calls[name] == 1 else None

    try:
        _probe(module, input_shape, first_call)
    except Exception as exc:
        raise LayerError(
            f"the model fails on an input of shape {tuple(input_shape)}: {type(exc).__name__}: {exc} "
            "(if it takes another input size, say so: --input-size PX, or Preprocessing(input_size=...) in Python)"
        ) from exc
    keep.clear()
    hw = (input_shape[-2], input_shape[-1])
    tokens = token_geometry(module, hw)
    nhwc = says_nhwc(module)
    lengths = frozenset(shape[1] for shape in shapes.values() if shape is not None and len(shape) == 3)

    def detect(second: dict[str, tuple[int, ...] | None], hw2: tuple[int, int]) -> dict[str, Layout]:
        out = {}
        for name, shape in shapes.items():
            if shape is None:
                continue
            s2 = second.get(name)
            out[name] = detect_layout(
                name,
                mods[name],
                shape,
                1,
                hw=hw,
                tokens=tokens,
                nhwc_model=nhwc,
                declared=layouts,
                second=(s2, hw2) if s2 is not None else None,
                lengths=lengths,
            )
        return out

    found = detect({}, hw)
    # layouts read from the shape alone, or not told at all, are measured by a second probe when the model takes one
    unsure = [n for n, lay in found.items() if lay.reason == GUESSED or (lay.kind == "none" and "cannot tell" in lay.reason)]
    if unsure:
        second_shape = _second_size(input_shape)
        shapes2: dict[str, tuple[int, ...] | None] = {}

        def record(name: str, _m: nn.Module, out: object) -> None:
            shapes2[name] = tuple(out.shape) if isinstance(out, torch.Tensor) else None

        try:
            _probe(module, second_shape, record)
        except Exception:  # many models accept one input size only: the first probe decides then
            shapes2 = {}
        if shapes2:
            again = detect(shapes2, (second_shape[-2], second_shape[-1]))
            found.update({n: again[n] for n in unsure})
    if tokens is not None:
        found.update(_finer_than_the_patches(found, shapes, order, tokens.grid))
    found.update(_token_order(module, tuple(input_shape), found, layouts))
    rows: list[LayerInfo] = []
    n_view = 0
    for name in sorted(order, key=order.__getitem__):
        shape = shapes.get(name)
        if shape is None:
            continue
        layout = found[name]
        if name == LOGITS and layout.kind != "vector":
            continue
        raw = shape[1:]
        src = same_as.get(name) if layout.viewable else None
        if src is not None and (calls.get(src) != 1 or src == LOGITS or not found[src].viewable):
            src = None
        view_order = n_view if layout.viewable else -1
        n_view += layout.viewable
        rows.append(LayerInfo(name, type(mods[name]).__name__, layout.canonical_shape(raw), calls[name], view_order, src, layout, raw))
    return rows


def activation_bytes(model: Model, input_shape: tuple[int, ...] | None = None, *, backward: bool = False) -> int:
    """A rough peak memory of one example through the model, in bytes, for choosing batch sizes
    (:func:`deepvis.runtime.choose_batch_size`): the outputs of its viewable layers at ``input_shape``
    (C, H, W; default the model's input size) in its floating dtype, doubled with ``backward``
    (:func:`deepvis.runtime.item_bytes`). A model that fails at that size counts its input only."""
    shape = tuple(input_shape) if input_shape is not None else tuple(model.preprocessing.input_shape)
    try:
        shapes = [i.shape for i in layer_table(model, shape) if i.same_as is None]
    except LayerError:
        shapes = []
    return item_bytes([shape, *shapes], torch.finfo(model.dtype).bits // 8, backward=backward)


def token_layer_info(base: LayerInfo, token: str) -> LayerInfo:
    """The :class:`LayerInfo` of the pseudo-layer ``LAYER@TOKEN`` of token layer ``base``: prefix token
    ``token`` (``cls``, ``reg0``, ``#0``) as a vector of C units, shape (C,), at ``base``'s place in the
    execution order. A one-line :class:`UnitError` when ``base`` has no such token."""
    if base.layout.kind != "tokens":
        raise UnitError(f"layer {base.name} is a {base.layout.kind} layer without prefix tokens, so @{token} does not apply")
    try:
        index = base.layout.token_index(token)
    except ValueError as exc:
        raise UnitError(f"layer {base.name}: {exc}") from None
    name = f"{base.name}@{token}"
    c = base.shape[0]
    layout = Layout("vector", reason=f"prefix token {base.layout.prefix[index]} (#{index}) of token layer {base.name}")
    return LayerInfo(name, base.type, (c,), base.calls, base.order, None, layout, (c,))


def get_layer(model: Model, name: str, input_shape: tuple[int, ...] | None = None) -> LayerInfo:
    """The :class:`LayerInfo` of viewable layer ``name`` (at ``input_shape`` (C, H, W), default the model's input),
    or a one-line :class:`LayerError`: close matches for an unknown name, the reason (and how to declare
    the layout) for a layer that is not viewable. A prefix-token pseudo-layer ``LAYER@TOKEN``
    (``blocks.5@cls``) is the vector of that token (:func:`token_layer_info`)."""
    split = split_token_layer(name)
    if split is not None:
        return token_layer_info(get_layer(model, split[0], input_shape), split[1])
    for info in layer_table(model, input_shape):
        if info.name == name:
            return info
    resolve_module(model.module, name)  # raises with suggestions when the module does not exist
    for info in layer_table(model, input_shape, everything=True):
        if info.name == name:
            reason = info.layout.reason
            if reason.startswith("cannot tell"):
                raise LayerError(reason)
            shape = "x".join(str(s) for s in info.raw_shape)
            raise LayerError(f"layer {name!r} (output {shape} per example) is not viewable: {reason}; see `deepvis layers --all`")
    if name == LOGITS:
        problem = output_problem(model)
        if problem is not None:
            raise LayerError(problem)
    raise LayerError(f"layer {name!r} does not output a tensor; see `deepvis layers` for usable layers")


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return "x".join(str(s) for s in value.shape[1:]) or "a scalar"
    return type(value).__name__


def output_problem(model: Model, input_shape: tuple[int, ...] | None = None) -> str | None:
    """Why the model's output cannot be its ``logits`` layer (it is not one tensor), in one line that says
    what to do, or None when it is a tensor. Runs one forward pass of zeros (on the error path only)."""
    outputs: list[object] = []

    def keep_output(name: str, _m: nn.Module, out: object) -> None:
        if name == LOGITS:
            outputs.append(out)

    try:
        _probe(model.module, tuple(input_shape or model.preprocessing.input_shape), keep_output)
    except Exception:
        return None  # the model fails: the layer table says so
    return None if not outputs or isinstance(outputs[0], torch.Tensor) else not_one_tensor(outputs[0])


def not_one_tensor(out: object) -> str:
    """The one-line message for a model whose output ``out`` is not one tensor (a tuple, a dict, an
    output object): what it is, and how to wrap the model so that it returns its class scores."""
    if isinstance(out, dict):
        parts = ", ".join(f"{k!r}: {_describe(v)}" for k, v in list(out.items())[:4])
        pick = "['logits']" if "logits" in out else f"[{next(iter(out), '...')!r}]"
        what = f"a dict ({parts})"
    elif isinstance(out, (tuple, list)):
        parts = ", ".join(_describe(v) for v in out[:4])
        pick = "[0]"
        what = f"a {type(out).__name__} of {len(out)} ({parts})"
    else:
        pick = ".logits"
        what = f"a {type(out).__name__}"
    return (
        f"the model returns {what}, not one tensor, so it has no `logits` layer (predictions, class objectives): "
        f"wrap it to return its class scores, e.g. a module whose forward is `return net(x){pick}`; its inner layers work as they are"
    )


def check_unit(model: Model, unit: Unit, input_shape: tuple[int, ...] | None = None) -> LayerInfo:
    """Validate a unit against its layer: the layer exists and is viewable, the channel is in range, the
    position lies inside the map or patch grid, a prefix token (``@cls``, ``@reg0``, ``@#1``) exists in
    the layer (at ``input_shape`` (C, H, W), default the model's input). Returns the info of the unit's
    layer (for a prefix token, of its token layer; :func:`get_layer` of ``unit.layer_key`` gives the
    token's vector); a one-line :class:`UnitError` otherwise."""
    info = get_layer(model, unit.layer, input_shape)
    if not 0 <= unit.channel < info.units:
        raise UnitError(f"unit {unit} is out of range: layer {info.name} has {info.units} units (0-{info.units - 1})")
    if unit.token is not None:
        try:
            token_layer_info(info, unit.token)
        except UnitError as exc:
            raise UnitError(f"unit {unit}: {str(exc).removeprefix(f'layer {info.name}: ')}") from None
    if unit.position is not None:
        if not info.spatial:
            raise UnitError(f"unit {unit}: layer {info.name} has no spatial map, so @Y,X does not apply")
        h, w = info.shape[1:]
        y, x = unit.position
        if not (0 <= y < h and 0 <= x < w):
            at = f" at {input_shape[-2]}x{input_shape[-1]} px" if input_shape is not None else ""
            what = "patch grid" if info.layout.kind == "tokens" else "map"
            raise UnitError(f"unit {unit}: position is outside the {h}x{w} {what} of {info.name}{at}")
    return info
