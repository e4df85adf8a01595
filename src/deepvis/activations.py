"""The activation view (the paper's first tool, offline form): a layer's channels tiled, plus predictions."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .capture.hooks import capture
from .capture.layers import LayerInfo, check_unit, get_layer, layer_table
from .capture.units import LOGITS, Unit
from .models.model import Model
from .predictions import Prediction, top_k
from .render.grid import Normalize, grid_shape, tile_grid
from .render.montage import caption, hstack

__all__ = ["ActivationView", "activation_views", "compose_view", "auto_scale"]


@dataclass
class ActivationView:
    """One input's view of a layer: its activations (C, H, W) or (C,), the tiled grid and the predictions."""

    layer: LayerInfo
    activations: torch.Tensor
    grid: np.ndarray
    predictions: list[Prediction] = field(default_factory=list)
    input_image: Image.Image | None = None


def auto_scale(info: LayerInfo, target: int = 640) -> int:
    """The integer enlargement that brings a layer's grid close to ``target`` px wide (1–16)."""
    if not info.spatial:
        return 1
    _, cols = grid_shape(info.units)
    return int(max(1, min(16, target // max(1, cols * (info.shape[2] + 1)))))


def activation_views(
    model: Model,
    images: Iterable[Image.Image],
    layer: str,
    *,
    normalize: Normalize = "layer",
    colormap: str = "gray",
    highlight: int | None = None,
    scale: int | None = None,
    k: int = 5,
    batch_size: int = 8,
) -> Iterator[ActivationView]:
    """Yield one :class:`ActivationView` per image, computed in batches of ``batch_size``.

    Predictions come from the same forward pass (the pass runs to the logits only when ``k > 0`` and
    the model has an output layer; otherwise it stops at ``layer``).
    """
    info = get_layer(model, layer) if highlight is None else check_unit(model, Unit(layer, highlight))
    want_logits = k > 0 and any(i.name == LOGITS for i in layer_table(model))
    s = auto_scale(info) if scale is None else scale
    batch: list[Image.Image] = []

    def flush() -> Iterator[ActivationView]:
        x = model.preprocess(batch)
        names = [layer, LOGITS] if want_logits else [layer]
        acts = capture(model, x, names, stop_early=not want_logits)
        preds = top_k(model, acts[LOGITS], k) if want_logits else [[] for _ in batch]
        for i, im in enumerate(batch):
            a = acts[layer][i]
            grid = tile_grid(a, normalize=normalize, colormap=colormap, highlight=highlight, scale=s)
            yield ActivationView(info, a.cpu(), grid, preds[i], model.preprocessing.fit(im))

    for im in images:
        batch.append(im)
        if len(batch) == batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def compose_view(view: ActivationView, *, title: str | None = None) -> Image.Image:
    """The view as one picture: the input (as the model sees it), the grid, and the top-k predictions below."""
    grid = Image.fromarray(view.grid)
    parts = []
    if view.input_image is not None:
        inp = view.input_image.convert("RGB")
        side = min(grid.height, max(160, inp.height))
        parts.append(inp.resize((side, round(inp.height * side / inp.width) if inp.width else side)))
    parts.append(grid)
    body = hstack(parts)
    shape = "x".join(str(d) for d in view.layer.shape)
    lines = [title or f"layer {view.layer.name} ({view.layer.type}, {shape})"]
    lines += [f"{p.probability * 100:5.1f}%  {p.label}" for p in view.predictions]
    cap = caption(lines, body.width)
    out = Image.new("RGB", (body.width, body.height + cap.height), (20, 20, 20))
    out.paste(body, (0, 0))
    out.paste(cap, (0, body.height))
    return out
