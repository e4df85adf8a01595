"""Exact receptive fields composed along the executed graph (no gradients, no estimates).

One forward pass of one input runs under a ``TorchFunctionMode`` that gives every tensor derived from
the input a *state*:

* a :class:`Spatial` geometry, per axis: the full field ``size``, the ``jump`` (input pixels between
  neighbouring positions) and ``offset`` (the full field of position ``i`` starts at ``jump·i + offset``),
  and the exact clipped span (first, last input pixel) of every position;
* :class:`Whole`: every element can see the whole image, with the reason (attention, global pooling, a
  fully connected layer, normalization over the whole map);
* :class:`Flat`: the positions were merged into one axis (tokens); pointwise and per-token work keeps it,
  mixing along that axis makes it :class:`Whole`;
* :class:`Opaque`: an operation this module does not compose (upsampling, slicing, reflection padding,
  windowed attention, ...): the caller falls back to the gradient probe.

Convolutions and pools compose kernel, stride, padding (also ``"same"``) and dilation; constant
``F.pad`` shifts the offset (TensorFlow-style asymmetric "same" padding); pointwise operations, channel
concatenation and sums of branches take the union of their inputs' fields (branches with different
jumps are opaque). The spans follow every tap inside the input, so dilated kernels that lose taps in the
padding are exact too. Sizes are not limited by the input size: a field of 427 px on a 224-px input is
reported as 427 px.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .rules import OTHER_FUNCS, RELU_FUNCS

__all__ = ["Axis", "Spatial", "Whole", "Flat", "Opaque", "State", "graph_state"]

_EMPTY_LO = np.iinfo(np.int64).max
_EMPTY_HI = np.iinfo(np.int64).min


@dataclass(frozen=True)
class Axis:
    """The field along one axis: position ``i`` sees input pixels ``lo[i]..hi[i]`` (inclusive, inside the
    input; ``lo > hi`` for a position that sees only padding), its full field is ``size`` pixels from
    ``jump·i + offset``."""

    size: int
    jump: int
    offset: int
    lo: np.ndarray  # (n,) int64
    hi: np.ndarray  # (n,) int64

    def conv(self, k: int, s: int, p: int, d: int, m: int) -> Axis:
        """After a kernel ``k``, stride ``s``, padding before ``p``, dilation ``d``, with ``m`` outputs."""
        n = len(self.lo)
        taps = np.arange(m)[:, None] * s - p + np.arange(k)[None, :] * d  # (m, k) input indices
        inside = (taps >= 0) & (taps < n)
        safe = np.clip(taps, 0, max(n - 1, 0))
        lo = np.where(inside, self.lo[safe], _EMPTY_LO).min(axis=1)
        hi = np.where(inside, self.hi[safe], _EMPTY_HI).max(axis=1)
        return Axis(self.size + d * (k - 1) * self.jump, self.jump * s, self.offset - p * self.jump, lo, hi)

    def union(self, other: Axis) -> Axis | None:
        """The field of a sum (or concatenation) of two branches; None when they are not aligned."""
        if self.jump != other.jump or len(self.lo) != len(other.lo):
            return None
        offset = min(self.offset, other.offset)
        size = max(self.offset + self.size, other.offset + other.size) - offset
        return Axis(size, self.jump, offset, np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi))


@dataclass(frozen=True)
class Spatial:
    """A map whose rows are tensor dimension ``rdim`` and columns ``cdim`` (non-negative indices)."""

    rows: Axis
    cols: Axis
    rdim: int
    cdim: int


@dataclass(frozen=True)
class Whole:
    """Every element sees the whole image, because of ``reason``."""

    reason: str


@dataclass(frozen=True)
class Flat:
    """Positions merged into tensor dimension ``dim`` (tokens)."""

    dim: int


@dataclass(frozen=True)
class Opaque:
    """Not composed here, because of ``reason``."""

    reason: str


State = Spatial | Whole | Flat | Opaque

_POINTWISE_NAMES = {
    "add", "sub", "mul", "div", "true_divide", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "pow", "square", "reciprocal",
    "sigmoid", "tanh", "relu", "gelu", "silu", "mish", "hardswish", "hardsigmoid", "hardtanh", "relu6", "leaky_relu",
    "elu", "selu", "celu", "softplus", "clamp", "clamp_min", "clamp_max", "clip", "dropout", "dropout2d", "alpha_dropout",
    "batch_norm", "contiguous", "clone", "to", "float", "half", "bfloat16", "double", "type", "type_as", "detach", "erf",
    "addcmul", "addcdiv", "lerp", "where", "prelu", "glu", "sign", "floor", "ceil", "round", "maximum", "minimum",
    "logsigmoid", "tanhshrink", "softsign", "threshold", "rrelu", "hardshrink", "softshrink", "silu_", "channel_shuffle",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__neg__", "__pow__", "__rpow__", "__abs__",
}  # fmt: skip
_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "norm", "prod"}
_RESHAPES = {"view", "reshape", "flatten"}


def _pointwise(func: Callable[..., Any]) -> bool:
    if func in RELU_FUNCS or func in OTHER_FUNCS:
        return True
    name = getattr(func, "__name__", "")
    return name in _POINTWISE_NAMES or name.rstrip("_") in _POINTWISE_NAMES


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (list, tuple)):
        return (int(v[0]), int(v[-1])) if len(v) else (0, 0)
    return (int(v), int(v))


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], i: int, name: str, default: Any) -> Any:
    return args[i] if len(args) > i else kwargs.get(name, default)


def _dims(dim: Any, ndim: int) -> set[int] | None:
    if dim is None:
        return None
    if isinstance(dim, int):
        dim = (dim,)
    return {d % ndim for d in dim}


class _GraphMode(TorchFunctionMode):
    """Propagates a :data:`State` from the input through every torch call (see the module notes)."""

    def __init__(self) -> None:
        super().__init__()
        # id -> (a weak reference to the tensor, so that a reused id is not mistaken for it; its state)
        self.states: dict[int, tuple[weakref.ref[torch.Tensor], State]] = {}
        self.module_stack: list[str] = []

    def state(self, t: torch.Tensor) -> State | None:
        got = self.states.get(id(t))
        return got[1] if got is not None and got[0]() is t else None

    def set(self, out: Any, state: State) -> None:
        for t in _tensors(out):
            self.states[id(t)] = (weakref.ref(t), state)

    def where(self) -> str:
        return f" in {self.module_stack[-1]}" if self.module_stack and self.module_stack[-1] else ""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        ins = [(t, s) for t in _tensors((args, kwargs)) if (s := self.state(t)) is not None]
        if not ins or not any(True for _ in _tensors(out)):
            return out
        self.set(out, self._rule(func, args, kwargs, ins, out))
        return out

    def _rule(
        self,
        func: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ins: list[tuple[torch.Tensor, State]],
        out: Any,
    ) -> State:
        name = getattr(func, "__name__", str(func))
        states = [s for _, s in ins]
        whole = next((s for s in states if isinstance(s, Whole)), None)
        if whole is not None:
            return whole
        opaque = next((s for s in states if isinstance(s, Opaque)), None)
        if opaque is not None:
            return opaque
        if func in (F.scaled_dot_product_attention, F.multi_head_attention_forward):
            return Whole(f"attention ({name}){self.where()}")
        if not isinstance(out, torch.Tensor):
            return Opaque(f"{name}{self.where()}")
        x, s0 = ins[0]
        first = isinstance(args[0], torch.Tensor) and args[0] is x if args else False
        if isinstance(s0, Spatial) and first and len(ins) == 1:
            got = self._spatial_single(func, name, args, kwargs, x, s0, out)
            if got is not None:
                return got
        if isinstance(s0, Flat) and first and len(ins) == 1:
            got = self._flat_single(func, name, args, kwargs, x, s0, out)
            if got is not None:
                return got
        if _pointwise(func) or name in ("cat", "concat", "concatenate", "stack"):
            return self._union(func, name, args, kwargs, ins, out)
        return Opaque(f"{name}{self.where()}")

    def _union(
        self,
        func: Callable[..., Any],
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ins: list[tuple[torch.Tensor, State]],
        out: torch.Tensor,
    ) -> State:
        """Pointwise work and concatenation (not along a spatial axis): the union of the inputs' fields."""
        cat_dim = None
        if name in ("cat", "concat", "concatenate", "stack"):
            cat_dim = int(_arg(args, kwargs, 1, "dim", 0))
            if name == "stack":
                return Opaque(f"stack{self.where()}")
        result: State | None = None
        for t, s in ins:
            if isinstance(s, Flat):  # tokens (extra tokens such as a class token keep them tokens)
                if t.ndim != out.ndim or not (result is None or isinstance(result, Flat)):
                    return Opaque(f"{name} of a map and tokens{self.where()}")
                result = Flat(s.dim)
                continue
            assert isinstance(s, Spatial)
            if t.ndim != out.ndim or t.shape[s.rdim] != out.shape[s.rdim] or t.shape[s.cdim] != out.shape[s.cdim]:
                return Opaque(f"{name} broadcasts a map{self.where()}")
            if cat_dim is not None and cat_dim % out.ndim in (s.rdim, s.cdim):
                return Opaque(f"{name} along a spatial axis{self.where()}")
            if result is None:
                result = s
            elif isinstance(result, Spatial) and (result.rdim, result.cdim) == (s.rdim, s.cdim):
                rows, cols = result.rows.union(s.rows), result.cols.union(s.cols)
                if rows is None or cols is None:
                    return Opaque(f"{name} of branches with different strides{self.where()}")
                result = Spatial(rows, cols, s.rdim, s.cdim)
            else:
                return Opaque(f"{name}{self.where()}")
        return result if result is not None else Opaque(f"{name}{self.where()}")

    def _spatial_single(
        self,
        func: Callable[..., Any],
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        x: torch.Tensor,
        s: Spatial,
        out: torch.Tensor,
    ) -> State | None:
        """Rules for one input map; None: not a rule here (pointwise and unions are tried next)."""
        nd = x.ndim
        std = (s.rdim, s.cdim) == (nd - 2, nd - 1)
        if func is F.conv2d and std:
            k = tuple(_arg(args, kwargs, 1, "weight", None).shape[-2:])
            st = _pair(_arg(args, kwargs, 3, "stride", 1))
            pad = _arg(args, kwargs, 4, "padding", 0)
            dil = _pair(_arg(args, kwargs, 5, "dilation", 1))
            if isinstance(pad, str):
                pad = (0, 0) if pad == "valid" else tuple(dil[i] * (k[i] - 1) // 2 for i in range(2))
            p = _pair(pad)
            return self._window(s, (int(k[0]), int(k[1])), st, p, dil, out)
        if func in (F.max_pool2d, F.avg_pool2d, F.lp_pool2d) and std:
            if func is F.lp_pool2d:
                k = _pair(_arg(args, kwargs, 2, "kernel_size", 1))
                st = _pair(_arg(args, kwargs, 3, "stride", None) or k)
                return self._window(s, k, st, (0, 0), (1, 1), out)
            k = _pair(_arg(args, kwargs, 1, "kernel_size", 1))
            stride = _arg(args, kwargs, 2, "stride", None)
            st = _pair(stride) if stride not in (None, [], ()) else k
            p = _pair(_arg(args, kwargs, 3, "padding", 0))
            d = _pair(_arg(args, kwargs, 4, "dilation", 1)) if func is F.max_pool2d else (1, 1)
            return self._window(s, k, st, p, d, out)
        if func in (F.adaptive_avg_pool2d, F.adaptive_max_pool2d) and std:
            if tuple(out.shape[-2:]) == tuple(x.shape[-2:]):
                return s
            if tuple(out.shape[-2:]) == (1, 1):
                return Whole(f"global pooling ({name}){self.where()}")
            return Opaque(f"{name} to {tuple(out.shape[-2:])}{self.where()}")
        if func is F.pad and std:
            mode = _arg(args, kwargs, 2, "mode", "constant")
            pads = list(_arg(args, kwargs, 1, "pad", ()))
            if mode != "constant" or len(pads) > 4:
                return Opaque(f"{mode} padding{self.where()}")
            pads += [0] * (4 - len(pads))
            left, right, top, bottom = (int(v) for v in pads)
            rows = _shift(s.rows, top, out.shape[-2])
            cols = _shift(s.cols, left, out.shape[-1])
            return Spatial(rows, cols, s.rdim, s.cdim)
        if name in ("group_norm", "instance_norm", "local_response_norm"):
            if name == "local_response_norm":
                return s  # across channels only
            return Whole(f"normalization over the whole map ({name}){self.where()}")
        if name == "layer_norm":
            shape = _arg(args, kwargs, 1, "normalized_shape", ())
            n = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
            if any(d >= nd - n for d in (s.rdim, s.cdim)):
                return Whole(f"layer_norm over the map{self.where()}")
            return s
        if func is F.linear:
            if nd - 1 in (s.rdim, s.cdim):
                return Opaque(f"linear along a spatial axis{self.where()}")
            return s if out.ndim == nd else None
        if name in ("softmax", "log_softmax"):
            dim = _arg(args, kwargs, 1, "dim", None)
            if dim is not None and int(dim) % nd not in (s.rdim, s.cdim):
                return s
            return Whole(f"softmax over positions{self.where()}")
        if name in _REDUCTIONS and not isinstance(_arg(args, kwargs, 1, "dim", None), torch.Tensor):
            dims = _dims(_arg(args, kwargs, 1, "dim", None), nd)
            if dims is None or s.rdim in dims or s.cdim in dims:
                return Whole(f"global pooling ({name}){self.where()}")
            keep = bool(_arg(args, kwargs, 2, "keepdim", False))
            if keep:
                return s
            rdim, cdim = (d - sum(1 for r in dims if r < d) for d in (s.rdim, s.cdim))
            return Spatial(s.rows, s.cols, rdim, cdim)
        if name in ("permute", "transpose", "movedim", "swapaxes", "swapdims"):
            perm = _permutation(name, args, kwargs, nd)
            if perm is None:
                return Opaque(f"{name}{self.where()}")
            return Spatial(s.rows, s.cols, perm.index(s.rdim), perm.index(s.cdim))
        if name in _RESHAPES:
            return self._reshape(name, args, kwargs, x, s, out)
        if name in ("unsqueeze",):
            at = int(_arg(args, kwargs, 1, "dim", 0)) % (nd + 1)
            return Spatial(s.rows, s.cols, s.rdim + (at <= s.rdim), s.cdim + (at <= s.cdim))
        if _pointwise(func):
            return None
        if name in ("cat", "concat", "concatenate"):
            return None
        return Opaque(f"{name}{self.where()}")

    def _window(
        self, s: Spatial, k: tuple[int, int], st: tuple[int, int], p: tuple[int, int], d: tuple[int, int], out: torch.Tensor
    ) -> State:
        rows = s.rows.conv(k[0], st[0], p[0], d[0], out.shape[-2])
        cols = s.cols.conv(k[1], st[1], p[1], d[1], out.shape[-1])
        return Spatial(rows, cols, s.rdim, s.cdim)

    def _reshape(self, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], x: torch.Tensor, s: Spatial, out: torch.Tensor) -> State:
        """Leading dimensions reshaped: the map stays; rows and columns merged into one axis: tokens."""
        shape, new = tuple(x.shape), tuple(out.shape)
        if s.cdim != s.rdim + 1:
            return Opaque(f"{name}{self.where()}")
        before, after = math.prod(shape[: s.rdim]), shape[s.cdim + 1 :]
        for k in range(len(new)):
            if math.prod(new[:k]) == before and new[k : k + 2] == shape[s.rdim : s.cdim + 1] and new[k + 2 :] == after:
                return Spatial(s.rows, s.cols, k, k + 1)
        for k in range(len(new)):  # the positions merged into dimension k (maybe with channels)
            merged = math.prod(new[: k + 1]) % (before * shape[s.rdim] * shape[s.cdim]) == 0
            if before % math.prod(new[:k]) == 0 and merged and math.prod(new[k + 1 :]) == math.prod(after):
                return Flat(k)
        return Opaque(f"{name}{self.where()}")

    def _flat_single(
        self,
        func: Callable[..., Any],
        name: str,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        x: torch.Tensor,
        s: Flat,
        out: torch.Tensor,
    ) -> State | None:
        """Rules for one token tensor; None: not a rule here."""
        nd = x.ndim
        if func is F.linear:
            return Whole(f"fully connected ({name}){self.where()}") if s.dim == nd - 1 else s
        if name == "layer_norm":
            shape = _arg(args, kwargs, 1, "normalized_shape", ())
            n = len(shape) if isinstance(shape, (list, tuple, torch.Size)) else 1
            return Whole(f"layer_norm over positions{self.where()}") if s.dim >= nd - n else s
        if name in ("softmax", "log_softmax"):
            dim = _arg(args, kwargs, 1, "dim", None)
            return s if dim is not None and int(dim) % nd != s.dim else Whole(f"softmax over tokens{self.where()}")
        if name in _REDUCTIONS and not isinstance(_arg(args, kwargs, 1, "dim", None), torch.Tensor):
            dims = _dims(_arg(args, kwargs, 1, "dim", None), nd)
            if dims is None or s.dim in dims:
                return Whole(f"pooling over positions ({name}){self.where()}")
            keep = bool(_arg(args, kwargs, 2, "keepdim", False))
            return s if keep else Flat(s.dim - sum(1 for r in dims if r < s.dim))
        if name in ("permute", "transpose", "movedim", "swapaxes", "swapdims"):
            perm = _permutation(name, args, kwargs, nd)
            return Flat(perm.index(s.dim)) if perm is not None else Opaque(f"{name}{self.where()}")
        if name in ("flatten", "view", "reshape") and out.ndim == 2 and s.dim >= 1:
            return Flat(1)
        if name in ("matmul", "bmm", "einsum", "__matmul__", "baddbmm"):
            return Opaque(f"{name} of tokens{self.where()}")
        return None


