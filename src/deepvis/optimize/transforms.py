"""Transformation robustness (beyond the paper, off in its presets): random jitter, scale and rotation.

Before each forward pass every batch element is moved by its own random affine warp: shifted by a
whole number of pixels in [−jitter, jitter] on each axis, scaled by a factor in [scale_low,
scale_high] and rotated by an angle in [−rotate, rotate] degrees, all drawn from the element's own
random stream (so an element's warps do not depend on the rest of the batch). Uncovered areas show
the mean image. The objective then has to hold up under small moves, which discourages
high-frequency patterns that only work pixel-exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["RandomAffine"]


class RandomAffine:
    """Random per-element jitter (px), scale (factor range) and rotation (degrees) in one warp."""

    def __init__(self, jitter: float = 0, scale: tuple[float, float] = (1.0, 1.0), rotate: float = 0.0) -> None:
        if jitter < 0 or rotate < 0:
            raise ValueError("jitter and rotate must be >= 0")
        lo, hi = float(scale[0]), float(scale[1])
        if not 0 < lo <= hi:
            raise ValueError(f"scale range must satisfy 0 < low <= high, not {scale}")
        self.jitter = int(round(jitter))
        self.scale = (lo, hi)
        self.rotate = float(rotate)

    @property
    def active(self) -> bool:
        return self.jitter > 0 or self.scale != (1.0, 1.0) or self.rotate > 0

    def sample(self, generators: Sequence[torch.Generator]) -> torch.Tensor:
        """Draw (N, 4) warp parameters — shift x, shift y (px), scale, angle (radians) — one row per
        element from its own generator."""
        rows = []
        for g in generators:
            u = torch.rand(4, generator=g, dtype=torch.float64)
            j = self.jitter
            dx = math.floor(float(u[0]) * (2 * j + 1)) - j
            dy = math.floor(float(u[1]) * (2 * j + 1)) - j
            lo, hi = self.scale
            s = lo + (hi - lo) * float(u[2])
            a = math.radians(self.rotate * (2 * float(u[3]) - 1))
            rows.append((dx, dy, s, a))
        return torch.tensor(rows, dtype=torch.float64)

    def __call__(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Warp ``x`` (N, C, H, W) by ``params`` (N, 4) from :meth:`sample`; the mean image (0) fills in."""
        if not self.active:
            return x
        n, _, h, w = x.shape
        dx, dy, s, a = params.unbind(1)
        cos, sin = torch.cos(a) / s, torch.sin(a) / s
        # pixel space: in = R(-a)/s · (out − t); normalized space: D·A·D⁻¹ with D = diag(2/W, 2/H)
        theta = torch.zeros(n, 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = cos
        theta[:, 0, 1] = sin * h / w
        theta[:, 1, 0] = -sin * w / h
        theta[:, 1, 1] = cos
        tx, ty = 2 * dx / w, 2 * dy / h
        theta[:, 0, 2] = -(theta[:, 0, 0] * tx + theta[:, 0, 1] * ty)
        theta[:, 1, 2] = -(theta[:, 1, 0] * tx + theta[:, 1, 1] * ty)
        grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    def __repr__(self) -> str:
        return f"RandomAffine(jitter={self.jitter}, scale={self.scale}, rotate={self.rotate})"
