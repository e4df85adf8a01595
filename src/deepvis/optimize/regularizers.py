"""The paper's regularization operator r_θ, one small object per regularizer.

Every regularizer acts on a batch of images ``x`` (N, C, H, W) measured in 0–255 pixel units **from
the mean image** (x = 0 is the mean image), between gradient steps, each batch element on its own:
percentiles are computed per element, so an element's result never depends on the rest of the batch.
The optimization loop applies them in the paper's order — decay, blur, small-norm clipping,
small-contribution clipping — then :class:`ClipRange` keeps the pixels inside 0–255.

Percentiles follow NumPy's default (linear interpolation between order statistics); a pixel is
zeroed when its score is strictly below the percentile, as in the paper's reference code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "StepInfo",
    "Regularizer",
    "L2Decay",
    "GaussianBlur",
    "ClipSmallNorm",
    "ClipSmallContribution",
    "ClipRange",
    "StayClose",
    "gaussian_kernel",
    "gaussian_blur_symmetric",
    "row_percentile",
]


@dataclass(frozen=True)
class StepInfo:
    """What a regularizer may use: the 0-based ``step`` that just took a gradient step, and ``grad``,
    the gradient of each element's objective with respect to its image (N, C, H, W), per 0–255 pixel."""

    step: int
    grad: torch.Tensor


class Regularizer:
    """``reg(x, info) -> x``: one regularization operation on a batch (N, C, H, W), per element."""

    name = "regularizer"

    def __call__(self, x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in vars(self).items())})"


def _checked_percentile(pct: float) -> float:
    """``pct`` as a float, or a ValueError when it is not a percentile in [0, 100]."""
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile must be in [0, 100], not {pct}")
    return float(pct)


def row_percentile(v: torch.Tensor, pct: float) -> torch.Tensor:
    """The ``pct``-th percentile (0–100) of each row of ``v`` (N, M), NumPy's linear interpolation: (N,)."""
    pct = _checked_percentile(pct)
    m = v.shape[1]
    pos = pct / 100.0 * (m - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, m - 1)
    frac = pos - lo
    v_lo = torch.kthvalue(v, lo + 1, dim=1).values
    if frac == 0 or hi == lo:
        return v_lo
    v_hi = torch.kthvalue(v, hi + 1, dim=1).values
    return v_lo + (v_hi - v_lo) * frac


def _zero_below(x: torch.Tensor, score: torch.Tensor, pct: float) -> torch.Tensor:
    """Zero every pixel (all channels) of ``x`` whose ``score`` (N, H, W) is below its element's percentile."""
    thr = row_percentile(score.flatten(1), pct)
    keep = score >= thr.view(-1, 1, 1)
    return x * keep.unsqueeze(1).to(x.dtype)