def _permutation(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], nd: int) -> list[int] | None:
    """The new order of dimensions (``out.dim(i) == x.dim(perm[i])``) of a permute/transpose."""
    if name == "permute":
        dims = args[1:] if len(args) > 2 or (len(args) == 2 and isinstance(args[1], int)) else _arg(args, kwargs, 1, "dims", ())
        perm = [int(d) % nd for d in dims]
        return perm if sorted(perm) == list(range(nd)) else None
    if name in ("transpose", "swapaxes", "swapdims"):
        a, b = int(_arg(args, kwargs, 1, "dim0", 0)) % nd, int(_arg(args, kwargs, 2, "dim1", 1)) % nd
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    return None


def _shift(axis: Axis, before: int, m: int) -> Axis:
    """After padding ``before`` positions at the start (negative: cropping), ``m`` positions in all."""
    n = len(axis.lo)
    src = np.arange(m) - before
    inside = (src >= 0) & (src < n)
    safe = np.clip(src, 0, max(n - 1, 0))
    lo = np.where(inside, axis.lo[safe], _EMPTY_LO)
    hi = np.where(inside, axis.hi[safe], _EMPTY_HI)
    return Axis(axis.size, axis.jump, axis.offset - before * axis.jump, lo, hi)


class _Stop(Exception):
    """Raised in the target module's hook after its last call."""


