"""One atlas unit as a picture: the original toolbox's pane (synthesized image, top-k crops, their views)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image

from ..capture import Unit, split_token_layer
from ..io import load_image
from ..render import caption, hstack, montage
from .store import UnitRecord

__all__ = ["unit_pane"]

_MISSING = (60, 60, 60)


def _tile(path: Path | None, size: int) -> Image.Image:
    if path is None:
        return Image.new("RGB", (size, size), _MISSING)
    return load_image(path).resize((size, size), Image.Resampling.BICUBIC)


def unit_pane(rec: UnitRecord, *, tile: int = 96) -> Image.Image:
    """Side by side: the synthesized image (as tall as the grids), the top-k crops and their views
    (each a near-square grid of ``tile``-pixel images, labelled with rank and value), over a caption
    with the unit's statistics. Missing parts (not made yet, or skipped) are gray."""
    k = len(rec.top)
    cols = max(1, math.ceil(math.sqrt(k)))
    labels = [f"{t.rank + 1}: {t.value:.3g}" for t in rec.top]
    crops = montage([_tile(t.crop, tile) for t in rec.top], cols=cols, labels=labels)
    views = montage([_tile(t.view, tile) for t in rec.top], cols=cols, labels=[t.label or t.key.rsplit("/", 1)[-1] for t in rec.top])
    side = crops.height
    panels = []
    if rec.synth is not None:
        panels.append(load_image(rec.synth.image).resize((side, side), Image.Resampling.BICUBIC))
    else:
        panels.append(Image.new("RGB", (side, side), _MISSING))
    panels += [crops, views]
    body = hstack(panels)
    token = split_token_layer(rec.layer) is not None  # a prefix token sees the whole image: no crops
    what = "whole inputs (a prefix token)" if token else "crops"
    lines = [f"{Unit(rec.layer, rec.unit)}    synthesized | top {k} inputs ({what}) | their views"]
    if rec.stats is not None:
        s = rec.stats
        lines.append(
            f"mean {s.mean:.3g}  max {s.max:.3g}  mean of maxima {s.mean_max:.3g}  active on {100 * s.frac_active:.0f}% of {s.images} inputs"
        )
    cap = caption(lines, body.width)
    out = Image.new("RGB", (body.width, body.height + cap.height), (20, 20, 20))
    out.paste(cap, (0, 0))
    out.paste(body, (0, cap.height))
    return out
