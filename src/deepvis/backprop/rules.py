"""Backward rules for ReLU-like nonlinearities: deconvnet and guided backpropagation.

Three backward modes, for a ReLU-like ``y = f(x)`` with incoming gradient ``g = ∂L/∂y``:

* ``gradient``: the true gradient ``f'(x) · g``;
* ``deconv`` (Zeiler & Fergus 2014): ``max(g, 0)``: the positive part of ``g``, ignoring the forward mask;
* ``guided`` (Springenberg et al. 2015): ``max(g, 0) · f'(x) · [x > 0]``: only where both the forward input
  and the incoming gradient are positive (for ReLU6 also where ``x < 6``: its true gradient is 0 above).

The rules apply to ``nn.ReLU``, ``nn.ReLU6``, ``nn.LeakyReLU``, ``nn.Hardtanh(0, M)`` and to the
functional calls ``F.relu``, ``F.relu6``, ``F.leaky_relu``, ``F.hardtanh``, ``torch.relu``, ``Tensor.relu``
and their in-place forms, wherever they are called (inside timm's ``BatchNormAct2d``, in a user's
``forward``).

What is written here by hand, and why (Captum's ``GuidedBackprop``/``Deconvolution`` do not cover it):
Captum hooks ``nn.ReLU`` modules only (not ReLU6, LeakyReLU or functional calls); its backward hook reads
the module's output gradient from a per-device slot, which is overwritten when one module runs several
times (torchvision's ResNet blocks call ``self.relu`` twice), and it rewrites the gradient of the module's
*input* tensor, which is wrong when that tensor also feeds another branch. Here every call of a ReLU-like
function is routed, only inside :func:`relu_rules`, through a small ``torch.autograd.Function`` by a
``torch.overrides.TorchFunctionMode``: one rule per call, in-place calls stay in place (``mark_dirty``),
nothing is registered on the user's modules and nothing outlives the context manager. Captum serves as
the reference implementation in the tests (on pure ``nn.ReLU`` models the results must agree).

Other nonlinearities (SiLU, GELU, sigmoid, ...) have no deconvnet/guided rule: they are counted, and
:func:`plain_nonlinearities` names the modules that call them, so that callers can refuse
(:class:`NonlinearityError`) or warn — never silently draw a picture that is not what was asked for.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ..choices import BACKPROP_MODES as MODES
from ..choices import BackpropMode as Mode
from ..errors import DeepvisError

__all__ = [
    "Mode",
    "MODES",
    "NonlinearityError",
    "RuleReport",
    "relu_rules",
    "plain_nonlinearities",
    "RELU_FUNCS",
    "OTHER_FUNCS",
]


class NonlinearityError(DeepvisError):
    """Deconvnet or guided backprop was asked for on a model with nonlinearities those rules do not cover."""


# -- which functions are ReLU-like -------------------------------------------------------------------
# function -> (kind, is the in-place form)
_RELU_FUNCS: dict[object, tuple[str, bool]] = {
    F.relu: ("relu", False),
    torch.relu: ("relu", False),
    torch.Tensor.relu: ("relu", False),
    torch.relu_: ("relu", True),
    torch.Tensor.relu_: ("relu", True),
    F.relu6: ("relu6", False),
    F.hardtanh: ("hardtanh", False),
    F.hardtanh_: ("hardtanh", True),
    F.leaky_relu: ("leaky_relu", False),
    F.leaky_relu_: ("leaky_relu", True),
}
RELU_FUNCS = MappingProxyType(_RELU_FUNCS)
# position of the ``inplace`` argument: F.relu(x, inplace), F.hardtanh(x, min, max, inplace), ...
_INPLACE_INDEX = MappingProxyType({"relu": 1, "relu6": 1, "hardtanh": 3, "leaky_relu": 2})

# nonlinearities without a deconvnet/guided rule (reported, left as plain gradient)
_OTHER_FUNCS: dict[object, str] = {
    F.silu: "silu",
    F.gelu: "gelu",
    F.mish: "mish",
    F.hardswish: "hardswish",
    F.hardsigmoid: "hardsigmoid",
    F.elu: "elu",
    F.elu_: "elu",
    F.celu: "celu",
    F.selu: "selu",
    torch.selu: "selu",
    torch.celu: "celu",
    F.softplus: "softplus",
    F.prelu: "prelu",
    torch.prelu: "prelu",
    F.rrelu: "rrelu",
    F.logsigmoid: "logsigmoid",
    F.softsign: "softsign",
    F.tanhshrink: "tanhshrink",
    F.glu: "glu",
    torch.sigmoid: "sigmoid",
    torch.sigmoid_: "sigmoid",
    torch.Tensor.sigmoid: "sigmoid",
    torch.Tensor.sigmoid_: "sigmoid",
    torch.tanh: "tanh",
    torch.tanh_: "tanh",
    torch.Tensor.tanh: "tanh",
    torch.Tensor.tanh_: "tanh",
}
OTHER_FUNCS = MappingProxyType(_OTHER_FUNCS)


def _arg(args: tuple, kwargs: dict, index: int, name: str, default: Any) -> Any:
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _relu_like(func: object, args: tuple, kwargs: dict) -> tuple[float | None, str | None]:
    """(upper limit of the linear part or None, reason it is not ReLU-like or None) for a ReLU-like function."""
    kind, inplace_form = _RELU_FUNCS[func]
    if kind == "relu6":
        return 6.0, None
    if kind == "hardtanh":
        lo = float(_arg(args, kwargs, 1, "min_val", -1.0))
        hi = float(_arg(args, kwargs, 2, "max_val", 1.0))
        if lo != 0.0 or hi <= 0.0:
            return None, f"hardtanh(min={lo:g}, max={hi:g})"
        return hi, None
    if kind == "leaky_relu":
        slope = float(_arg(args, kwargs, 1, "negative_slope", 0.01))
        if not 0.0 <= slope < 1.0:
            return None, f"leaky_relu(negative_slope={slope:g})"
    return None, None


class _Rule(torch.autograd.Function):
    """Runs a ReLU-like function unchanged in the forward pass and applies a deconv/guided rule backward.

    The guided mask is read from the output ``y`` (for ReLU, LeakyReLU with slope in [0, 1) and
    hardtanh(0, M), ``0 < y < M`` exactly when ``0 < x < M``), so in-place calls need no copy of ``x``,
    and the backward pass is two fused kernels: ``max(g, 0)`` and PyTorch's own ReLU/hardtanh backward.
    """

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, run: Callable[[], torch.Tensor], inplace: bool, guided: bool, upper: float | None
    ) -> torch.Tensor:
        y = run()
        if inplace:
            ctx.mark_dirty(x)
        ctx.guided, ctx.upper = guided, upper
        if guided:
            ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        if not ctx.guided:
            return g.clamp(min=0), None, None, None, None
        (y,) = ctx.saved_tensors
        if ctx.upper is None:
            out = torch.ops.aten.threshold_backward(g, y, 0.0)  # g where y > 0, else 0 (a new tensor)
        else:
            out = torch.ops.aten.hardtanh_backward(g, y, 0.0, ctx.upper)  # g where 0 < y < upper
        out.clamp_(min=0)
        return out, None, None, None, None


@dataclass
class RuleReport:
    """What :func:`relu_rules` saw in one forward pass: rules applied, and other nonlinearities by name."""

    mode: str
    applied: int = 0
    #: functional name ("silu", "hardtanh(min=-1, max=1)", ...) -> number of calls left as plain gradient
    plain: Counter[str] = field(default_factory=Counter)


class _RuleMode(TorchFunctionMode):
    def __init__(self, report: RuleReport, guided: bool) -> None:
        super().__init__()
        self.report = report
        self.guided = guided

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        spec = _RELU_FUNCS.get(func)
        if spec is not None:
            x = args[0] if args else kwargs.get("input")
            upper, unsupported = _relu_like(func, args, kwargs)
            if unsupported is None and isinstance(x, torch.Tensor) and x.requires_grad:
                inplace = spec[1] or bool(_arg(args, kwargs, _INPLACE_INDEX[spec[0]], "inplace", False))
                self.report.applied += 1
                return _Rule.apply(x, lambda: func(*args, **kwargs), inplace, self.guided, upper)
            if unsupported is not None:
                self.report.plain[unsupported] += 1
        else:
            name = _OTHER_FUNCS.get(func)
            if name is not None:
                self.report.plain[name] += 1
        return func(*args, **kwargs)


@contextlib.contextmanager
def relu_rules(mode: Mode) -> Iterator[RuleReport]:
    """Apply ``mode``'s backward rule to every ReLU-like call made by forward passes inside this block.

    The rule is attached to the autograd graph built inside the block, so the backward pass may run
    after the block ends. ``gradient`` changes nothing. The yielded :class:`RuleReport` counts the calls
    that got the rule and the other nonlinearities, which keep their plain gradient.
    """
    if mode not in MODES:
        raise DeepvisError(f"unknown backprop mode {mode!r}: use one of {', '.join(MODES)}")
    report = RuleReport(mode)
    if mode == "gradient":
        yield report
        return
    with _RuleMode(report, guided=mode == "guided"):
        yield report


class _Recorder(TorchFunctionMode):
    """Records the innermost running module of each call of a nonlinearity without a deconv/guided rule."""

    def __init__(self, stack: list[str], found: dict[str, Counter[str]]) -> None:
        super().__init__()
        self.stack = stack
        self.found = found

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        name = None
        if func in _RELU_FUNCS:
            name = _relu_like(func, args, kwargs)[1]
        else:
            name = _OTHER_FUNCS.get(func)
        if name is not None:
            where = self.stack[-1] if self.stack else "<model>"
            self.found.setdefault(where, Counter())[name] += 1
        return func(*args, **kwargs)


def plain_nonlinearities(module: nn.Module, run: Callable[[], object]) -> list[str]:
    """Names of the modules whose forward calls a nonlinearity that deconv/guided rules do not cover.

    ``run`` performs the forward pass (e.g. ``lambda: capture(model, x, [layer])``). Each entry reads
    ``"blocks.0.0.bn1.act (SiLU: silu)"``; calls made outside any submodule read ``"<model> (...)"``.
    Temporary hooks on every submodule track which one is running; they are removed on return.
    """
    stack: list[str] = []
    found: dict[str, Counter[str]] = {}
    handles = []
    types = {name: type(m).__name__ for name, m in module.named_modules()}

    def pre(name: str):
        def hook(_m: nn.Module, _inp: object) -> None:
            stack.append(name)

        return hook

    def post(name: str):
        def hook(_m: nn.Module, _inp: object, _out: object) -> None:
            if stack and stack[-1] == name:
                stack.pop()

        return hook

    try:
        for name, m in module.named_modules():
            label = name or "<model>"
            handles.append(m.register_forward_pre_hook(pre(label)))
            handles.append(m.register_forward_hook(post(label), always_call=True))
        with _Recorder(stack, found):
            run()
    finally:
        for h in handles:
            h.remove()
    out = []
    for where, funcs in found.items():
        kinds = ", ".join(sorted(funcs))
        out.append(f"{where} ({types.get(where, 'model')}: {kinds})")
    return out
