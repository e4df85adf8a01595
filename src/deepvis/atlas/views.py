"""Crops and backprop views of each unit's top-k inputs (the atlas's second phase).

For each top input of a unit: the input as the model saw it (after preprocessing), cut to the unit's
receptive field at the position of its maximum (:mod:`deepvis.backprop.receptive`; border fields are
padded with black to the full field size), and the backprop view of the unit seeded at that position
(:func:`deepvis.backprop.backprop_views`, deconv by default), cut the same way and shown as the
original toolbox did: 0.5 + 0.5·g / s with s the 99.5th percentile of |g| (gray = no influence, signed per channel). The k inputs of
one unit go through the network as one batch, so a unit's views never depend on other units.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from ..backprop import backprop_views, crop, crop_image, layer_field
from ..capture import Unit, get_layer
from ..datasets import ImageDataset
from ..errors import InputError
from ..models.model import Model
from .tasks import UnitResult, UnitTask, png_bytes

__all__ = ["unit_views", "check_view_mode", "signed_display"]


def signed_display(g: torch.Tensor, channels: int, *, percentile: float = 99.5) -> Image.Image:
    """A (C, H, W) gradient as an image: 0.5 + 0.5·g / s, clipped, where s is the ``percentile`` of |g|
    (its maximum when that is 0; all gray when g is zero). The percentile keeps one extreme pixel from
    washing out the rest."""
    a = g.abs().flatten().float()
    m = float(torch.quantile(a, percentile / 100.0)) if a.numel() else 0.0
    if m <= 0 and a.numel():
        m = float(a.max())
    x = 0.5 + 0.5 * g / m if m > 0 else torch.full_like(g, 0.5)
    arr = (x.clamp(0, 1).permute(1, 2, 0).numpy() * 255.0 + 0.5).astype(np.uint8)
    return Image.fromarray(arr[:, :, 0], "L") if channels == 1 else Image.fromarray(arr, "RGB")


def check_view_mode(model: Model, layer: str, mode: str) -> None:
    """Fail early (before a long mining pass) when ``mode`` does not apply to the model, e.g. deconv on
    a network with SiLU: one backward pass from ``layer`` on a blank input."""
    x = torch.zeros(1, *model.preprocessing.input_shape, device=model.device)
    backprop_views(model, x, [Unit(layer, 0)], mode)  # type: ignore[arg-type]


def unit_views(model: Model, dataset: ImageDataset, task: UnitTask) -> list[UnitResult]:
    """Crops and views for every unit of a ``views`` task (see the module docs)."""
    mode = task.opts.get("mode", "deconv")
    info = get_layer(model, task.layer)
    field = layer_field(model, task.layer)
    pre = model.preprocessing
    out = []
    for unit, entries in zip(task.units, task.entries):
        res = UnitResult("views", task.layer, unit)
        loaded: list[tuple[int, Image.Image]] = []
        for rank, sample, _pos in entries:
            try:
                loaded.append((rank, dataset.load(sample, pre.pil_mode)))
            except InputError as exc:
                res.skipped.append((sample, str(exc)))
        crops: dict[int, bytes] = {}
        views: dict[int, bytes] = {}
        if loaded:
            x = model.preprocess([im for _, im in loaded])
            pos = {rank: p for rank, _s, p in entries}
            units = [Unit(task.layer, unit, pos[rank] if info.spatial else None) for rank, _ in loaded]
            results = backprop_views(model, x, units, mode)  # type: ignore[arg-type]
            for k, ((rank, _im), r) in enumerate(zip(loaded, results)):
                rf = field.at(pos[rank] if info.spatial else None)
                crops[rank] = png_bytes(crop_image(pre.to_image(x[k]), rf, fill=0))
                views[rank] = png_bytes(signed_display(crop(r.grad, rf, fill=0.0), pre.channels))  # type: ignore[arg-type]
        res.crops = [crops.get(rank) for rank, _s, _p in entries]
        res.views = [views.get(rank) for rank, _s, _p in entries]
        out.append(res)
    return out
