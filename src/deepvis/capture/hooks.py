"""Activation capture: one forward pass records any set of layers and stops after the deepest one.

Hooks are registered for the duration of one call and removed on every path, errors included; the
model's training flags are restored. Outputs that the network later modifies in place (e.g. a module
output followed by ``ReLU(inplace=True)``) are detected through the tensor version counter and
recaptured as copies, so what is returned is always the module's output as it was produced.

With a :class:`Model`, outputs come back in the canonical form of their layout (see :mod:`.layouts`):
(N, C, H, W) for maps, channels-last maps (a permuted view) and the patch tokens of token layers (a
reshaped view; ``prefix=True`` adds ``"LAYER@prefix"``: the prefix tokens as (N, C, P)); (N, C) for
vectors; for attention layers (N, heads, H, W), one query token's row over the key patches (``query``;
``prefix=True`` adds its weights on the prefix keys, (N, heads, P)). Views cost no copy, so a token layer
costs no more per element than a map layer.

Attention weights that a model never outputs (timm's fused attention, torchvision's
``nn.MultiheadAttention`` called with ``need_weights=False``) are made to exist for the one forward pass
that captures them (:mod:`.attention`), and everything is put back after it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn

from ..errors import DeepvisError, InputError, LayerError
from ..models.cache import CacheEntries, CacheSlot
from ..models.model import Model, module_dtype
from ..runtime import Autocast, autocast_dtype
from ..runtime import autocast as autocast_block
from .attention import WEIGHTS, fused_owner, mha_weights, unfused
from .layers import layer_table, module_device, not_one_tensor, resolve_module
from .layouts import Layout, Query
from .state import eval_mode
from .units import LOGITS, split_token_layer

__all__ = [
    "capture",
    "forward_with_logits",
    "prefix_key",
    "CaptureCancelled",
    "CAPTURE_FACTS",
    "RESOLVED_MODULES",
    "ALL_MODULES",
    "INPLACE_OUTPUTS",
]

#: (call count per layer, layer -> the earlier layer it is an alias of, layer -> layout), from the layer
#: table at the model's input size and declared layouts
CAPTURE_FACTS: CacheSlot[tuple[object, ...], tuple[dict[str, int], dict[str, str], dict[str, Layout]]] = CacheSlot("capture_facts")
#: the module each layer name resolves to
RESOLVED_MODULES: CacheSlot[str, nn.Module] = CacheSlot("resolved_modules")
#: every module of the network, in ``module.modules()`` order (for the training-flag context)
ALL_MODULES: CacheSlot[None, list[nn.Module]] = CacheSlot("all_modules")
#: the modules ``capture(cancel=)`` asks before (the root and its descendants down to :data:`CANCEL_DEPTH`)
CANCEL_POINTS: CacheSlot[int, list[nn.Module]] = CacheSlot("cancel_points")
#: the layers whose output the network later modifies in place (captured as copies); grows as found
INPLACE_OUTPUTS: CacheSlot[None, set[str]] = CacheSlot("inplace_outputs")


#: layouts whose outputs are already in the canonical form
_AS_PRODUCED = frozenset(("maps", "vector"))


class _StopForward(Exception):
    """Raised inside a hook once every requested layer has been captured."""


class CaptureCancelled(Exception):
    """Raised by :func:`capture` when its ``cancel`` callback answered True during the forward pass
    (the pass was abandoned between two modules; nothing is returned)."""


#: how deep under the network's root ``cancel`` is asked (before each module down to this depth runs)
CANCEL_DEPTH = 3


def prefix_key(layer: str) -> str:
    """The key under which ``capture(..., prefix=True)`` returns a token layer's prefix tokens."""
    return f"{layer}@prefix"


def _table_facts(model: Model) -> tuple[dict[str, int], dict[str, str], dict[str, Layout]]:
    """(call count per layer, layer -> the earlier layer it is an alias of, layer -> layout) from a
    Model's full layer table."""
    table = layer_table(model, everything=True)
    return {i.name: i.calls for i in table}, {i.name: i.same_as for i in table if i.same_as}, {i.name: i.layout for i in table}


