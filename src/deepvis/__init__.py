"""deepvis: a Deep Visualization Toolbox for PyTorch.

The library (this package) never imports the CLI or the server. The main entry points:

>>> import deepvis
>>> model = deepvis.load_model("default")  # a module you hold: deepvis.as_model(net[, preprocessing])
>>> image = deepvis.load_image(deepvis.sample_path("coffee"))
>>> acts = deepvis.capture(model, model.preprocess(image), ["blocks.3", "logits"])
>>> views = deepvis.backprop_view(model, model.preprocess(image), "blocks.3:7", mode="guided")
>>> results = deepvis.visualize(model, ["blocks.3:7", "logits:967"], preset=3)

In Jupyter every result shows itself (a picture or a table), and ``deepvis.show(model, image, layer=, unit=)``,
``deepvis.layers(model)`` and ``deepvis.toolbox(model)`` (the live toolbox in the cell) come from
:mod:`deepvis.notebook`.

``import deepvis`` imports nothing heavy: each name below is imported from its module on first use (torch
alone takes about 2 s to import, and ``deepvis --help`` must answer at once). ``deepvis.capture`` is the
function :func:`deepvis.capture.capture`, as it always was; the sub-package keeps its name in imports
(``from deepvis.capture import Unit``).

Shapes and units, in short (each function's docstring has the details): images are PIL images or
``(N, C, H, W)`` float tensors already normalized as the model expects (``model.preprocess`` makes them);
a unit is ``LAYER:CHANNEL`` or ``LAYER:CHANNEL@Y,X`` (``logits:N`` for class N); activations are the
layers' ``(N, C, H, W)`` or ``(N, C)`` outputs.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: every public name -> the module that defines it; imported on first access (see the module docstring)
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("load_model", "register_model", "Model", "Preprocessing"), "deepvis.models"),
    **dict.fromkeys(
        ("capture", "layer_table", "get_layer", "check_unit", "frozen", "LayerInfo", "Unit", "parse_unit", "parse_unit_set", "LOGITS"),
        "deepvis.capture",
    ),
    **dict.fromkeys(("load_image", "read_frames", "resolve_input", "sample_path", "sample_photos"), "deepvis.io"),
    **dict.fromkeys(("top_k", "Prediction"), "deepvis.predictions"),
    **dict.fromkeys(("tile_grid", "montage"), "deepvis.render"),
    **dict.fromkeys(("DeepvisError", "InputError", "ModelError", "WeightsError", "LayerError", "UnitError"), "deepvis.errors"),
    "visualize": "deepvis.optimize",
    **dict.fromkeys(("backprop_view", "backprop_views", "receptive_field"), "deepvis.backprop"),
    "open_dataset": "deepvis.datasets",
    **dict.fromkeys(("build_atlas", "open_atlas"), "deepvis.atlas"),
    **dict.fromkeys(("summarize", "write_report"), "deepvis.analysis"),
    **dict.fromkeys(("show", "toolbox", "layers", "as_model"), "deepvis.notebook"),
}

if TYPE_CHECKING:  # the same names, for type checkers and editors (re-exported: see __all__)
    from .analysis import summarize, write_report  # noqa: F401
    from .atlas import build_atlas, open_atlas  # noqa: F401
    from .backprop import backprop_view, backprop_views, receptive_field  # noqa: F401
    from .capture import LOGITS, LayerInfo, Unit, capture, check_unit, frozen, get_layer, layer_table, parse_unit, parse_unit_set  # noqa: F401
    from .datasets import open_dataset  # noqa: F401
    from .errors import DeepvisError, InputError, LayerError, ModelError, UnitError, WeightsError  # noqa: F401
    from .io import load_image, read_frames, resolve_input, sample_path, sample_photos  # noqa: F401
    from .models import Model, Preprocessing, load_model, register_model  # noqa: F401
    from .notebook import as_model, layers, show, toolbox  # noqa: F401
    from .optimize import visualize  # noqa: F401
    from .predictions import Prediction, top_k  # noqa: F401
    from .render import montage, tile_grid  # noqa: F401


def __getattr__(name: str) -> Any:
    if name == "notebook":  # the Jupyter layer (deepvis.notebook.as_model, ...), imported on first use too
        return importlib.import_module("deepvis.notebook")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deepvis' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


class _Package(types.ModuleType):
    """The ``deepvis`` module object: ``deepvis.capture`` stays the function :func:`capture`.

    Python binds every imported sub-package as an attribute of its parent, so importing
    ``deepvis.capture`` (which the library does) would otherwise replace the function by the
    sub-package of the same name.
    """

    def __setattr__(self, name: str, value: object) -> None:
        if name == "capture" and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package

__all__ = ["__version__", *_EXPORTS]
