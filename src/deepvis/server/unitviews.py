"""The selected unit's backprop view and receptive fields, through :mod:`deepvis.backprop`.

Both run in the engine's background worker, on its own copy of the network, never in the frame loop.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..capture import Unit
from ..models.model import Model
from .protocol import ViewSettings

__all__ = ["backprop_filters", "unit_view", "layer_geometry"]


def backprop_filters() -> tuple[str, ...]:
    """The display filters :mod:`deepvis.backprop` offers, in its order."""
    from ..backprop import FILTERS

    return tuple(FILTERS)


def unit_view(model: Model, x: torch.Tensor, settings: ViewSettings) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The backprop view of the selected unit on model input ``x`` (1, C, H, W), as the page draws it.

    The backward pass starts from the unit's whole channel map seeded with its own activation (as in
    the original toolbox), or from the pinned position. Returns (header fields, ``{"rgb": H×W×3 uint8}``).
    """
    from ..backprop import backprop_image, backprop_view

    unit = Unit(settings.layer, settings.unit, settings.position)
    # the frame loop's input may be channels_last (its own copy of the network is); this copy is not
    result = backprop_view(model, x.contiguous(), unit, settings.backprop)  # type: ignore[arg-type]
    rgb = backprop_image(result, settings.filter)  # type: ignore[arg-type]
    h, w = rgb.shape[:2]
    header = {
        "h": h,
        "w": w,
        "activation": result.activation if math.isfinite(result.activation) else None,
        "argmax": list(result.argmax) if result.argmax is not None else None,
    }
    return header, {"rgb": rgb.tobytes()}


def layer_geometry(model: Model, layer: str) -> dict[str, Any]:
    """The receptive field of every position of ``layer``: per output row and column, the first and
    last input pixel (inclusive) it can see; the page draws the box of any position from these."""
    from ..backprop import layer_field

    f = layer_field(model, layer)
    return {
        "layer": layer,
        "input_size": list(f.input_size),
        "output_size": list(f.output_size) if f.output_size is not None else None,
        "rows": {"lo": list(f.rows.lo), "hi": list(f.rows.hi)},
        "cols": {"lo": list(f.cols.lo), "hi": list(f.cols.hi)},
        "size": list(f.size),
        "stride": [round(s, 4) for s in f.stride],
    }