def _check_input(model: Model | nn.Module, x: object) -> None:
    """A one-line :class:`InputError` for what is not the tensor the model takes (a Model's: (N, C, H, W),
    floating point, its C channels)."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"capture takes the (N, C, H, W) tensor that model.preprocess(image) makes, not {type(x).__name__}")
    if not isinstance(model, Model):
        return
    c = model.preprocessing.channels
    if x.ndim != 4 or x.shape[1] != c:
        raise InputError(f"the model takes (N, {c}, H, W) input; this tensor is {tuple(x.shape)} (model.preprocess(image) makes one)")
    if not x.is_floating_point():
        raise InputError(f"the model takes a floating-point input, normalized as model.preprocess(image) makes it; this one is {x.dtype}")


def capture(
    model: Model | nn.Module,
    x: torch.Tensor,
    layers: Iterable[str] | str,
    *,
    stop_early: bool = True,
    grad: bool = False,
    prefix: bool = False,
    query: Query = None,
    autocast: Autocast = None,
    cancel: Callable[[], bool] | None = None,
) -> dict[str, torch.Tensor]:
    """Run ``x`` through the model and return each requested layer's output in its canonical form.

    Args:
        model: a :class:`Model` (its layer table tells how often each module runs and which layers
            share an output) or a bare ``nn.Module`` (each module assumed to run once).
        x: the model input (N, C, H, W), moved to the model's device and cast to its floating dtype
            when needed (a float32 input to a bfloat16 model is cast; gradients flow back through the cast).
        layers: layer names, or one name (module paths; ``logits`` names the model's output; ``LAYER@TOKEN``, e.g.
            ``blocks.5@cls``, a prefix token of a token layer as its (N, C) vector, with a :class:`Model`).
        stop_early: end the forward pass as soon as every requested layer has produced its output
            (its last call, for a module that runs several times).
        grad: keep the outputs attached to the autograd graph (for gradients to the input); otherwise
            nothing is recorded for autograd.
        prefix: also return the prefix tokens (class, distillation, register tokens) of each token
            layer, as (N, C, P) under :func:`prefix_key` (``"LAYER@prefix"``), and of each attention
            layer the query's weights on the prefix keys, (N, heads, P).
        query: the query token of attention layers (:data:`~deepvis.capture.layouts.Query`: a prefix
            token name such as ``"cls"``, or a patch (row, column)); None: the first prefix token (the
            mean over queries for a model without prefix tokens).
        autocast: run the forward pass under ``torch.autocast`` in this dtype (``"bf16"``, ``"fp16"``
            or the torch dtype; see :func:`deepvis.runtime.autocast`); None: the model's own dtype.
            Outputs then come in the autocast dtype where autocast computed them.
        cancel: asked before each module down to :data:`CANCEL_DEPTH` levels under the root runs
            (e.g. before each block of a network); True abandons the pass (:class:`CaptureCancelled`).
            The live toolbox uses it to drop a frame whose layer is no longer shown.

    Returns:
        ``{layer: output}``: (N, C, H, W) or (N, C) tensors, each the module's output as it was
        produced (copied when the network later modifies it in place), in the canonical form of its
        layout when ``model`` is a :class:`Model` (channels-last maps permuted, token layers' patches
        as (N, C, H, W) views, attention layers as (N, heads, H, W): the query's row); a bare
        ``nn.Module``'s outputs as produced.

    Raises:
        LayerError: a layer that is not viewable (its reason, e.g. a layout that cannot be told).
        CaptureCancelled: ``cancel`` answered True.
        UnitError: a ``query`` that is not a prefix token or a patch of an attention layer's grid.
    """
    module = model.module if isinstance(model, Model) else model
    _check_input(model, x)
    wanted = list(dict.fromkeys([layers] if isinstance(layers, str) else layers))
    if not wanted:
        raise LayerError("no layer asked for")
    split = ((n, split_token_layer(n)) for n in wanted if "@" in n)
    tokens = {n: pair for n, pair in split if pair is not None}  # prefix-token pseudo-layers LAYER@TOKEN
    if tokens and not isinstance(model, Model):
        raise LayerError(f"layer {next(iter(tokens))!r} names a prefix token: capture it with a Model (its layouts tell the tokens)")
    bases = list(dict.fromkeys(tokens[n][0] if n in tokens else n for n in wanted)) if tokens else wanted
    token_at: dict[str, int] = {}  # pseudo-layer -> the index of its token among the prefix tokens
    # a Model remembers its layer facts, resolved modules and in-place outputs (checked once per call)
    entries: CacheEntries | None = None
    counts: dict[str, int] = {}
    alias: dict[str, str] = {}
    layouts: dict[str, Layout] = {}
    if isinstance(model, Model):
        entries, of = model.cache.entries(module), model
        key = tuple(sorted(model.layouts.items()))
        counts, alias, layouts = entries.get_or_compute(CAPTURE_FACTS, key, lambda: _table_facts(of))
        for n in bases:
            lay = layouts.get(n)
            if lay is not None and lay.kind not in _AS_PRODUCED and not lay.viewable:
                raise LayerError(f"layer {n!r} is not viewable: {lay.reason}")
            if lay is not None and lay.kind == "attention":
                lay.query_index(query)  # a bad query fails before the forward pass
        for n, (base, tok) in tokens.items():
            lay = layouts.get(base)
            if lay is None or lay.kind != "tokens":
                raise LayerError(f"layer {n!r}: {base} is not a token layer, so it has no prefix token {tok!r} (see `deepvis layers`)")
            try:
                token_at[n] = lay.token_index(tok)
            except ValueError as exc:
                raise LayerError(f"layer {n!r}: {exc}") from None
    names = list(dict.fromkeys(alias.get(n, n) for n in bases))  # hook each distinct output once
    if entries is not None:
        targets = {n: entries.get_or_compute(RESOLVED_MODULES, n, functools.partial(resolve_module, module, n)) for n in names}
        all_modules = entries.get_or_compute(ALL_MODULES, None, lambda: list(module.modules()))
        points = entries.get_or_compute(CANCEL_POINTS, CANCEL_DEPTH, lambda: _shallow_modules(module, CANCEL_DEPTH)) if cancel else None
    else:
        targets = {n: resolve_module(module, n) for n in names}
        all_modules = None
        points = _shallow_modules(module, CANCEL_DEPTH) if cancel else None
    expected = {n: counts.get(n, 1) for n in names}
    # attention that exists only while asked for (.attention): timm's fused modules whose attn_drop is
    # wanted run their explicit path; nn.MultiheadAttention's per-head weights come from its own call
    fused = [m for n in names if (m := fused_owner(module, n)) is not None]
    weights = {n: m for n, m in targets.items() if isinstance(m, nn.MultiheadAttention) and n.endswith(f".{WEIGHTS}")}
    mixed = autocast_dtype(autocast)  # a bad word fails before the forward pass
    device = module_device(module, x.device)
    dtype = module_dtype(module) if x.is_floating_point() else x.dtype
    if x.device != device or x.dtype != dtype:
        x = x.to(device, dtype, non_blocking=True)
    # layers whose output the network later modifies in place are captured as copies; a Model
    # remembers them, so only the first capture of such a layer runs the forward pass twice
    known: set[str] = entries.get_or_compute(INPLACE_OUTPUTS, None, set) if entries is not None else set()
    copy = {n for n in names if n in known}
    for _attempt in range(2):
        try:
            out, versions = _run(
                module,
                x,
                targets,
                expected,
                copy,
                stop_early=stop_early,
                grad=grad,
                all_modules=all_modules,
                fused=fused,
                weights=weights,
                mixed=mixed,
                cancel=cancel,
                cancel_points=points,
            )
        except (AssertionError, RuntimeError, ValueError) as exc:
            size = tuple(model.preprocessing.input_size) if isinstance(model, Model) else None
            if size is None or tuple(x.shape[-2:]) == size or isinstance(exc, (DeepvisError, torch.cuda.OutOfMemoryError)):
                raise
            # a model of a fixed input size (a ViT's patch grid, a Linear after flattening) given another
            raise InputError(
                f"the model fails on an input of {x.shape[-2]}x{x.shape[-1]} px ({type(exc).__name__}: {exc}); it was set up for "
                f"{size[0]}x{size[1]}: resize the input (model.preprocess(image) does) or give another input size"
            ) from exc
        mutated = {n for n in names if n in out and out[n]._version != versions[n]}
        if not mutated:
            break
        copy |= mutated
        known |= mutated
    missing = [n for n in names if n not in out]
    if missing:
        raise LayerError(f"layer {missing[0]!r} did not produce a tensor in the forward pass")
    result = {n: out[alias.get(n, n)] for n in bases}
    for n in bases:
        lay = layouts.get(n)
        if lay is not None and lay.kind not in _AS_PRODUCED:  # a view in the canonical form (no copy)
            t = result[n]
            result[n] = lay.to_canonical(t, query)
            if prefix and lay.kind in ("tokens", "attention"):
                result[prefix_key(n)] = lay.prefix_tokens(t, query)
            for name, (base, _tok) in tokens.items():
                if base == n:  # the token's (N, C) vector (a view)
                    result[name] = t[:, token_at[name]]
    if tokens:  # the requested names in their order (a token layer asked only through its tokens is left out)
        result = {**{n: result[n] for n in wanted}, **{k: v for k, v in result.items() if k not in bases and k not in tokens}}
    return result


def _run(
    module: nn.Module,
    x: torch.Tensor,
    targets: dict[str, nn.Module],
    expected: dict[str, int],
    copy: set[str],
    *,
    stop_early: bool,
    grad: bool,
    all_modules: list[nn.Module] | None = None,
    fused: list[nn.Module] | None = None,
    weights: dict[str, nn.MultiheadAttention] | None = None,
    mixed: torch.dtype | None = None,
    cancel: Callable[[], bool] | None = None,
    cancel_points: list[nn.Module] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    out: dict[str, torch.Tensor] = {}
    versions: dict[str, int] = {}
    seen = dict.fromkeys(targets, 0)
    remaining = [len(targets)]  # targets not yet at their expected call count
    weights = weights or {}
    by_module: dict[int, list[str]] = {}
    for n, m in targets.items():
        if n not in weights:
            by_module.setdefault(id(m), []).append(n)
    handles = []

    def record(n: str, output: object) -> None:
        if not isinstance(output, torch.Tensor):
            raise LayerError(not_one_tensor(output) if n == LOGITS else f"layer {n!r} outputs {type(output).__name__}, not a tensor")
        seen[n] += 1
        if seen[n] == expected[n]:
            remaining[0] -= 1
        t = output.clone() if n in copy else output
        out[n], versions[n] = t, t._version

    def make(m: nn.Module):
        def hook(_m: nn.Module, _inp: object, output: object) -> None:
            for n in by_module[id(m)]:
                record(n, output)
            if stop_early and remaining[0] <= 0:
                raise _StopForward

        return hook

    def on_weights(n: str, _m: nn.Module, w: torch.Tensor) -> None:
        record(n, w)
        if stop_early and remaining[0] <= 0:
            raise _StopForward

    def check(_m: nn.Module, _inp: object) -> None:
        if cancel is not None and cancel():
            raise CaptureCancelled

    grad_ctx = contextlib.nullcontext() if grad else torch.no_grad()
    try:
        for m in {id(m): m for n, m in targets.items() if n not in weights}.values():
            handles.append(m.register_forward_hook(make(m)))
        if cancel is not None:  # asked before each of cancel_points runs
            handles.extend(m.register_forward_pre_hook(check) for m in cancel_points or ())
        with (
            grad_ctx,
            autocast_block(x.device, mixed),
            eval_mode(module, all_modules),
            unfused(fused or ()),
            mha_weights(weights, on_weights),
        ):
            module(x)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    return out, versions


def _shallow_modules(module: nn.Module, depth: int) -> list[nn.Module]:
    """``module`` and its descendants down to ``depth`` levels under it."""
    out, level = [module], [module]
    for _ in range(depth):
        level = [c for m in level for c in m.children()]
        out.extend(level)
    return out


def forward_with_logits(
    model: Model, x: torch.Tensor, layers: Iterable[str], *, grad: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Capture ``layers`` and the logits in one full forward pass.

    Returns:
        ``(activations, logits)``: ``{layer: (N, ...)}`` without ``logits``, and the output (N, classes).
    """
    names = [n for n in dict.fromkeys(layers) if n != "logits"]
    acts = capture(model, x, [*names, "logits"], stop_early=False, grad=grad)
    logits = acts.pop("logits")
    return acts, logits
