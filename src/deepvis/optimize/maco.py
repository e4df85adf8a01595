"""MACO (Fel et al. 2023, "Unlocking feature visualization for deeper networks with magnitude constrained
optimization"): optimize only the Fourier phase of the image, its magnitude fixed to that of natural
images, and report where the image matters (an alpha mask).

**The magnitude.** ``data/maco_spectrum.npy`` holds the mean amplitude spectrum of natural photos, float32
(3, 128, 65): channel (R, G, B), y frequency (``fftfreq`` order), x frequency (``rfftfreq`` order), in
0–255 pixel units under the orthonormal 2-D FFT, DC set to 0 (deepvis measures images from the mean
image). ``scripts/make_maco_spectrum.py`` made it once from the offline sample photos (128 random
128x128 crops of eight photos). :func:`natural_spectrum` resamples it to any canvas by bilinear
interpolation in cycles per pixel (a natural image's power at a given cycles-per-pixel frequency does
not depend on the crop's size under the orthonormal FFT). A random-phase image with it has an RMS of
about 40–48 levels per channel, like the photos themselves.

**The parameterization.** :class:`MacoParam`: the parameter is the phase φ (N, C, H, W//2+1) in radians;
the image is ``irfft2(A·e^{iφ})`` with ``A`` the natural spectrum. The phase of the columns the real FFT
stores once (x frequency 0 and, for even W, W/2) is made odd in y first, so the spectrum is Hermitian and
the image's amplitude spectrum is exactly ``A`` whatever φ is. The inverse (``from_image``) keeps the
image's phase and drops its magnitude: a projection, not an exact inverse, so the loop feeds the model
the image clipped to valid pixels (``exact_inverse`` False) and never clips the phase itself.

**The alpha mask.** :class:`AttributionMask` accumulates, over the steps, each pixel's attribution
``|Σ_c x ∘ ∇x a(x)|`` (x from the mean image: the linearized change of the objective if the pixel were
the mean image; the paper accumulates gradient-times-image attributions the same way) and normalizes
each element: blurred (σ = 2 % of the side) and divided by its 99th percentile, clipped: (H, W) in
[0, 1], 1 where the image matters most.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..pixels import to_uint8
from .regularizers import gaussian_blur_symmetric, row_percentile

__all__ = ["SPECTRUM_FILE", "natural_spectrum", "MacoParam", "AttributionMask", "alpha_image", "masked_image", "amplitude_spectrum"]

#: the alpha mask is 1 from this percentile of the (blurred) attribution up
ALPHA_PERCENTILE = 99.0

#: the stored natural-image amplitude spectrum (see the module docstring)
SPECTRUM_FILE = Path(__file__).resolve().parent / "data" / "maco_spectrum.npy"


@functools.lru_cache(maxsize=1)
def _stored_spectrum() -> np.ndarray:
    """The stored spectrum (3, 128, 65), read once (read-only)."""
    arr = np.load(SPECTRUM_FILE)
    arr.setflags(write=False)
    return arr


def natural_spectrum(h: int, w: int, channels: int = 3) -> torch.Tensor:
    """The natural-image amplitude spectrum resampled to an (h, w) canvas: float32 (channels, h, w//2+1)
    in 0–255 pixel units (orthonormal FFT), DC 0. One channel: the mean of R, G and B; more than three:
    that mean repeated."""
    src = torch.from_numpy(np.array(_stored_spectrum(), dtype=np.float32))  # (3, H0, W0//2+1)
    if channels != 3:
        src = src.mean(0, keepdim=True).expand(channels, -1, -1)
    h0 = src.shape[1]
    w0 = 2 * (src.shape[2] - 1)
    shifted = torch.fft.fftshift(src, dim=1)  # y frequency from -1/2 up to 1/2 - 1/h0
    fy = torch.fft.fftfreq(h, dtype=torch.float64)  # target frequencies, cycles per pixel
    fx = torch.fft.rfftfreq(w, dtype=torch.float64)
    # source grid: fy_k = (k - h0//2)/h0, k = 0..h0-1; fx_j = j/w0, j = 0..w0/2 (align_corners=True coordinates)
    gy = ((fy * h0 + h0 // 2) / (h0 - 1)) * 2 - 1
    gx = ((fx * w0) / (src.shape[2] - 1)) * 2 - 1
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1).float()  # (h, w//2+1, 2): (x, y)
    out = F.grid_sample(shifted.unsqueeze(0), grid.unsqueeze(0), mode="bilinear", padding_mode="border", align_corners=True)[0]
    out[:, 0, 0] = 0.0
    return out.contiguous()


def _edge_columns(h: int, w: int) -> list[int]:
    """The x-frequency columns of an (h, w) real FFT that it stores once: 0 and, for even w, w/2."""
    return [0] + ([w // 2] if w % 2 == 0 and w // 2 != 0 else [])


def _odd_edge_columns(phase: torch.Tensor, w: int) -> torch.Tensor:
    """``phase`` (N, C, H, W//2+1) with the columns the real FFT stores once (x frequency 0 and W/2 for
    even W) made odd in y: φ[−k] = −φ[k], so that ``A·e^{iφ}`` is a Hermitian spectrum."""
    h = phase.shape[-2]
    idx = (-torch.arange(h, device=phase.device)) % h
    out = phase.clone()
    for c in _edge_columns(h, w):
        col = phase[..., c]
        out[..., c] = 0.5 * (col - col.index_select(-1, idx))
    return out


class _PhaseToImage(torch.autograd.Function):
    """``irfft2(A·e^{iφ'})`` (orthonormal) with φ' the phase made odd on the edge columns, and its gradient
    in closed form: one forward and one backward FFT, elementwise work on the phase's half spectrum only.

    Forward: ``e = polar(A, φ)`` in one pass, its edge columns redone with the odd phase (no copy of the
    whole phase). Backward: with ``G = rfft2(∂L/∂x)`` (orthonormal), ``∂L/∂φ' = w·(Im G·Re e − Re G·Im e)``,
    ``w`` = 2 on the columns the real FFT stands for twice, 1 on the edge columns (what ``irfft2``'s own
    backward does); the odd projection is symmetric, so its adjoint is itself:
    ``∂L/∂φ[k] = ½(∂L/∂φ'[k] − ∂L/∂φ'[−k])`` on the edge columns. Equal to autograd through
    ``torch.polar`` and ``irfft2`` up to float rounding (tested).
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, phase: torch.Tensor, a: torch.Tensor, weights: torch.Tensor, h: int, w: int
    ) -> torch.Tensor:
        e = torch.polar(a, phase)  # a (C, H, W//2+1) broadcasts over the batch
        idx = (-torch.arange(h, device=phase.device)) % h
        for c in _edge_columns(h, w):
            col = phase[..., c]
            e[..., c] = torch.polar(a[..., c], 0.5 * (col - col.index_select(-1, idx)))
        ctx.save_for_backward(e, weights)
        ctx.hw = (h, w)  # type: ignore[attr-defined]  # the context carries what backward needs
        return torch.fft.irfft2(e, s=(h, w), norm="ortho")

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, gx: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        e, weights = ctx.saved_tensors  # type: ignore[attr-defined]  # autograd sets saved_tensors on the context
        h, w = ctx.hw  # type: ignore[attr-defined]  # set in forward
        g, er = torch.view_as_real(torch.fft.rfft2(gx, norm="ortho")), torch.view_as_real(e)
        gp = (g[..., 1] * er[..., 0] - g[..., 0] * er[..., 1]) * weights
        idx = (-torch.arange(h, device=gp.device)) % h
        for c in _edge_columns(h, w):
            col = gp[..., c].clone()
            gp[..., c] = 0.5 * (col - col.index_select(-1, idx))
        return gp, None, None, None, None


class MacoParam:
    """MACO: phase-only parameterization with a fixed natural amplitude spectrum (see the module docstring).

    ``magnitude`` (C, H, W//2+1), optional: a fixed spectrum to use instead of :func:`natural_spectrum`
    (tests, or a spectrum of your own data); it must match the canvas it is used on.
    """

    name = "maco"
    identity = False
    #: the inverse keeps only the phase: the loop clips the image the model sees instead of the parameters
    exact_inverse = False

    def __init__(self, magnitude: torch.Tensor | None = None) -> None:
        self.magnitude = None if magnitude is None else torch.as_tensor(magnitude, dtype=torch.float32)
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def spectrum(self, c: int, h: int, w: int, device: torch.device) -> torch.Tensor:
        """The fixed amplitude spectrum (C, H, W//2+1) of a (C, H, W) canvas on ``device``."""
        return self._spectra(c, h, w, device)[0]

    def _spectra(self, c: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed spectrum ``A``, float32 (C, H, W//2+1), and the real FFT's column weights (W//2+1,)
        (2, 1 on the edge columns; :class:`_PhaseToImage`), on ``device``, made once per canvas."""
        key = (c, h, w, device)
        if key not in self._cache:
            if self.magnitude is not None:
                if tuple(self.magnitude.shape) != (c, h, w // 2 + 1):
                    raise ValueError(f"MACO magnitude has shape {tuple(self.magnitude.shape)}, the canvas needs {(c, h, w // 2 + 1)}")
                m = self.magnitude
            else:
                m = natural_spectrum(h, w, c)
            m = m.to(device, torch.float32).contiguous()
            weights = torch.full((w // 2 + 1,), 2.0, device=device)
            weights[_edge_columns(h, w)] = 1.0
            self._cache[key] = (m, weights)
        return self._cache[key]

    def to_image(self, p: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Phases (N, C, H, W//2+1), radians → image (N, C, H, W) in 0–255 pixels from the mean, whose
        amplitude spectrum is exactly the fixed one (differentiable: :class:`_PhaseToImage`)."""
        h, w = size
        a, weights = self._spectra(p.shape[1], h, w, p.device)
        out: torch.Tensor = _PhaseToImage.apply(p, a.to(p.dtype), weights.to(p.dtype), h, w)
        return out

    def from_image(self, x: torch.Tensor) -> torch.Tensor:
        """Image (N, C, H, W) → its phase (N, C, H, W//2+1): the closest fixed-magnitude image keeps it."""
        return torch.angle(torch.fft.rfft2(x, norm="ortho")).contiguous()


def amplitude_spectrum(x: torch.Tensor) -> torch.Tensor:
    """``|rfft2(x)|`` (orthonormal) of images (…, H, W) in 0–255 pixels from the mean: (…, H, W//2+1)."""
    return torch.fft.rfft2(x.double(), norm="ortho").abs()


class AttributionMask:
    """Accumulates ``|Σ_c x ∘ ∇x a|`` per pixel over the steps (N, H, W); :meth:`mask` → [0, 1]."""

    def __init__(self, n: int, size: tuple[int, int], device: torch.device) -> None:
        self.total = torch.zeros(n, *size, device=device)

    def record(self, x: torch.Tensor, grad: torch.Tensor, active: torch.Tensor) -> None:
        """One step: images ``x`` (N, C, H, W) from the mean, their gradients ``grad``; only ``active`` (N,) count."""
        self.total += (x * grad).sum(1).abs() * active.view(-1, 1, 1).to(x.dtype)

    def mask(self) -> torch.Tensor:
        """The alpha mask (N, H, W) in [0, 1]: each element's accumulation, blurred (σ = 2 % of the
        canvas side, so that a region rather than single pixels stands out) and divided by its
        :data:`ALPHA_PERCENTILE`-th percentile (clipped to 1; 0 where nothing was accumulated)."""
        h, w = self.total.shape[-2:]
        smooth = gaussian_blur_symmetric(self.total.unsqueeze(1), 0.02 * max(h, w))[:, 0]
        peak = row_percentile(smooth.flatten(1), ALPHA_PERCENTILE).clamp_min(torch.finfo(smooth.dtype).tiny)
        return (smooth / peak.view(-1, 1, 1)).clamp(0, 1)


def alpha_image(alpha: torch.Tensor) -> Image.Image:
    """The alpha mask (H, W) in [0, 1] as a grayscale picture (``L``, 255 = matters most)."""
    return Image.fromarray(to_uint8(alpha.detach().float().cpu().numpy()), "L")


def masked_image(display: Image.Image, alpha: torch.Tensor) -> Image.Image:
    """The display picture with the alpha mask (H, W) in [0, 1] as its transparency (``RGBA``): what
    matters stays opaque, the rest fades out (the paper's masked visualizations)."""
    rgba = display.convert("RGBA")
    a = alpha_image(alpha)
    if a.size != rgba.size:
        a = a.resize(rgba.size, Image.Resampling.BILINEAR)
    rgba.putalpha(a)
    return rgba
