"""Colormaps as 256-entry lookup tables."""

from __future__ import annotations

import functools

import numpy as np

from ..choices import COLORMAPS
from ..errors import DeepvisError
from ..pixels import to_uint8

__all__ = ["colormap_lut", "apply_colormap", "COLORMAPS"]


@functools.lru_cache(maxsize=16)
def _lut(name: str) -> bytes:
    if name == "gray":
        ramp = np.arange(256, dtype=np.uint8)
        return np.stack([ramp] * 3, axis=1).tobytes()
    import matplotlib  # lazy: heavy, and only the non-gray colormaps need it

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise DeepvisError(f"unknown colormap {name!r}; try one of {', '.join(COLORMAPS)}") from None
    rgba = cmap(np.linspace(0, 1, 256))
    return to_uint8(rgba[:, :3]).tobytes()


def colormap_lut(name: str) -> np.ndarray:
    """The (256, 3) uint8 lookup table of colormap ``name`` (any matplotlib colormap name, or ``gray``)."""
    return np.frombuffer(_lut(name), dtype=np.uint8).reshape(256, 3)


def apply_colormap(x01: np.ndarray, name: str = "gray") -> np.ndarray:
    """Map values in [0, 1] (any shape) to RGB uint8 (shape + (3,)); values outside are clipped."""
    idx = to_uint8(np.nan_to_num(x01))
    return colormap_lut(name)[idx]
