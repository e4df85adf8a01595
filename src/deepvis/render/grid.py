"""The layers pane: every channel of a layer tiled into one grid image."""

from __future__ import annotations

import math

import numpy as np
import torch

from ..choices import NORMALIZATIONS
from ..choices import Normalization as Normalize
from ..errors import DeepvisError
from .colormap import apply_colormap

__all__ = [
    "grid_shape",
    "normalize_activations",
    "normalization_scale",
    "tile_grid",
    "tile_origin",
    "Normalize",
    "NORMALIZATIONS",
    "AFFINE_NORMALIZATIONS",
]

#: the normalizations under which every value is shown as an affine image of itself, (v - lo) / span with
#: nothing clipped (``none`` clips to [0, 1]): re-stretching a tile to its own range gives the channel view
AFFINE_NORMALIZATIONS: tuple[str, ...] = ("layer", "channel")

#: RGB of the padding between tiles and of the highlight frame
PAD_COLOR = (40, 40, 40)
HIGHLIGHT_COLOR = (255, 210, 0)


def grid_shape(n: int) -> tuple[int, int]:
    """(rows, columns) for ``n`` tiles: the smallest near-square grid, columns = ceil(sqrt(n))."""
    if n <= 0:
        raise ValueError("a grid needs at least one tile")
    cols = math.ceil(math.sqrt(n))
    return math.ceil(n / cols), cols


def normalize_activations(acts: torch.Tensor | np.ndarray, mode: Normalize = "layer") -> np.ndarray:
    """Scale one example's activations (C, H, W) or (C,) to [0, 1].

    ``layer``: one scale for the whole layer; ``channel``: each channel on its own; ``none``: clip to
    [0, 1]. Non-negative maps are divided by their maximum (so 0 stays black); maps with negative
    values are stretched from their minimum to their maximum. A constant map becomes 0.
    """
    a = _as_array(acts)
    if mode == "none":
        return np.clip(a, 0, 1)
    lo, span = normalization_scale(a, mode)
    safe = np.where(span > 0, span, 1)
    return np.where(span > 0, (a - lo) / safe, 0).astype(np.float32)


def _as_array(acts: torch.Tensor | np.ndarray) -> np.ndarray:
    a = acts.detach().float().cpu().numpy() if isinstance(acts, torch.Tensor) else np.asarray(acts, dtype=np.float32)
    return a.astype(np.float32, copy=False)


def normalization_scale(acts: torch.Tensor | np.ndarray, mode: Normalize = "layer") -> tuple[np.ndarray, np.ndarray]:
    """The scale :func:`normalize_activations` applies to ``acts`` (C, H, W) or (C,): ``(lo, span)``, each
    a scalar array (``layer``) or shaped (C, 1, ...) (``channel``); a value v is shown as (v - lo) / span
    (0 where span is 0). ``none``: lo 0, span 1."""
    a = _as_array(acts)
    if mode == "none":
        return np.zeros(()), np.ones(())
    if mode not in NORMALIZATIONS:
        raise DeepvisError(f"unknown normalization {mode!r}: use one of {', '.join(NORMALIZATIONS)}")
    axes = tuple(range(1, a.ndim)) if (mode == "channel" and a.ndim > 1) else None
    lo = a.min(axis=axes, keepdims=True) if axes else np.array(a.min())
    hi = a.max(axis=axes, keepdims=True) if axes else np.array(a.max())
    lo = np.minimum(lo, 0)  # non-negative maps keep 0 as black
    return lo, hi - lo


def tile_origin(index: int, tile_hw: tuple[int, int], cols: int, pad: int) -> tuple[int, int]:
    """Top-left (y, x) pixel of tile ``index`` in a grid made by :func:`tile_grid`."""
    th, tw = tile_hw
    r, c = divmod(index, cols)
    return pad + r * (th + pad), pad + c * (tw + pad)


def tile_grid(
    acts: torch.Tensor | np.ndarray,
    *,
    normalize: Normalize = "layer",
    colormap: str = "gray",
    highlight: int | None = None,
    scale: int = 1,
    cell: int = 8,
    pad: int = 1,
) -> np.ndarray:
    """Tile one example's activations into an RGB image (H, W, 3) uint8.

    ``acts`` is (C, H, W) for a convolutional layer (each channel one H×W tile, enlarged ``scale``
    times) or (C,) for a fully-connected layer (each unit one ``cell``×``cell`` square). Tiles fill
    rows left to right in channel order, in a :func:`grid_shape` grid separated by ``pad`` pixels;
    ``highlight`` frames one channel's tile.
    """
    a = normalize_activations(acts, normalize)
    if a.ndim == 1:
        a, scale = a[:, None, None], cell
    elif a.ndim != 3:
        raise DeepvisError(f"expected activations shaped (C,H,W) or (C,), got {a.shape}")
    scale = max(1, int(scale))
    small = apply_colormap(a, colormap)  # (C, h, w, 3): color first, enlarge after
    c, h, w, _ = small.shape
    th, tw = h * scale, w * scale
    rows, cols = grid_shape(c)
    grid = np.empty((pad + rows * (th + pad), pad + cols * (tw + pad), 3), dtype=np.uint8)
    grid[:] = PAD_COLOR
    # every tile slot is a (th + pad) x (tw + pad) cell of the grid below the top/left padding
    cells = grid[pad:, pad:].reshape(rows, th + pad, cols, tw + pad, 3)
    tiles = np.broadcast_to(small[:, :, None, :, None, :], (c, h, scale, w, scale, 3)).reshape(c, th, tw, 3)
    full, rest = divmod(c, cols)
    if full:
        cells[:full, :th, :, :tw] = tiles[: full * cols].reshape(full, cols, th, tw, 3).transpose(0, 2, 1, 3, 4)
    if rest:
        cells[full, :th, :rest, :tw] = tiles[full * cols :].transpose(1, 0, 2, 3)
    if highlight is not None:
        if not 0 <= highlight < c:
            raise DeepvisError(f"highlighted unit {highlight} is out of range (0-{c - 1})")
        y, x = tile_origin(highlight, (th, tw), cols, pad)
        w = max(1, pad)
        y0, x0, y1, x1 = max(0, y - w), max(0, x - w), min(grid.shape[0], y + th + w), min(grid.shape[1], x + tw + w)
        grid[y0:y1, x0 : x0 + w] = HIGHLIGHT_COLOR
        grid[y0:y1, x1 - w : x1] = HIGHLIGHT_COLOR
        grid[y0 : y0 + w, x0:x1] = HIGHLIGHT_COLOR
        grid[y1 - w : y1, x0:x1] = HIGHLIGHT_COLOR
    return grid
