"""deepvis: a Deep Visualization Toolbox for PyTorch.

The library (this package) never imports the CLI or the server. The main entry points:

>>> import deepvis
>>> model = deepvis.load_model("default")
>>> image = deepvis.load_image(deepvis.sample_path("coffee"))
>>> acts = deepvis.capture(model, model.preprocess(image), ["blocks.3", "logits"])
>>> views = deepvis.backprop_view(model, model.preprocess(image), "blocks.3:7", mode="guided")
>>> results = deepvis.visualize(model, ["blocks.3:7", "logits:967"], preset=3)

The heavier parts (``visualize``, ``backprop_view``, ``receptive_field``, ``open_dataset``,
``build_atlas``, ``open_atlas``, ``summarize``, ``write_report``) are imported on first use.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .capture import LOGITS, LayerInfo, Unit, capture, check_unit, frozen, get_layer, layer_table, parse_unit, parse_unit_set
from .errors import DeepvisError, InputError, LayerError, ModelError, UnitError, WeightsError
from .io import load_image, read_frames, resolve_input, sample_path, sample_photos
from .models import Model, Preprocessing, load_model, register_model
from .predictions import Prediction, top_k
from .render import montage, tile_grid

#: names imported lazily on first access: name -> module
_LAZY = {
    "visualize": "deepvis.optimize",
    "backprop_view": "deepvis.backprop",
    "backprop_views": "deepvis.backprop",
    "receptive_field": "deepvis.backprop",
    "open_dataset": "deepvis.datasets",
    "build_atlas": "deepvis.atlas",
    "open_atlas": "deepvis.atlas",
    "summarize": "deepvis.analysis",
    "write_report": "deepvis.analysis",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'deepvis' has no attribute {name!r}")


__all__ = [
    "__version__",
    *_LAZY,
    "load_model",
    "register_model",
    "Model",
    "Preprocessing",
    "capture",
    "layer_table",
    "get_layer",
    "check_unit",
    "frozen",
    "LayerInfo",
    "Unit",
    "parse_unit",
    "parse_unit_set",
    "LOGITS",
    "load_image",
    "read_frames",
    "resolve_input",
    "sample_path",
    "sample_photos",
    "top_k",
    "Prediction",
    "tile_grid",
    "montage",
    "DeepvisError",
    "InputError",
    "ModelError",
    "WeightsError",
    "LayerError",
    "UnitError",
]
