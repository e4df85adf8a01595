"""Unit views on an input: which input pixels drive a unit (gradient, deconvnet, guided backprop).

The backward pass starts at one unit of one layer (``logits`` for class scores): its whole channel
map, one position (``@Y,X``), the position where the map peaks (``at="max"``), or one channel of a
prefix token of a token layer (``blocks.5:17@cls``: the class token's vector, read through
:func:`deepvis.capture.unit_index` like every unit). The seed is the
unit's own activation there (as in the original toolbox: the view is the gradient of ½·a², so a dead
unit gives an empty view), or 1 with ``seed="one"`` (the plain gradient of the unit). The forward pass
stops at the unit's layer; the user's model is left unchanged (eval mode and ``requires_grad`` flags
restored, no hooks left).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
from PIL import Image

from ..capture.hooks import capture
from ..capture.layers import get_layer
from ..capture.state import frozen
from ..capture.units import Unit, parse_unit, unit_index
from ..choices import BACKPROP_SEEDS as SEEDS
from ..choices import BackpropSeed as Seed
from ..display import png_bytes
from ..errors import DeepvisError, UnitError
from ..models.cache import CacheSlot
from ..models.model import Model, require_model
from .filters import READABLE, backprop_image
from .rules import MODES, Mode, NonlinearityError, plain_nonlinearities, relu_rules

__all__ = [
    "BackpropResult",
    "PlainGradientWarning",
    "backprop_view",
    "backprop_views",
    "At",
    "Seed",
    "SEEDS",
    "PLAIN_NONLINEARITIES",
    "NEGLIGIBLE",
]

#: where in the channel map the backward pass starts: the whole map (None), its peak ("max"), or (y, x)
At = None | Literal["max"] | tuple[int, int]
#: a unit whose largest magnitude is at most this fraction of its layer's on an input is off there: its
#: view (scaled to full contrast like any other) shows a response a million times weaker than the layer's
NEGLIGIBLE = 1e-6

#: the modules that call nonlinearities without a rule, per (sorted layer names, input shape (C, H, W))
PLAIN_NONLINEARITIES: CacheSlot[tuple[tuple[str, ...], tuple[int, ...]], tuple[str, ...]] = CacheSlot("backprop_plain")


class PlainGradientWarning(UserWarning):
    """Deconv/guided mode ran with ``strict=False`` on a model with nonlinearities left as plain gradient."""


@dataclass(frozen=True)
class BackpropResult:
    """One unit's view of one input.

    ``grad`` is (C, H, W), float32 on the CPU, in model-input units (the gradient with respect to the
    normalized input). ``unit`` carries the position used (None: the whole channel map). ``activation``
    is the unit's value there (the maximum of the map when the whole map is used); ``argmax`` is where the
    channel map peaks (None for vector layers such as ``logits``). ``plain`` names the nonlinearities
    left as plain gradient (only ever non-empty with ``strict=False``). ``relative`` is the largest
    magnitude of the values the pass starts from over the largest magnitude in the unit's layer on this
    input: near 0 (:data:`NEGLIGIBLE`) for a unit that is off there, whose view is still drawn at full
    contrast (every view is scaled by its own percentile).
    """

    grad: torch.Tensor
    unit: Unit
    mode: str
    seed: str
    activation: float
    argmax: tuple[int, int] | None
    layer_shape: tuple[int, ...]
    plain: tuple[str, ...] = ()
    relative: float = 1.0

    @property
    def negligible(self) -> bool:
        """True when the unit is about 0 on this input compared with its layer (``relative`` ≤ :data:`NEGLIGIBLE`)."""
        return self.relative <= NEGLIGIBLE

    def _repr_png_(self) -> bytes:
        """The readable view (:data:`~deepvis.backprop.READABLE`, as the live toolbox shows it) as PNG, the
        input's size (IPython's display protocol; :func:`deepvis.backprop.overlay` lays it over the input)."""
        return png_bytes(backprop_image(self, READABLE.filter, percentile=READABLE.percentile))

    def to_dict(self) -> dict[str, object]:
        """JSON-ready metadata (without the gradient itself)."""
        g = self.grad
        return {
            "unit": str(self.unit),
            "layer": self.unit.layer,
            "channel": self.unit.channel,
            "position": list(self.unit.position) if self.unit.position is not None else None,
            "token": self.unit.token,
            "mode": self.mode,
            "seed": self.seed,
            "activation": self.activation,
            "argmax": list(self.argmax) if self.argmax is not None else None,
            "layer_shape": list(self.layer_shape),
            "input_shape": list(g.shape),
            "grad_abs_max": float(g.abs().max()) if g.numel() else 0.0,
            "grad_l2": float(g.norm()),
            "plain_gradient": list(self.plain),
            "relative": self.relative,
        }


def backprop_view(
    model: Model,
    x: torch.Tensor | Image.Image,
    unit: Unit | str,
    mode: Mode = "gradient",
    *,
    at: At = None,
    seed: Seed = "activation",
    strict: bool = True,
) -> BackpropResult:
    """The view of ``unit`` on one input ``x`` — a (C, H, W) or (1, C, H, W) model input, or a Pillow image.

    ``mode`` is ``gradient``, ``deconv`` or ``guided`` (see :mod:`deepvis.backprop.rules`). ``at``:
    None uses the unit's own position (``LAYER:C@Y,X``) or else the whole channel map; ``"max"`` the
    map's peak; ``(y, x)`` that position. With ``strict`` (default), deconv/guided on a model with
    nonlinearities they do not cover (SiLU, GELU, ...) raises :class:`NonlinearityError` naming them;
    ``strict=False`` warns (:class:`PlainGradientWarning`) and records them in ``result.plain``.
    """
    model = require_model(model)
    if isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[0] != 1:
        raise DeepvisError(f"backprop_view takes one input, got a batch of {x.shape[0]}: use backprop_views")
    return backprop_views(model, x, [unit], mode, at=at, seed=seed, strict=strict)[0]


def backprop_views(
    model: Model,
    x: torch.Tensor | Image.Image | Sequence[Image.Image],
    units: Unit | str | Sequence[Unit | str],
    mode: Mode = "gradient",
    *,
    at: At = None,
    seed: Seed = "activation",
    strict: bool = True,
) -> list[BackpropResult]:
    """Views for a batch in one forward and one backward pass.

    ``x`` is (N, C, H, W) (or images). ``units``: one unit for every input, one unit per input
    (``len(units) == N``), or several units on a single input (N == 1: the input is repeated). Units may
    lie on different layers; the forward pass stops at the deepest. Returns one result per example.
    """
    model = require_model(model)
    if mode not in MODES:
        raise DeepvisError(f"unknown backprop mode {mode!r}: use one of {', '.join(MODES)}")
    if seed not in SEEDS:
        raise DeepvisError(f"unknown seed {seed!r}: use one of {', '.join(SEEDS)}")
    xb = _as_batch(model, x)
    ulist = [parse_unit(u) if isinstance(u, str) else u for u in ([units] if isinstance(units, (Unit, str)) else list(units))]
    if not ulist:
        raise UnitError("no unit given")
    n = xb.shape[0]
    if len(ulist) == 1 and n > 1:
        ulist = ulist * n
    elif n == 1 and len(ulist) > 1:
        xb = xb.expand(len(ulist), *xb.shape[1:])
        n = len(ulist)
    elif len(ulist) != n:
        raise UnitError(f"{len(ulist)} units for {n} inputs: give one unit, one per input, or one input")
    ulist = [_apply_at(u, at) for u in ulist]
    layers = list(dict.fromkeys(u.layer_key for u in ulist))
    for name in layers:
        get_layer(model, name)  # a clear error, with suggestions, for an unknown layer

    module = model.module
    x_in = xb.detach().to(model.device).clone().requires_grad_(True)
    with frozen(module), relu_rules(mode) as report:
        acts = capture(model, x_in, layers, grad=True)
    plain: tuple[str, ...] = ()
    if report.plain:
        plain = _plain_names(model, x_in, layers)
        _complain(mode, plain, report.plain, strict)

    # seeds, one tensor per distinct captured tensor (aliased layers share one); the units' values and
    # their maps' peaks stay on the device until one copy at the end (with at="max", the peaks are
    # needed first: one copy of all of them)
    seeds: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    flat_peaks: dict[int, torch.Tensor] = {}
    for i, u in enumerate(ulist):
        a = acts[u.layer_key]
        unit_index(u, tuple(a.shape[1:]))  # a one-line UnitError for a unit outside its layer
        if a.ndim == 4:
            flat_peaks[i] = a[i, u.channel].detach().flatten().argmax()
        elif at == "max":
            raise UnitError(f"unit {u} is one value (layer {u.layer_key} has no map of positions): at='max' does not apply to it")
    peaks: list[tuple[int, int] | None] = [None] * n
    if at == "max" and flat_peaks:
        for i, f in zip(flat_peaks, torch.stack(list(flat_peaks.values())).tolist()):
            peaks[i] = divmod(int(f), acts[ulist[i].layer_key].shape[-1])
    resolved: list[Unit] = []
    values: list[torch.Tensor] = []
    relative: list[torch.Tensor] = []
    for i, u in enumerate(ulist):
        a = acts[u.layer_key]
        entry = seeds.setdefault(id(a), (a, torch.zeros_like(a)))
        s = entry[1]
        peak = peaks[i]
        if at == "max" and peak is not None:
            u = replace(u, position=peak)
        index = unit_index(u, tuple(a.shape[1:]))
        sel = a[i].detach()[index]  # the unit's value, or its whole channel map
        s[i][index] = sel if seed == "activation" else 1.0
        values.append(sel.max().double())
        relative.append((sel.abs().max().double() / a[i].detach().abs().max().double().clamp_min(1e-300)).clamp_max(1.0))
        resolved.append(u)
    outs = [t for t, _ in seeds.values()]
    grads = [g for _, g in seeds.values()]
    (gx,) = torch.autograd.grad(outs, x_in, grad_outputs=grads)
    gx = gx.detach().float().cpu()
    small = torch.cat([torch.stack(values), torch.stack(relative), *(f.double().view(1) for f in flat_peaks.values())]).tolist()
    for i, f in zip(flat_peaks, small[2 * n :]):
        peaks[i] = divmod(int(f), acts[ulist[i].layer_key].shape[-1])
    return [
        BackpropResult(
            gx[i], resolved[i], mode, seed, small[i], peaks[i], tuple(acts[resolved[i].layer_key].shape[1:]), plain, small[n + i]
        )
        for i in range(n)
    ]


def _as_batch(model: Model, x: torch.Tensor | Image.Image | Sequence[Image.Image]) -> torch.Tensor:
    if isinstance(x, Image.Image) or (isinstance(x, Sequence) and x and all(isinstance(i, Image.Image) for i in x)):
        return model.preprocess(x)
    if not isinstance(x, torch.Tensor):
        raise DeepvisError(f"expected a model input tensor or Pillow images, got {type(x).__name__}")
    if x.ndim == 3:
        x = x.unsqueeze(0)
    if x.ndim != 4:
        raise DeepvisError(f"expected an input of shape (C, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise DeepvisError(f"expected a float model input (normalized), got dtype {x.dtype}")
    return x


def _apply_at(u: Unit, at: At) -> Unit:
    if at is None or at == "max":
        if at == "max" and u.position is not None:
            raise UnitError(f"unit {u} has a position: give either @Y,X or at='max', not both")
        return u
    if isinstance(at, tuple) and len(at) == 2:
        if u.position is not None and tuple(u.position) != tuple(at):
            raise UnitError(f"unit {u} has a position and at={at} gives another: give one of them")
        return replace(u, position=(int(at[0]), int(at[1])))
    raise DeepvisError(f"bad at={at!r}: use None, 'max' or a (y, x) position")


def _plain_names(model: Model, x_in: torch.Tensor, layers: list[str]) -> tuple[str, ...]:
    """The modules that call nonlinearities without a rule (diagnosed once per layer set, then cached)."""
    probe = x_in.detach()[:1]

    def diagnose() -> tuple[str, ...]:
        return tuple(plain_nonlinearities(model.module, lambda: capture(model, probe, layers)))

    key = (tuple(sorted(layers)), tuple(x_in.shape[1:]))
    return model.cache.entries(model.module).get_or_compute(PLAIN_NONLINEARITIES, key, diagnose)


def _complain(mode: str, names: tuple[str, ...], calls: Mapping[str, int], strict: bool) -> None:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    if not shown:
        shown = ", ".join(sorted(calls))
    what = "deconvnet" if mode == "deconv" else "guided backprop"
    if strict:
        raise NonlinearityError(
            f"{what} rules apply only to ReLU, ReLU6 and LeakyReLU, and this model also uses {shown}, "
            "which would be left as plain gradient: use mode gradient, or allow it (strict=False, --allow-plain)"
        )
    warnings.warn(f"{what}: no rule for {shown}; left as plain gradient", PlainGradientWarning, stacklevel=3)
