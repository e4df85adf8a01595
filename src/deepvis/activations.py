"""The activation view (the paper's first tool, offline form): a layer's channels tiled, plus predictions.

A token layer's prefix tokens (class, distillation, register tokens) are drawn apart, as a strip under
the grid (one row per token, one cell per channel, in the grid's colour scale). An attention layer is
drawn one tile per head: a query token's row over the key patch grid (``query``: the class token by
default, or a patch), its weights on the prefix keys in the strip.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from .capture.hooks import capture, prefix_key
from .capture.layers import LayerInfo, check_unit, get_layer, layer_table
from .capture.layouts import Query
from .capture.units import LOGITS, Unit
from .display import png_bytes
from .errors import UnitError
from .models.model import Model, require_model
from .predictions import Prediction, class_scores_problem, top_k
from .render.grid import Normalize, grid_shape, tile_grid
from .render.montage import caption, hstack
from .render.strip import prefix_strip, stack_below, strip_values
from .runtime import Autocast

__all__ = ["ActivationView", "activation_views", "compose_view", "auto_scale"]


@dataclass
class ActivationView:
    """One input's view of a layer: its activations (C, H, W) or (C,), the tiled grid and the predictions.

    For a token layer with prefix tokens, ``prefix`` holds them (C, P) and ``strip`` their drawing
    (:func:`~deepvis.render.strip.prefix_strip`); for an attention layer ``activations`` is the query's
    row per head (heads, H, W), ``prefix`` its weights on the prefix keys (heads, P) and ``query`` the
    query token (``cls``, or ``"Y,X"``). :attr:`picture` is the grid with the strip below it.
    """

    layer: LayerInfo
    activations: torch.Tensor
    grid: np.ndarray
    predictions: list[Prediction] = field(default_factory=list)
    input_image: Image.Image | None = None
    prefix: torch.Tensor | None = None
    strip: np.ndarray | None = None
    query: str | None = None

    @property
    def picture(self) -> np.ndarray:
        """The grid (H, W, 3) uint8, with the prefix strip under it when the layer has prefix tokens."""
        return self.grid if self.strip is None else stack_below(self.grid, self.strip)

    def _repr_png_(self) -> bytes:
        """:func:`compose_view` as PNG: the input, the grid and the predictions (IPython's display protocol)."""
        return png_bytes(compose_view(self))


def auto_scale(info: LayerInfo, target: int = 640) -> int:
    """The integer enlargement that brings a layer's grid close to ``target`` px wide (1–16)."""
    if not info.spatial:
        return 1
    _, cols = grid_shape(info.units)
    return int(max(1, min(16, target // max(1, cols * (info.shape[2] + 1)))))


def activation_views(
    model: Model,
    images: Iterable[Image.Image] | Image.Image,
    layer: str,
    *,
    normalize: Normalize = "layer",
    colormap: str = "gray",
    highlight: int | None = None,
    scale: int | None = None,
    k: int = 5,
    batch_size: int = 8,
    query: Query = None,
    autocast: Autocast = None,
) -> Iterator[ActivationView]:
    """Yield one :class:`ActivationView` per image, computed in batches of ``batch_size``.

    Predictions come from the same forward pass (the pass runs to the logits only when ``k > 0`` and
    the model has an output layer; otherwise it stops at ``layer``). ``query``: the query token of an
    attention layer (a prefix token name such as ``"cls"``, or a patch (row, column); default: the first
    prefix token); a :class:`~deepvis.errors.UnitError` for other layers or a query the layer lacks.
    ``autocast`` (``"bf16"``, ``"fp16"``; None: off) runs the forward passes under
    :func:`deepvis.runtime.autocast`; the views' activations come back in float32.
    """
    model = require_model(model)
    if isinstance(images, Image.Image):  # one image, not an iterable of them
        images = [images]
    info = get_layer(model, layer) if highlight is None else check_unit(model, Unit(layer, highlight))
    if query is not None and info.layout.kind != "attention":
        raise UnitError(f"--query applies to attention layers; {layer} is a {info.layout.kind} layer")
    q_name = info.layout.query_name(query) if info.layout.kind == "attention" else None
    # predictions only from class scores (a model without a head outputs features: none are shown)
    want_logits = k > 0 and any(i.name == LOGITS for i in layer_table(model)) and class_scores_problem(model) is None
    s = auto_scale(info) if scale is None else scale
    batch: list[Image.Image] = []

    def flush() -> Iterator[ActivationView]:
        x = model.preprocess(batch)
        names = [layer, LOGITS] if want_logits else [layer]
        acts = capture(model, x, names, stop_early=not want_logits, prefix=bool(info.prefix), query=query, autocast=autocast)
        if autocast is not None:  # the grids, strips and predictions read float32
            acts = {name: a.float() for name, a in acts.items()}
        preds = top_k(model, acts[LOGITS], k) if want_logits else [[] for _ in batch]
        for i, im in enumerate(batch):
            a = acts[layer][i]
            grid = tile_grid(a, normalize=normalize, colormap=colormap, highlight=highlight, scale=s)
            pre = acts[prefix_key(layer)][i] if info.prefix else None
            strip = None
            if pre is not None:
                values = strip_values(pre, a, normalize)
                strip = prefix_strip(values, info.prefix, width=grid.shape[1], colormap=colormap, highlight=highlight)
            yield ActivationView(
                info, a.cpu(), grid, preds[i], model.preprocessing.fit(im), pre.cpu() if pre is not None else None, strip, q_name
            )

    for im in images:
        batch.append(im)
        if len(batch) == batch_size:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def compose_view(view: ActivationView, *, title: str | None = None) -> Image.Image:
    """The view as one picture: the input (as the model sees it), the grid (with the prefix strip under
    it), and the top-k predictions below."""
    grid = Image.fromarray(view.picture)
    parts = []
    if view.input_image is not None:
        inp = view.input_image.convert("RGB")
        side = min(grid.height, max(160, inp.height))
        parts.append(inp.resize((side, round(inp.height * side / inp.width) if inp.width else side)))
    parts.append(grid)
    body = hstack(parts)
    shape = "x".join(str(d) for d in view.layer.shape)
    what = f"{view.layer.type}, {shape}"
    if view.query is not None:
        what += f", query {view.query}"
    elif view.strip is not None:
        what += f", prefix tokens below: {' '.join(view.layer.prefix)}"
    lines = [title or f"layer {view.layer.name} ({what})"]
    lines += [f"{p.probability * 100:5.1f}%  {p.label}" for p in view.predictions]
    cap = caption(lines, body.width)
    out = Image.new("RGB", (body.width, body.height + cap.height), (20, 20, 20))
    out.paste(body, (0, 0))
    out.paste(cap, (0, body.height))
    return out