def _attention_module(m: nn.Module) -> bool:
    """A global attention module (windowed attention, as in Swin, is not global and not composed)."""
    if isinstance(m, nn.MultiheadAttention):
        return True
    cls = type(m).__name__
    return "Attention" in cls and "Window" not in cls and "Shifted" not in cls


def graph_state(module: nn.Module, target: nn.Module, x: torch.Tensor, calls: int = 1) -> tuple[State, torch.Tensor]:
    """The state of ``target``'s output (its first tensor; last call) for the input ``x`` (1, C, H, W).

    Runs one forward pass without gradients, stopped after the ``calls``-th call of ``target`` (how
    often it runs in one forward pass); every hook is removed on
    every path. Attention modules (by type: ``nn.MultiheadAttention``, classes named ``*Attention*``
    except windowed ones) make their output :class:`Whole`.

    Returns:
        (the state, the output tensor).
    """
    mode = _GraphMode()
    h, w = x.shape[-2:]
    full = Axis(1, 1, 0, np.arange(h, dtype=np.int64), np.arange(h, dtype=np.int64))
    cols = Axis(1, 1, 0, np.arange(w, dtype=np.int64), np.arange(w, dtype=np.int64))
    names = {id(m): n for n, m in module.named_modules()}
    found: list[tuple[State, torch.Tensor]] = []
    handles = []

    def pre(m: nn.Module, _inp: object) -> None:
        mode.module_stack.append(names.get(id(m), type(m).__name__))

    def post(m: nn.Module, _inp: object, output: object) -> None:
        name = mode.module_stack.pop() if mode.module_stack else ""
        states = [mode.state(t) for t in _tensors(output)]
        if _attention_module(m) and any(st is not None for st in states) and not all(isinstance(st, Whole) for st in states):
            mode.set(output, Whole(f"attention in {name or 'the model'} ({type(m).__name__})"))
        if m is target:
            t = next(_tensors(output), None)
            if t is None:
                found.append((Opaque(f"{name} outputs no tensor"), x))
            else:
                st = mode.state(t)
                found.append((st if st is not None else Opaque(f"{name} does not depend on the input"), t))
            if len(found) >= calls:
                raise _Stop

    for m in module.modules():
        handles.append(m.register_forward_pre_hook(pre))
        handles.append(m.register_forward_hook(post))
    try:
        with torch.no_grad(), mode:
            xx = x.clone()
            mode.set(xx, Spatial(full, cols, xx.ndim - 2, xx.ndim - 1))
            module(xx)
    except _Stop:
        pass
    except Exception:
        if not found:  # the probe path runs the network again and reports the error
            raise
    finally:
        for hd in handles:
            hd.remove()
    if not found:
        return Opaque("the layer did not run"), x
    return found[-1]
