"""Turning an optimized image into pictures: the raw image as the model saw it, and a display version."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..pixels import to_uint8

__all__ = [
    "raw_image",
    "display_image",
    "contrast",
    "contrast_text",
    "contrast_caption",
    "faint_flag",
    "levels_text",
    "DISPLAY_PERCENTILE",
    "FAINT_RMS",
]

#: the display version maps this percentile of |x − mean| to full contrast (a few extreme pixels saturate)
DISPLAY_PERCENTILE = 99.5
#: a raw image closer than this to the mean image (RMS over pixels and channels, 0–255 levels) is *faint*:
#: under 1 % of the range, hard to tell from flat grey on a screen (the eight calibration photos lie
#: 44–90 levels from the default model's mean image), so its display version is a pattern magnified many times
FAINT_RMS = 2.0


def _to_pil(arr: np.ndarray) -> Image.Image:
    """(C, H, W) values on the 0–255 scale → a Pillow image (``L`` or ``RGB``), rounded to whole levels."""
    arr = to_uint8(arr, scale=1.0)
    if arr.shape[0] == 1:
        return Image.fromarray(arr[0], "L")
    return Image.fromarray(np.ascontiguousarray(arr.transpose(1, 2, 0)), "RGB")


def raw_image(image: torch.Tensor) -> Image.Image:
    """(C, H, W) pixels in 0–255 → the image exactly as the model saw it (rounded to whole pixel levels)."""
    return _to_pil(image.detach().float().cpu().numpy())


def _from_mean(image: torch.Tensor | Image.Image, mean: Sequence[float]) -> torch.Tensor:
    """``image`` − the mean image, (C, H, W) float64 on the 0–255 scale (a Pillow image as its pixels)."""
    if isinstance(image, Image.Image):
        arr = np.asarray(image, dtype=np.float64)
        x = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())
    else:
        x = image.detach().double().cpu()
    m = torch.as_tensor(list(mean), dtype=torch.float64)
    if m.numel() not in (1, x.shape[0]):
        raise ValueError(f"the mean has {m.numel()} channels and the image {x.shape[0]}")
    return x - m.view(-1, 1, 1)


def _display_scale(d: torch.Tensor, percentile: float) -> float:
    """``s`` of :func:`display_image`: the ``percentile``-th percentile of ``|d|`` (its maximum when that is 0)."""
    s = float(np.percentile(d.abs().numpy(), percentile))
    return s if s > 0 else float(d.abs().max())


def contrast(image: torch.Tensor | Image.Image, mean: Sequence[float]) -> dict[str, Any]:
    """How far an optimized image lies from the mean image, a quality figure: ``rms`` (0–255 levels, over
    pixels and channels), ``peak`` (the :data:`DISPLAY_PERCENTILE`-th percentile of ``|x − mean|``, which
    :func:`display_image` maps to full contrast), ``stretch`` (``127 / peak``: how many times the display
    version magnifies the pattern; None for an image equal to the mean) and ``faint`` (``rms`` below
    :data:`FAINT_RMS`). ``image``: (C, H, W) 0–255 pixels or the raw picture; ``mean``: one value per channel."""
    d = _from_mean(image, mean)
    s = _display_scale(d, DISPLAY_PERCENTILE)
    rms = float(d.pow(2).mean().sqrt())
    return {"rms": rms, "peak": s, "stretch": 127.0 / s if s > 0 else None, "faint": rms < FAINT_RMS}


def levels_text(v: float) -> str:
    """A distance in 0–255 levels as text: one decimal under 10 (``0.4``, ``6.0``), whole levels above (``37``)."""
    return f"{v:.1f}" if v < 10 else f"{v:.0f}"


def contrast_text(figure: Mapping[str, Any]) -> str:
    """A :func:`contrast` figure as text: ``12 levels RMS``, or for a faint image ``0.4 levels RMS (faint:
    shown 85x)``, how many times its display version magnifies it."""
    text = f"{levels_text(figure['rms'])} levels RMS"
    if figure["faint"] and figure["stretch"] is not None:
        text += f" (faint: shown {figure['stretch']:.0f}x)"
    return text


def contrast_caption(figure: Mapping[str, Any]) -> str:
    """A :func:`contrast` figure in a caption's few characters: ``RMS 12``, or ``RMS 0.4 faint``."""
    return f"RMS {levels_text(figure['rms'])}" + (" faint" if figure["faint"] else "")


def faint_flag(figure: Mapping[str, Any]) -> str:
    """The flag of a faint image's :func:`contrast` figure, e.g. ``faint: the raw image is 0.4 levels RMS from
    the mean image (it looks flat grey); its display version magnifies it 85x``."""
    stretch = figure.get("stretch")
    magnified = f"; its display version magnifies it {stretch:.0f}x" if stretch is not None else ""
    return f"faint: the raw image is {levels_text(figure['rms'])} levels RMS from the mean image (it looks flat grey){magnified}"


def display_image(image: torch.Tensor, mean: Sequence[float], *, percentile: float = DISPLAY_PERCENTILE) -> Image.Image:
    """(C, H, W) pixels in 0–255 → contrast-stretched for viewing around the mean image (``mean``: one
    0–255 value per channel, shown as mid-gray): ``128 + 127·(x − mean)/s`` with ``s`` the
    ``percentile``-th percentile of ``|x − mean|`` over all pixels and channels. The raw optimum sits close
    to the mean image and looks nearly gray; this is how the paper's figures show it."""
    d = _from_mean(image, mean)
    s = _display_scale(d, percentile)
    out = 128.0 + 127.0 * (d / s if s > 0 else d * 0)
    return _to_pil(out.numpy())
