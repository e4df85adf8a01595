"""Display filters for backprop views, as in the original toolbox, and an overlay on the input.

Every filter maps a gradient (C, H, W) to an RGB picture (H, W, 3) uint8, scaled by its own largest
magnitude (or a percentile of it; so a dead unit's all-zero view is black, or mid-gray for the centered filters):

* ``raw``: the signed sum over channels, positive green, negative red, zero black;
* ``rgb``: the gradient's channels as colours around mid-gray (the original toolbox's "raw");
* ``gray``: the channel mean around mid-gray (through ``colormap``);
* ``norm``: the L2 norm over channels, 0 black (through ``colormap``);
* ``normblur``: ``norm`` blurred with a Gaussian (sigma 4 px at 224 px, scaled with the input).

:data:`READABLE` (``norm`` at the 99th percentile) is how views are drawn by default everywhere (the live
toolbox, ``deepvis backprop``, a result in a notebook); :data:`RAW` is the signed view at full scale.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..choices import BACKPROP_FILTERS as FILTERS
from ..choices import OVERLAY_ALPHA
from ..choices import RAW_BACKPROP as RAW
from ..choices import READABLE_BACKPROP as READABLE
from ..choices import BackpropDisplay as Display
from ..choices import BackpropFilter as Filter
from ..errors import DeepvisError
from ..pixels import to_uint8
from ..render.colormap import apply_colormap

if TYPE_CHECKING:  # views draws its results with backprop_image
    from .views import BackpropResult

__all__ = [
    "FILTERS",
    "Filter",
    "Display",
    "READABLE",
    "RAW",
    "OVERLAY_ALPHA",
    "filter_map",
    "backprop_image",
    "overlay",
    "gaussian_blur_reflect",
]


def _grad(g: BackpropResult | torch.Tensor | np.ndarray) -> torch.Tensor:
    if not isinstance(g, (torch.Tensor, np.ndarray)):  # a BackpropResult
        g = g.grad
    t = torch.as_tensor(g).detach().float().cpu()
    if t.ndim == 2:
        t = t.unsqueeze(0)
    if t.ndim != 3:
        raise DeepvisError(f"expected a gradient of shape (C, H, W), got {tuple(t.shape)}")
    return t


def gaussian_blur_reflect(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur a (H, W) map with a separable Gaussian of ``sigma`` px (radius ``3σ``, at least 1), edges
    reflected about the edge pixel, which is not repeated (``d c b | a b c d``: PyTorch's and NumPy's
    ``reflect`` pad, scipy's ``mirror``); a map narrower than the kernel pads as far as it can, a map
    one pixel wide repeats it. Returns the blurred (H, W) map; ``x`` itself when ``sigma <= 0``.

    (:func:`deepvis.optimize.gaussian_blur_symmetric`, the paper's regularizer, repeats the edge pixel.)"""
    if sigma <= 0:
        return x
    radius = max(1, int(3 * sigma + 0.5))
    r = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    k = torch.exp(-(r**2) / (2 * sigma**2))
    k = k / k.sum()
    t = x[None, None]
    pad_h, pad_w = min(radius, x.shape[0] - 1), min(radius, x.shape[1] - 1)
    t = F.pad(t, (pad_w, pad_w, pad_h, pad_h), mode="reflect" if min(x.shape) > 1 else "replicate")
    t = F.conv2d(t, k[radius - pad_h : radius + pad_h + 1].view(1, 1, -1, 1))
    t = F.conv2d(t, k[radius - pad_w : radius + pad_w + 1].view(1, 1, 1, -1))
    return t[0, 0]


def _scaled(v: torch.Tensor, percentile: float = 100.0) -> torch.Tensor:
    a = v.abs().flatten()
    if not a.numel():
        return v
    m = float(a.max()) if percentile >= 100 else float(torch.quantile(a[:: max(1, a.numel() // 2**20)], percentile / 100.0))
    return (v / m).clamp(-1, 1) if m > 0 else torch.zeros_like(v)


def filter_map(
    grad: BackpropResult | torch.Tensor | np.ndarray,
    filter: Filter = "raw",
    *,
    blur_sigma: float | None = None,
    percentile: float = 100.0,
) -> np.ndarray:
    """The filtered view as floats: (H, W) in [-1, 1] for raw/gray, [0, 1] for norm/normblur, (H, W, C) in
    [-1, 1] for rgb. Values are divided by their ``percentile``-th magnitude (100: the maximum) and clipped."""
    if not 0 < percentile <= 100:
        raise DeepvisError(f"percentile must be in (0, 100], got {percentile}")
    g = _grad(grad)
    if filter == "raw":
        return _scaled(g.sum(0), percentile).numpy()
    if filter == "rgb":
        return _scaled(g, percentile).permute(1, 2, 0).numpy()
    if filter == "gray":
        return _scaled(g.mean(0), percentile).numpy()
    if filter in ("norm", "normblur"):
        n = g.norm(dim=0)
        if filter == "normblur":
            sigma = 4.0 * max(g.shape[1:]) / 224.0 if blur_sigma is None else blur_sigma
            n = gaussian_blur_reflect(n, sigma)
        return _scaled(n, percentile).numpy()
    raise DeepvisError(f"unknown filter {filter!r}: use one of {', '.join(FILTERS)}")


def backprop_image(
    grad: BackpropResult | torch.Tensor | np.ndarray,
    filter: Filter = "raw",
    *,
    colormap: str = "gray",
    blur_sigma: float | None = None,
    percentile: float = 100.0,
) -> np.ndarray:
    """The view as an RGB picture (H, W, 3) uint8 (``colormap`` applies to gray, norm and normblur;
    ``percentile`` < 100 saturates the strongest values for contrast)."""
    v = filter_map(grad, filter, blur_sigma=blur_sigma, percentile=percentile)
    if filter == "raw":
        out = np.zeros((*v.shape, 3), dtype=np.float32)
        out[..., 0] = np.clip(-v, 0, 1)
        out[..., 1] = np.clip(v, 0, 1)
        return to_uint8(out)
    if filter == "rgb":
        rgb = 0.5 + 0.5 * v
        if rgb.shape[2] == 1:
            rgb = np.repeat(rgb, 3, axis=2)
        return to_uint8(rgb[..., :3])
    if filter == "gray":
        return apply_colormap(0.5 + 0.5 * v, colormap)
    return apply_colormap(v, colormap)


def overlay(image: Image.Image | np.ndarray, view: np.ndarray, *, alpha: float = OVERLAY_ALPHA) -> np.ndarray:
    """Blend a view (H, W, 3) uint8 over the input image of the same size: ``(1-alpha)·image + alpha·view``."""
    img = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    if img.shape[:2] != view.shape[:2]:
        raise DeepvisError(f"overlay: the image is {img.shape[1]}x{img.shape[0]} but the view is {view.shape[1]}x{view.shape[0]}")
    if not 0.0 <= alpha <= 1.0:
        raise DeepvisError(f"overlay alpha must be in [0, 1], got {alpha}")
    out = (1.0 - alpha) * img[..., :3].astype(np.float32) + alpha * view.astype(np.float32)
    return to_uint8(out, scale=1.0)
