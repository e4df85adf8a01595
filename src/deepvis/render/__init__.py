"""Rendering: activation grids, colormaps, montages."""

from .colormap import COLORMAPS, apply_colormap, colormap_lut
from .grid import NORMALIZATIONS, Normalize, grid_shape, normalize_activations, tile_grid, tile_origin
from .montage import as_image, caption, hstack, montage

__all__ = [
    "COLORMAPS",
    "apply_colormap",
    "colormap_lut",
    "NORMALIZATIONS",
    "Normalize",
    "grid_shape",
    "normalize_activations",
    "tile_grid",
    "tile_origin",
    "montage",
    "caption",
    "hstack",
    "as_image",
]
