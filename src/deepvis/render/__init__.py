"""Rendering: activation grids, colormaps, montages."""

from .colormap import COLORMAPS, apply_colormap, colormap_lut
from .grid import (
    AFFINE_NORMALIZATIONS,
    NORMALIZATIONS,
    Normalize,
    grid_shape,
    normalization_scale,
    normalize_activations,
    tile_grid,
    tile_origin,
)
from .montage import as_image, caption, hstack, montage
from .strip import prefix_strip, stack_below, strip_geometry, strip_values

__all__ = [
    "COLORMAPS",
    "apply_colormap",
    "colormap_lut",
    "NORMALIZATIONS",
    "AFFINE_NORMALIZATIONS",
    "Normalize",
    "grid_shape",
    "normalize_activations",
    "normalization_scale",
    "strip_values",
    "prefix_strip",
    "strip_geometry",
    "stack_below",
    "tile_grid",
    "tile_origin",
    "montage",
    "caption",
    "hstack",
    "as_image",
]
