"""Attention weights that exist: made to appear for the duration of one forward pass, then put back.

Today's ViTs never hold their attention weights in a module output: timm's ``Attention`` (and the other
timm attention modules with a ``fused_attn`` flag) call ``F.scaled_dot_product_attention``, and
torchvision's ViT calls ``nn.MultiheadAttention`` with ``need_weights=False``. While deepvis captures
(or lists) an attention layer:

- a timm attention module whose ``attn_drop`` is wanted runs its explicit path (``fused_attn`` set to
  False and restored after, errors included): that path passes the softmaxed (N, heads, L, L) weights
  through ``attn_drop``, so ``blocks.N.attn.attn_drop`` is an attention layer; the block's output is the
  fused path's to float rounding (tests: atol 1e-5);
- an ``nn.MultiheadAttention`` at ``PATH`` gets a pseudo-layer ``PATH.attn_weights`` (:data:`WEIGHTS`):
  a forward pre-hook asks the module itself for per-head weights (``need_weights=True,
  average_attn_weights=False``) and a forward hook hands them over and returns the output the caller
  asked for (``(out, None)`` when it asked for no weights, the head mean when it asked for averaged
  ones), so the model computes the attention once and sees what it always saw.

Nothing else changes: flags are restored and hooks removed on every path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator

import torch
from torch import nn

__all__ = ["WEIGHTS", "weights_owner", "fused_owner", "fused_modules", "unfused", "mha_weights", "exposed_attention"]

#: the last name part of the pseudo-layer holding an ``nn.MultiheadAttention``'s per-head weights
WEIGHTS = "attn_weights"

#: ``nn.MultiheadAttention.forward``'s parameters after (query, key, value), in order
_MHA_ARGS = ("key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")


def weights_owner(root: nn.Module, name: str) -> nn.MultiheadAttention | None:
    """The ``nn.MultiheadAttention`` whose per-head weights layer ``name`` (``PATH.attn_weights``) names,
    or None when ``name`` is not such a pseudo-layer."""
    path, dot, last = name.rpartition(".")
    if not dot or last != WEIGHTS:
        return None
    try:
        m = root.get_submodule(path)
    except AttributeError:
        return None
    return m if isinstance(m, nn.MultiheadAttention) else None


def _is_fused(m: nn.Module) -> bool:
    return getattr(m, "fused_attn", False) is True and isinstance(getattr(m, "attn_drop", None), nn.Module)


def fused_owner(root: nn.Module, name: str) -> nn.Module | None:
    """The timm attention module running its fused path whose ``attn_drop`` is layer ``name``, or None."""
    path, dot, last = name.rpartition(".")
    if not dot or last != "attn_drop":
        return None
    try:
        m = root.get_submodule(path)
    except AttributeError:
        return None
    return m if _is_fused(m) else None


def fused_modules(root: nn.Module) -> list[nn.Module]:
    """Every timm-style attention module of ``root`` that runs its fused path (``fused_attn`` True, an
    ``attn_drop`` submodule)."""
    return [m for m in root.modules() if _is_fused(m)]


@contextlib.contextmanager
def unfused(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run the given timm attention modules on their explicit path (``fused_attn = False``); each flag is
    put back as it was on exit, errors included."""
    changed: list[nn.Module] = []
    try:
        for m in modules:
            if getattr(m, "fused_attn", False) is True:
                m.fused_attn = False  # type: ignore[assignment]  # timm's bool flag; nn.Module types attributes as Tensor | Module
                changed.append(m)
        yield
    finally:
        for m in changed:
            m.fused_attn = True  # type: ignore[assignment]  # as above


@contextlib.contextmanager
def mha_weights(modules: dict[str, nn.MultiheadAttention], on_weights: Callable[[str, nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """Hand each ``nn.MultiheadAttention``'s per-head weights (N, heads, Lq, Lk) to
    ``on_weights(layer, module, weights)`` on every call (``modules``: ``{pseudo-layer name: module}``).

    The module computes its attention once, with weights; the caller gets the output it asked for.
    ``on_weights`` may raise (e.g. to stop the forward pass early). Hooks are removed on exit.
    """
    asked: dict[int, list[tuple[bool, bool]]] = {}
    names: dict[int, list[str]] = {}
    for n, m in modules.items():
        names.setdefault(id(m), []).append(n)

    def pre(m: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> tuple[tuple[object, ...], dict[str, object]]:
        kw = {**dict(zip(_MHA_ARGS, args[3:])), **kwargs}
        asked.setdefault(id(m), []).append((bool(kw.get("need_weights", True)), bool(kw.get("average_attn_weights", True))))
        kw["need_weights"], kw["average_attn_weights"] = True, False
        return args[:3], kw

    def post(m: nn.Module, _args: tuple[object, ...], _kwargs: dict[str, object], output: object) -> object:
        need, average = asked[id(m)].pop()
        if not (isinstance(output, tuple) and len(output) == 2 and isinstance(output[1], torch.Tensor)):
            return None
        out, weights = output
        for n in names[id(m)]:
            on_weights(n, m, weights)
        if not need:
            return (out, None)
        return (out, weights.mean(1)) if average and weights.dim() == 4 else output

    handles = []
    try:
        for m in {id(m): m for m in modules.values()}.values():
            handles.append(m.register_forward_pre_hook(pre, with_kwargs=True))
            handles.append(m.register_forward_hook(post, with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def exposed_attention(root: nn.Module, on_weights: Callable[[str, nn.Module, torch.Tensor], None]) -> Iterator[None]:
    """Every attention of ``root`` made visible for one forward pass (the layer table's probe): timm's
    fused modules on their explicit path, every ``nn.MultiheadAttention`` at ``PATH`` reporting its
    weights to ``on_weights`` as ``PATH.attn_weights``. Everything is put back on exit."""
    mhas = {f"{n}.{WEIGHTS}": m for n, m in root.named_modules() if isinstance(m, nn.MultiheadAttention)}
    with unfused(fused_modules(root)), mha_weights(mhas, on_weights):
        yield
