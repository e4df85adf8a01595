"""Colormaps as 256-entry lookup tables."""

from __future__ import annotations

import functools

import numpy as np

from ..errors import DeepvisError

__all__ = ["colormap_lut", "apply_colormap", "COLORMAPS"]

#: the colormaps offered by the CLI and the UI ("gray" needs no matplotlib)
COLORMAPS = ("gray", "viridis", "magma", "inferno", "plasma", "jet", "coolwarm")


@functools.lru_cache(maxsize=16)
def _lut(name: str) -> bytes:
    if name == "gray":
        ramp = np.arange(256, dtype=np.uint8)
        return np.stack([ramp] * 3, axis=1).tobytes()
    import matplotlib

    try:
        cmap = matplotlib.colormaps[name]
    except KeyError:
        raise DeepvisError(f"unknown colormap {name!r}; try one of {', '.join(COLORMAPS)}") from None
    rgba = cmap(np.linspace(0, 1, 256))
    return (rgba[:, :3] * 255 + 0.5).astype(np.uint8).tobytes()


def colormap_lut(name: str) -> np.ndarray:
    """The (256, 3) uint8 lookup table of colormap ``name`` (any matplotlib colormap name, or ``gray``)."""
    return np.frombuffer(_lut(name), dtype=np.uint8).reshape(256, 3)


def apply_colormap(x01: np.ndarray, name: str = "gray") -> np.ndarray:
    """Map values in [0, 1] (any shape) to RGB uint8 (shape + (3,)); values outside are clipped."""
    idx = np.clip(np.nan_to_num(x01) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return colormap_lut(name)[idx]