class L2Decay(Regularizer):
    """x ← (1 − decay)·x: pulls every pixel toward the mean image (θ_decay)."""

    name = "decay"

    def __init__(self, decay: float) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), not {decay}")
        self.decay = float(decay)

    def __call__(self, x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return x * (1.0 - self.decay)


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> torch.Tensor:
    """The normalized 1-D Gaussian of standard deviation ``sigma`` px, radius ``int(truncate·σ + 0.5)``
    (as ``scipy.ndimage.gaussian_filter``)."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return (k / k.sum()).float()


def _symmetric_index(n: int, radius: int, device: torch.device) -> torch.Tensor:
    """Indices that extend 0..n-1 by ``radius`` on each side, mirroring the edge (d c b a | a b c d)."""
    i = torch.arange(-radius, n + radius, device=device) % (2 * n)
    return torch.where(i < n, i, 2 * n - 1 - i)


def _blur_axis(x: torch.Tensor, k: list[float], dim: int) -> torch.Tensor:
    """Correlate ``x`` with the 1-D kernel ``k`` along ``dim`` (2 or 3), mirroring the edges."""
    r = (len(k) - 1) // 2
    n = x.shape[dim]
    xp = x.index_select(dim, _symmetric_index(n, r, x.device))
    out = xp.narrow(dim, 0, n) * k[0]
    for j in range(1, len(k)):
        out.add_(xp.narrow(dim, j, n), alpha=k[j])
    return out


def gaussian_blur_symmetric(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur each channel of ``x`` (N, C, H, W) with a Gaussian of ``sigma`` px (radius ``4σ``), edges
    extended symmetrically, the edge pixel repeated (``d c b a | a b c d``: NumPy's ``symmetric`` pad,
    ``scipy.ndimage.gaussian_filter(mode="reflect")``, which the paper's code used). Returns the
    blurred batch, same shape; ``x`` itself when ``sigma <= 0``.

    (:func:`deepvis.backprop.gaussian_blur_reflect`, for display maps, does not repeat the edge pixel.)"""
    if sigma <= 0:
        return x
    k = gaussian_kernel(sigma).double().tolist()
    if len(k) == 1:
        return x
    return _blur_axis(_blur_axis(x, k, 3), k, 2)


class GaussianBlur(Regularizer):
    """Blur each channel with σ = ``sigma`` px on steps 0, ``every``, 2·``every``, … (θ_b_width, θ_b_every)."""

    name = "blur"

    def __init__(self, sigma: float, every: int) -> None:
        if sigma < 0 or every < 0:
            raise ValueError("blur width and period must be >= 0")
        self.sigma = float(sigma)
        self.every = int(every)

    def due(self, step: int) -> bool:
        """Whether the blur applies after gradient step ``step`` (0-based)."""
        return self.every > 0 and self.sigma > 0 and step % self.every == 0

    def __call__(self, x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        return gaussian_blur_symmetric(x, self.sigma) if self.due(info.step) else x


class ClipSmallNorm(Regularizer):
    """Zero the pixels whose norm across channels is below the ``percentile``-th percentile (θ_n_pct)."""

    name = "norm_clip"

    def __init__(self, percentile: float) -> None:
        self.percentile = _checked_percentile(percentile)

    def __call__(self, x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        if self.percentile <= 0:
            return x
        return _zero_below(x, x.pow(2).sum(1).sqrt(), self.percentile)  # (x.norm(dim=1) is 100x slower on the CPU)


class ClipSmallContribution(Regularizer):
    """Zero the pixels whose contribution |Σ_c x ∘ ∇x a(x)| is below the ``percentile``-th percentile
    (θ_c_pct). The contribution is the linearized change of the activation if the pixel were set to the
    mean image."""

    name = "contribution_clip"

    def __init__(self, percentile: float) -> None:
        self.percentile = _checked_percentile(percentile)

    def __call__(self, x: torch.Tensor, info: StepInfo) -> torch.Tensor:
        if self.percentile <= 0:
            return x
        return _zero_below(x, (x * info.grad).sum(1).abs(), self.percentile)


class _Clamp(torch.autograd.Function):
    """``max(min(x, high), low)`` whose backward passes the gradient where ``low ≤ x ≤ high`` and 0
    elsewhere (as ``torch.maximum``/``torch.minimum`` do, but for a tie — ``x`` exactly on a bound — where
    they pass half), from one boolean mask saved in the forward pass."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
        y = torch.clamp(x, low, high)  # the same values as max(min(x, high), low)
        ctx.save_for_backward(y == x)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (inside,) = ctx.saved_tensors  # type: ignore[attr-defined]  # autograd sets saved_tensors on the context
        return g * inside, None, None


class ClipRange(Regularizer):
    """Keep every pixel inside the valid range: ``low ≤ x ≤ high`` per channel (C,) (for 0–255 pixels
    measured from the mean image, ``low = −mean``, ``high = 255 − mean``)."""

    name = "clip_range"

    def __init__(self, low: torch.Tensor, high: torch.Tensor) -> None:
        self.low = torch.as_tensor(low, dtype=torch.float32).flatten()
        self.high = torch.as_tensor(high, dtype=torch.float32).flatten()

    def __call__(self, x: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
        low = self.low.to(x.device, x.dtype).view(1, -1, 1, 1)
        high = self.high.to(x.device, x.dtype).view(1, -1, 1, 1)
        if x.requires_grad:  # MACO clips the image the model sees, inside the graph: one saved mask for the backward
            out: torch.Tensor = _Clamp.apply(x, low, high)
            return out
        return torch.maximum(torch.minimum(x, high), low)


class StayClose(Regularizer):
    """Feature accentuation's pixel anchor: project each element back into the ball of RMS radius
    ``radius`` (0–255 levels per pixel and channel) around its start image ``x0`` (N, C, H, W, from the
    mean): ``x ← x0 + (x − x0)·min(1, radius / rms(x − x0))``. ``radius = inf`` never projects."""

    name = "stay_close"

    def __init__(self, x0: torch.Tensor, radius: float) -> None:
        if not radius > 0:
            raise ValueError(f"the distance bound must be > 0 levels, not {radius}")
        self.x0 = x0
        self.radius = float(radius)

    def __call__(self, x: torch.Tensor, info: StepInfo | None = None) -> torch.Tensor:
        d = x - self.x0
        rms = d.pow(2).flatten(1).mean(1).sqrt()
        k = (self.radius / rms.clamp_min(1e-12)).clamp_max(1.0)
        return self.x0 + d * k.view(-1, *([1] * (d.ndim - 1)))

    def __repr__(self) -> str:
        return f"StayClose(radius={self.radius})"
