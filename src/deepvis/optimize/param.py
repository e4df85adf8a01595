"""Image parameterizations: how the optimized parameters become an image.

The image ``x`` (N, C, H, W) is always in 0–255 pixel units measured from the mean image (see
:mod:`deepvis.optimize.regularizers`). A parameterization maps a real parameter tensor ``p`` to ``x``
(``to_image``, differentiable) and back (``from_image``, its exact inverse), so that the paper's
regularizers and the valid-range clip always act on the image itself whatever is being optimized.

* :class:`ImageParam` ``()`` — pixels (the paper's choice): ``x = p``.
* ``ImageParam(fourier=True)`` — ``p`` holds the image's 2-D spectrum scaled by ``1/f^decay_power``
  (normalized so that a white spectrum keeps its energy), so a gradient step moves low frequencies
  more: smoother images with the same objective (Lucid's Fourier parameterization).
* ``ImageParam(decorrelate=True)`` — ``p`` holds decorrelated color channels and ``x = M·y`` with
  ``M`` the square root of the RGB covariance of natural photos (:data:`COLOR_CORRELATION_SQRT`), so
  steps move along natural color directions.

Both are linear and exactly invertible, and both act on each batch element separately.

* :class:`~deepvis.optimize.maco.MacoParam` (``Settings(maco=True)``) — MACO: ``p`` is the phase, the
  magnitude is fixed to a natural-image spectrum; its inverse is a projection (``exact_inverse`` False).

:func:`make_param` picks one from the settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .maco import MacoParam

if TYPE_CHECKING:
    from .presets import Settings

__all__ = ["ImageParam", "COLOR_CORRELATION_SQRT", "fourier_scale", "make_param"]

#: Symmetric square root of the RGB covariance (0–1 pixels) of the offline sample photos astronaut,
#: chelsea, china, coffee, flower, grace_hopper, motorcycle and rocket (50 000 random pixels each),
#: scaled so that its largest column has norm 1. Computed with ``scripts/color_correlation.py``.
COLOR_CORRELATION_SQRT = (
    (0.8941, 0.3942, 0.2124),
    (0.3942, 0.5786, 0.4276),
    (0.2124, 0.4276, 0.6950),
)


def fourier_scale(h: int, w: int, decay_power: float = 1.0) -> torch.Tensor:
    """Per-frequency gain (h, w//2+1) of the Fourier parameterization: ``1 / max(f, 1/max(h, w))^decay_power``
    for ``f`` in cycles per pixel, normalized to a mean square of 1."""
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)[None, :]
    f = torch.sqrt(fy**2 + fx**2).clamp_min(1.0 / max(h, w))
    s = f ** (-decay_power)
    return (s / s.pow(2).mean().sqrt()).float()


class ImageParam:
    """Pixel (default), Fourier and/or decorrelated-color parameterization of a batch of images."""

    #: ``from_image`` is the exact inverse of ``to_image`` (so clipping the image clips the parameters)
    exact_inverse = True

    def __init__(self, *, fourier: bool = False, decorrelate: bool = False, decay_power: float = 1.0) -> None:
        self.fourier = bool(fourier)
        self.decorrelate = bool(decorrelate)
        self.decay_power = float(decay_power)
        self._cache: dict[tuple, torch.Tensor] = {}

    @property
    def identity(self) -> bool:
        """True for plain pixels: the parameter is the image."""
        return not (self.fourier or self.decorrelate)

    @property
    def name(self) -> str:
        parts = ["fourier" if self.fourier else "pixel"]
        if self.decorrelate:
            parts.append("decorrelated")
        return "+".join(parts)

    def _color(self, c: int, like: torch.Tensor, inverse: bool = False) -> torch.Tensor | None:
        if not self.decorrelate or c != 3:
            return None
        key = ("color", inverse, like.device, like.dtype)
        if key not in self._cache:
            m = torch.tensor(COLOR_CORRELATION_SQRT, dtype=torch.float64)
            self._cache[key] = (torch.linalg.inv(m) if inverse else m).to(like.device, like.dtype)
        return self._cache[key]

    def _scale(self, h: int, w: int, like: torch.Tensor) -> torch.Tensor:
        key = ("fourier", h, w, like.device)
        if key not in self._cache:
            self._cache[key] = fourier_scale(h, w, self.decay_power).to(like.device)
        return self._cache[key]

    def to_image(self, p: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Parameters → image (N, C, H, W) of ``size`` (H, W) in 0–255 pixels from the mean (differentiable)."""
        if self.identity:
            return p
        if self.fourier:
            h, w = size
            spec = torch.view_as_complex(p.contiguous()) * self._scale(h, w, p)
            y = torch.fft.irfft2(spec, s=(h, w), norm="ortho")
        else:
            y = p
        m = self._color(y.shape[1], y)
        return torch.einsum("ij,njhw->nihw", m, y) if m is not None else y

    def from_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image (N, C, H, W) → parameters (the exact inverse of :meth:`to_image`)."""
        if self.identity:
            return x
        m = self._color(x.shape[1], x, inverse=True)
        y = torch.einsum("ij,njhw->nihw", m, x) if m is not None else x
        if not self.fourier:
            return y
        h, w = y.shape[-2:]
        spec = torch.fft.rfft2(y, norm="ortho") / self._scale(h, w, y)
        return torch.view_as_real(spec).contiguous()


def make_param(settings: Settings) -> ImageParam | MacoParam:
    """The parameterization ``settings`` asks for: :class:`~deepvis.optimize.maco.MacoParam` when
    ``settings.maco``, else :class:`ImageParam` (pixels, Fourier and/or decorrelated)."""
    if settings.maco:
        return MacoParam()
    return ImageParam(fourier=settings.fourier, decorrelate=settings.decorrelate, decay_power=settings.decay_power)
