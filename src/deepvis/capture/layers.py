"""The layer table: every module whose output is a (N, C, H, W) or (N, C) tensor, in execution order."""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import LayerError, UnitError
from ..models.cache import CacheSlot
from ..models.model import Model
from .state import eval_mode
from .units import LOGITS, Unit

__all__ = ["LayerInfo", "layer_table", "get_layer", "resolve_module", "check_unit", "LAYER_TABLES"]


@dataclass(frozen=True)
class LayerInfo:
    """A capturable layer.

    ``name`` is the module path (``logits`` for the model's output), ``shape`` the output shape of one
    example — (C, H, W) for maps, (C,) for vectors — at the model's input size, ``calls`` how many
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

    @property
    def units(self) -> int:
        return self.shape[0]

    @property
    def spatial(self) -> bool:
        return len(self.shape) == 3

    def to_dict(self) -> dict[str, object]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        d["units"] = self.units
        return d


#: a Model's layer table per input shape (C, H, W)
LAYER_TABLES: CacheSlot[tuple[int, ...], list[LayerInfo]] = CacheSlot("layer_table")


def resolve_module(module: nn.Module, name: str) -> nn.Module:
    """The submodule at path ``name`` (``logits`` or ``""``: the whole model); a :class:`LayerError`
    naming close matches when there is none."""
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


def layer_table(model: Model | nn.Module, input_shape: tuple[int, ...] | None = None) -> list[LayerInfo]:
    """List the model's capturable layers by running one probe forward pass.

    Args:
        model: a :class:`Model`, or a bare ``nn.Module`` (then ``input_shape`` is needed).
        input_shape: one example's input shape (C, H, W); default: the model's input size.

    Returns:
        One :class:`LayerInfo` per layer, in execution order; on a :class:`Model` cached per input
        shape in :data:`LAYER_TABLES` (dropped when the module's structure changes).
    """
    module = model.module if isinstance(model, Model) else model
    if input_shape is None:
        if not isinstance(model, Model):
            raise ValueError("input_shape is needed for a bare nn.Module")
        input_shape = model.preprocessing.input_shape
    key = tuple(input_shape)
    entries = model.cache.entries(module) if isinstance(model, Model) else None
    found = entries.get(LAYER_TABLES, key) if entries is not None else None
    if found is not None:
        return found
    named = list(module.named_modules())
    calls: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...] | None] = {}
    types: dict[str, str] = {}
    order: dict[str, int] = {}
    producer: dict[tuple[int, int], str] = {}  # (tensor id, version) -> first layer that output it
    same_as: dict[str, str | None] = {}
    keep: list[torch.Tensor] = []  # keeps outputs alive so that tensor ids stay unique during the probe
    handles = []

    def make(name: str, m: nn.Module) -> Callable[[nn.Module, object, object], None]:
        def hook(_m: nn.Module, _inp: object, out: object) -> None:
            calls[name] = calls.get(name, 0) + 1
            types[name] = type(m).__name__
            order.setdefault(name, len(order))
            if not (isinstance(out, torch.Tensor) and out.ndim in (2, 4)):
                shapes[name] = None
                order.pop(name)
                return
            shapes[name] = tuple(out.shape[1:])
            keep.append(out)
            sig = (id(out), out._version)
            first = producer.setdefault(sig, name)
            same_as[name] = first if first != name and calls[name] == 1 else None

        return hook

    try:
        for name, m in named:
            handles.append(m.register_forward_hook(make(name or LOGITS, m)))
        device = next((p.device for p in module.parameters()), torch.device("cpu"))
        with torch.no_grad(), eval_mode(module):
            module(torch.zeros(1, *input_shape, device=device))
    except Exception as exc:
        raise LayerError(f"the model fails on an input of shape {tuple(input_shape)}: {type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    rows: list[LayerInfo] = []
    for name in sorted(order, key=order.__getitem__):
        shape = shapes.get(name)
        if shape is None or (name == LOGITS and len(shape) != 1):
            continue
        src = same_as.get(name)
        if src is not None and (calls.get(src) != 1 or src == LOGITS):
            src = None
        rows.append(LayerInfo(name, types[name], shape, calls[name], len(rows), src))
    if entries is not None:
        entries.put(LAYER_TABLES, key, rows)
    return rows


def get_layer(model: Model, name: str, input_shape: tuple[int, ...] | None = None) -> LayerInfo:
    """The :class:`LayerInfo` of layer ``name`` (at ``input_shape``, default the model's input), or a
    clear error naming close matches."""
    table = layer_table(model, input_shape)
    for info in table:
        if info.name == name:
            return info
    resolve_module(model.module, name)  # raises with suggestions when the module does not exist
    raise LayerError(f"layer {name!r} does not output a (N,C,H,W) or (N,C) tensor; see `deepvis layers` for usable layers")


def check_unit(model: Model, unit: Unit, input_shape: tuple[int, ...] | None = None) -> LayerInfo:
    """Validate a unit against its layer: the layer exists, the channel is in range, the position lies
    inside the map (at ``input_shape``, default the model's input). Returns the layer's info."""
    info = get_layer(model, unit.layer, input_shape)
    if not 0 <= unit.channel < info.units:
        raise UnitError(f"unit {unit} is out of range: layer {info.name} has {info.units} units (0-{info.units - 1})")
    if unit.position is not None:
        if not info.spatial:
            raise UnitError(f"unit {unit}: layer {info.name} has no spatial map, so @Y,X does not apply")
        h, w = info.shape[1:]
        y, x = unit.position
        if not (0 <= y < h and 0 <= x < w):
            at = f" at {input_shape[-2]}x{input_shape[-1]} px" if input_shape is not None else ""
            raise UnitError(f"unit {unit}: position is outside the {h}x{w} map of {info.name}{at}")
    return info
