"""The selected unit's backprop view and receptive fields, through :mod:`deepvis.backprop`.

Both run in the engine's background worker, on its own copy of the network, never in the frame loop.
"""

from __future__ import annotations

import math
from typing import Any, cast

import torch

from ..backprop import FILTERS, Filter, Mode, backprop_image, backprop_view, layer_field
from ..capture import Unit
from ..models.model import Model
from .protocol import ViewSettings

__all__ = ["backprop_filters", "unit_view", "layer_geometry"]


def backprop_filters() -> tuple[str, ...]:
    """The display filters :mod:`deepvis.backprop` offers, in its order."""
    return tuple(FILTERS)


def unit_view(model: Model, x: torch.Tensor, settings: ViewSettings) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The backprop view of the selected unit on model input ``x`` (1, C, H, W), as the page draws it.

    The backward pass starts from the unit's whole channel map seeded with its own activation (as in
    the original toolbox), from the pinned position, or from the selected prefix token (``settings.token``:
    ``blocks.5:17@cls``). Returns (header fields, ``{"rgb": H×W×3 uint8}``).
    ``settings.backprop`` is a mode of :data:`deepvis.backprop.MODES` (the engine never asks for ``off``)
    and ``settings.filter`` one of :data:`deepvis.backprop.FILTERS`: :meth:`ViewSettings.parse` admits
    nothing else; magnitudes are scaled by their ``settings.percentile``-th percentile (100: the maximum).
    """
    unit = Unit(settings.layer, settings.unit, settings.position, settings.token)
    # the frame loop's input may be channels_last (its own copy of the network is); this copy is not
    result = backprop_view(model, x.contiguous(), unit, cast(Mode, settings.backprop))
    rgb = backprop_image(result, cast(Filter, settings.filter), percentile=settings.percentile)
    h, w = rgb.shape[:2]
    header = {
        "h": h,
        "w": w,
        "activation": result.activation if math.isfinite(result.activation) else None,
        "argmax": list(result.argmax) if result.argmax is not None else None,
        # a unit that is off on this frame: its view is still scaled to full contrast, so say so
        "weak": (f"unit ≈ 0 here ({result.relative:.0e} of the layer's largest |value|)" if result.negligible else None),
    }
    return header, {"rgb": rgb.tobytes()}


def layer_geometry(model: Model, layer: str) -> dict[str, Any]:
    """The receptive field of every position of ``layer``: per output row and column, the first and
    last input pixel (inclusive) it can see; the page draws the box of any position from these."""
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
