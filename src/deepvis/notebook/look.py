"""``deepvis.show(model, image, layer=..., unit=...)``: the activation view of one image, in the cell."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch.nn as nn
from PIL import Image

from ..activations import ActivationView, activation_views, auto_scale, compose_view
from ..capture import LOGITS, layer_table
from ..display import html_table, img_tag, panel, png_bytes
from ..errors import DeepvisError, InputError
from ..io import load_image, resolve_input
from ..models import Model, Preprocessing, imagenet_class_names, load_model
from ..models.hubs import default_preprocessing_for
from ..render import apply_colormap, hstack, normalize_activations, tile_grid

__all__ = ["Look", "as_model", "show"]

#: the unit's map is drawn this many pixels on its longer side
_MAP_SIDE = 224


def as_model(model: Model | nn.Module | str, preprocessing: Preprocessing | None = None) -> Model:
    """A :class:`~deepvis.models.Model` for what a notebook holds.

    Args:
        model: a ``Model`` (returned as it is), a model spec string (``"default"``, ``"timm:resnet18"``,
            ... loaded with :func:`~deepvis.models.load_model`) or a bare ``nn.Module``: it is shared, not
            copied (deepvis's tools leave it as found), named ``custom``.
        preprocessing: the module's input (size, mean/std in the 0-1 pixel scale); None infers it: from the
            module's timm ``pretrained_cfg`` when it has one, else torchvision's ImageNet convention (224 px,
            ImageNet mean/std; 0.5/0.5 for a one-channel first convolution). ImageNet class names are
            attached when the output has 1000 logits.
    """
    if isinstance(model, Model):
        if preprocessing is not None:
            raise DeepvisError("a Model carries its own preprocessing: pass preprocessing= with an nn.Module only")
        return model
    if isinstance(model, str):
        loaded = load_model(model)
        if preprocessing is not None:  # the same model (its class names, weights' source), fed another way
            loaded.preprocessing = preprocessing
        return loaded
    if not isinstance(model, nn.Module):
        raise DeepvisError(f"expected a deepvis Model, an nn.Module or a model spec string, not {type(model).__name__}")
    m = Model(model, preprocessing or default_preprocessing_for(model), name=f"custom ({type(model).__name__})")
    logits = next((r for r in layer_table(m) if r.name == LOGITS), None)
    if logits is not None and logits.shape == (1000,):
        m.class_names = imagenet_class_names()
    return m


def _as_image(image: Image.Image | str | os.PathLike[str], mode: str) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert(mode)
    if isinstance(image, (str, os.PathLike)):
        return load_image(resolve_input(image), mode)
    raise InputError(f"expected a PIL image, a path or 'sample:NAME', not {type(image).__name__}")


def _default_layer(model: Model) -> str:
    """The deepest layer with spatial maps larger than 1x1 (the activation view's natural choice), else the output."""
    spatial = [r.name for r in layer_table(model) if r.viewable and r.spatial and r.shape[1] * r.shape[2] > 1]
    if spatial:
        return spatial[-1]
    return LOGITS


@dataclass
class Look:
    """What :func:`show` draws: the activation ``view`` (input, grid, predictions) and the ``unit``'s map."""

    view: ActivationView
    unit: int
    model: str

    def unit_map(self) -> Image.Image | None:
        """The unit's activation map over the input (``inferno``, its own scale), None for a vector layer."""
        a = self.view.activations[self.unit]
        if a.ndim != 2:
            return None
        rgb = apply_colormap(normalize_activations(a[None])[0], "inferno")
        h, w = a.shape
        s = _MAP_SIDE / max(h, w)
        return Image.fromarray(rgb).resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.NEAREST)

    def value(self) -> float:
        """The unit's activation: the maximum of its map, or its value on a vector layer."""
        return float(self.view.activations[self.unit].max())

    def _repr_png_(self) -> bytes:
        """The view and the unit's map side by side, as PNG (IPython's display protocol)."""
        title = f"{self.model}  {self.view.layer.name}:{self.unit} = {self.value():.4g}"
        parts = [compose_view(self.view, title=title)]
        m = self.unit_map()
        if m is not None:
            parts.append(m)
        return png_bytes(hstack(parts))

    def _repr_html_(self) -> str:
        """The view, the unit's map and the predictions as a table (IPython's display protocol)."""
        m = self.unit_map()
        caption = f"{self.view.layer.name}:{self.unit} (max {self.value():.4g})"
        unit_map = (
            f"<figure style='margin:0'>{img_tag(m, alt='unit map')}<figcaption>{caption}</figcaption></figure>" if m is not None else ""
        )
        preds = (
            html_table([(p.label, p.probability) for p in self.view.predictions], ("prediction", "probability"))
            if self.view.predictions
            else ""
        )
        body = f"<div style='display:flex;gap:12px;align-items:flex-start'>{img_tag(compose_view(self.view))}{unit_map}{preds}</div>"
        return panel(body, title=f"{self.model}: {self.view.layer.name} unit {self.unit}")


def show(
    model: Model | nn.Module | str,
    image: Image.Image | str | os.PathLike[str],
    *,
    layer: str | None = None,
    unit: int | None = None,
    preprocessing: Preprocessing | None = None,
    colormap: str = "gray",
    k: int = 5,
) -> Look:
    """The activation view of ``image`` in the cell: the input as the model sees it, ``layer``'s channels
    tiled (``unit`` framed), the top-``k`` predictions and the unit's map.

    Args:
        model: a ``Model``, an ``nn.Module`` or a spec string (see :func:`as_model`).
        image: a PIL image, an image file's path or ``"sample:NAME"``.
        layer: a layer name (``deepvis.layers(model)``); None: the deepest layer with maps larger than 1x1.
        unit: a channel of ``layer``; None: the most active channel on this image.
        preprocessing: for an ``nn.Module`` (see :func:`as_model`).
        colormap: of the grid (``deepvis.render.COLORMAPS``).
        k: predictions listed (0: none).

    Returns:
        A :class:`Look` (shows itself; ``.view`` holds the activations (C, H, W) or (C,)).
    """
    m = as_model(model, preprocessing)
    im = _as_image(image, m.preprocessing.pil_mode)
    name = layer or _default_layer(m)
    view = next(activation_views(m, [im], name, highlight=unit, colormap=colormap, k=k))
    if unit is None:  # the most active channel, framed in the grid drawn again
        a = view.activations
        unit = int(a.flatten(1).amax(1).argmax()) if a.ndim > 1 else int(a.argmax())
        view.grid = tile_grid(a, colormap=colormap, highlight=unit, scale=auto_scale(view.layer))
    return Look(view, unit, m.name)
