"""Turning an optimized image into pictures: the raw image as the model saw it, and a display version."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..pixels import to_uint8

__all__ = ["raw_image", "display_image", "DISPLAY_PERCENTILE"]

#: the display version maps this percentile of |x − mean| to full contrast (a few extreme pixels saturate)
DISPLAY_PERCENTILE = 99.5


def _to_pil(arr: np.ndarray) -> Image.Image:
    """(C, H, W) values on the 0–255 scale → a Pillow image (``L`` or ``RGB``), rounded to whole levels."""
    arr = to_uint8(arr, scale=1.0)
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0], "L")
    return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), "RGB")


def raw_image(image: torch.Tensor) -> Image.Image:
    """(C, H, W) pixels in 0–255 → the image exactly as the model saw it (rounded to whole pixel levels)."""
    return _to_pil(image.detach().float().cpu().numpy())


def display_image(image: torch.Tensor, mean: Sequence[float], *, percentile: float = DISPLAY_PERCENTILE) -> Image.Image:
    """(C, H, W) pixels in 0–255 → contrast-stretched for viewing around the mean image (``mean``: one
    0–255 value per channel, shown as mid-gray): ``128 + 127·(x − mean)/s`` with ``s`` the
    ``percentile``-th percentile of ``|x − mean|`` over all pixels and channels. The raw optimum sits close
    to the mean image and looks nearly gray; this is how the paper's figures show it."""
    x = image.detach().double().cpu()
    d = x - torch.as_tensor(list(mean), dtype=torch.float64).view(-1, 1, 1)
    s = float(np.percentile(d.abs().numpy(), percentile))
    if s <= 0:
        s = float(d.abs().max())
    out = 128.0 + 127.0 * (d / s if s > 0 else d * 0)
    return _to_pil(out.numpy())
