"""The prefix strip: a token layer's prefix tokens (class, distillation, register tokens), drawn apart
from its patch maps, in the grid's colour scale.

One row per prefix token (labelled ``cls``, ``dist``, ``reg0`` ...), one cell per channel in channel
order (the order of the grid's tiles). For an attention layer the rows are the prefix *keys* and the
cells its heads: the query's weight on each prefix key.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from ..errors import DeepvisError
from .colormap import apply_colormap
from .grid import HIGHLIGHT_COLOR, PAD_COLOR, Normalize, normalization_scale

__all__ = ["strip_values", "prefix_strip", "strip_geometry", "stack_below", "STRIP_ROW"]

#: height of one strip row in pixels
STRIP_ROW = 10
#: pixels per character of the label column (Pillow's default bitmap font)
_CHAR = 6


def strip_values(prefix: torch.Tensor | np.ndarray, acts: torch.Tensor | np.ndarray, mode: Normalize = "layer") -> np.ndarray:
    """The strip's values in [0, 1], (P, C): prefix tokens ``prefix`` (C, P) on the scale the grid of
    ``acts`` (C, H, W) is drawn with (:func:`~deepvis.render.grid.normalization_scale`; values beyond
    the grid's range are clipped)."""
    p = prefix.detach().float().cpu().numpy() if isinstance(prefix, torch.Tensor) else np.asarray(prefix, dtype=np.float32)
    if p.ndim != 2:
        raise DeepvisError(f"expected prefix tokens shaped (C, P), got {p.shape}")
    lo, span = normalization_scale(acts, mode)
    lo, span = lo.reshape(-1, 1) if lo.ndim else lo, span.reshape(-1, 1) if span.ndim else span
    safe = np.where(span > 0, span, 1)
    v = np.where(span > 0, (p - lo) / safe, 0)
    return np.clip(v, 0, 1).T.astype(np.float32)


def prefix_strip(
    values01: np.ndarray,
    names: Sequence[str],
    *,
    width: int,
    colormap: str = "gray",
    highlight: int | None = None,
    row: int = STRIP_ROW,
    pad: int = 1,
) -> np.ndarray:
    """Draw the strip as an RGB image (H, W, 3) uint8, at least ``width`` px wide.

    Args:
        values01: (P, C) values in [0, 1] (:func:`strip_values`).
        names: the P row labels (``cls``, ``dist``, ``reg0`` ...).
        width: the width to fill (the grid's), in pixels; each cell is ``(width - labels) // C`` px
            wide (at least 1).
        colormap: the grid's colormap; ``highlight``: a channel whose cells are framed.
        row: the height of one row in pixels; ``pad``: the gap between rows and around the strip.

    Returns:
        (pad + P * (row + pad), W, 3) uint8; cell (k, c) spans columns ``x0 + c * cw`` to ``x0 + (c + 1) * cw``
        of row k, with ``x0`` the label column's width (see :func:`strip_geometry`).
    """
    p, c = values01.shape
    if len(names) != p:
        raise DeepvisError(f"{p} prefix rows but {len(names)} names")
    x0, cw = strip_geometry(names, c, width)
    h = pad + p * (row + pad)
    out = np.empty((h, max(width, x0 + c * cw + pad), 3), dtype=np.uint8)
    out[:] = PAD_COLOR
    rgb = apply_colormap(values01, colormap)  # (P, C, 3)
    for k in range(p):
        y = pad + k * (row + pad)
        out[y : y + row, x0 : x0 + c * cw] = np.repeat(rgb[k], cw, axis=0)[None]
    if highlight is not None and 0 <= highlight < c and cw >= 3:
        xa, xb = x0 + highlight * cw, x0 + (highlight + 1) * cw - 1
        out[pad : h - pad, xa] = HIGHLIGHT_COLOR
        out[pad : h - pad, xb] = HIGHLIGHT_COLOR
    im = Image.fromarray(out)
    draw = ImageDraw.Draw(im)
    font = ImageFont.load_default()
    for k, name in enumerate(names):
        draw.text((2, pad + k * (row + pad) - 1), name, fill=(230, 230, 230), font=font)
    return np.asarray(im)


def strip_geometry(names: Sequence[str], channels: int, width: int) -> tuple[int, int]:
    """``(x0, cw)``: where the strip's first cell starts (after the label column) and each cell's width, in px."""
    x0 = 4 + _CHAR * max((len(n) for n in names), default=0)
    return x0, max(1, (width - x0 - 1) // max(1, channels))


def stack_below(top: np.ndarray, bottom: np.ndarray, gap: int = 2) -> np.ndarray:
    """Two RGB images (H, W, 3) one above the other, left-aligned, on the padding colour."""
    w = max(top.shape[1], bottom.shape[1])
    out = np.empty((top.shape[0] + gap + bottom.shape[0], w, 3), dtype=np.uint8)
    out[:] = PAD_COLOR
    out[: top.shape[0], : top.shape[1]] = top
    out[top.shape[0] + gap :, : bottom.shape[1]] = bottom
    return out
