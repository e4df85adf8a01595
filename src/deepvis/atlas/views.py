"""Crops and backprop views of each unit's top-k inputs (the atlas's second phase).

For each top input of a unit: the input as the model saw it (after preprocessing), cut to the unit's
receptive field at the position of its maximum (:mod:`deepvis.backprop.receptive`; border fields are
padded with black to the full field size), and the backprop view of the unit seeded at that position
(:func:`deepvis.backprop.backprop_views`, deconv by default), cut the same way and shown as the
original toolbox did (:func:`signed_display`): 0.5 + 0.5·g / s with s the 99.5th percentile of |g|
(gray = no influence, signed per channel). The k inputs of one unit go through the network as one
batch, so a unit's views never depend on other units.

A prefix token of a token layer (the atlas layer ``LAYER@TOKEN``, e.g. ``blocks.5@cls``) has no position
and, after attention, sees the whole image: its "crops" are the whole inputs as the model saw them, and
its views are uncropped.
"""

from __future__ import annotations

import torch
from PIL import Image

from ..backprop import backprop_views, crop, crop_image, filter_map, layer_field
from ..capture import Unit, get_layer, split_token_layer
from ..choices import BACKPROP_MODES, BackpropMode
from ..datasets import ImageDataset
from ..errors import DeepvisError, InputError
from ..models.model import Model
from ..pixels import to_uint8
from .tasks import UnitResult, UnitTask, png_bytes

__all__ = ["unit_views", "check_view_mode", "signed_display"]


def signed_display(g: torch.Tensor, channels: int, *, percentile: float = 99.5) -> Image.Image:
    """A (C, H, W) gradient as an image (gray ``L`` for ``channels`` 1, else RGB): 0.5 + 0.5·g / s,
    clipped, where s is the ``percentile`` of |g| over all channels — the backprop ``rgb`` filter
    (:func:`deepvis.backprop.filter_map`) — or its maximum when that percentile is 0 (a view with
    nonzero values on fewer than 0.5% of its pixels); all gray when g is zero. The percentile keeps
    one extreme pixel from washing out the rest."""
    v = filter_map(g, "rgb", percentile=percentile)
    if not v.any() and g.numel() and bool(g.abs().max() > 0):
        v = filter_map(g, "rgb", percentile=100.0)
    arr = to_uint8(0.5 + 0.5 * v)
    return Image.fromarray(arr[:, :, 0], "L") if channels == 1 else Image.fromarray(arr, "RGB")


def _view_mode(mode: str) -> BackpropMode:
    """``mode`` as a backprop mode, or a one-line error naming the modes."""
    for m in BACKPROP_MODES:
        if m == mode:
            return m
    raise DeepvisError(f"unknown view mode {mode!r}: use {', '.join(BACKPROP_MODES)}")


def check_view_mode(model: Model, layer: str, mode: str) -> None:
    """Fail early (before a long mining pass) when ``mode`` does not apply to the model, e.g. deconv on
    a network with SiLU: one backward pass from ``layer`` on a blank input."""
    x = torch.zeros(1, *model.preprocessing.input_shape, device=model.device)
    backprop_views(model, x, [Unit(layer, 0)], _view_mode(mode))


def unit_views(model: Model, dataset: ImageDataset, task: UnitTask) -> list[UnitResult]:
    """Crops and views for every unit of a ``views`` task (see the module docs)."""
    mode = _view_mode(task.opts.get("mode", "deconv"))
    info = get_layer(model, task.layer)
    field = None if split_token_layer(task.layer) is not None else layer_field(model, task.layer)  # a token: the whole input
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
            results = backprop_views(model, x, units, mode)
            for k, ((rank, _im), r) in enumerate(zip(loaded, results)):
                if field is None:
                    crops[rank] = png_bytes(pre.to_image(x[k]))
                    views[rank] = png_bytes(signed_display(r.grad, pre.channels))
                    continue
                rf = field.at(pos[rank] if info.spatial else None)
                crops[rank] = png_bytes(crop_image(pre.to_image(x[k]), rf, fill=0))
                views[rank] = png_bytes(signed_display(torch.as_tensor(crop(r.grad, rf, fill=0.0)), pre.channels))
        res.crops = [crops.get(rank) for rank, _s, _p in entries]
        res.views = [views.get(rank) for rank, _s, _p in entries]
        out.append(res)
    return out
