"""The names the library's options accept: one list per meaning, importable without torch.

The library's modules validate against these lists (``deepvis.backprop.MODES`` is
:data:`BACKPROP_MODES`, and so on), and the ``deepvis`` command builds its ``--help`` and its argument
checks from them: they live here, in a module that imports nothing heavy, because the command must
answer ``--help`` and argument errors without importing torch (about 2 s). Each ``Literal`` type is
the same list for type checkers; the tuple is read from it (``typing.get_args``), in the order
``--help`` lists them. The backprop view's two displays (:data:`READABLE_BACKPROP`, the default of the
live toolbox, ``deepvis backprop`` and notebooks, and :data:`RAW_BACKPROP`) live here for the same reason.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal, get_args

__all__ = [
    "BackpropMode",
    "BACKPROP_MODES",
    "BackpropFilter",
    "BACKPROP_FILTERS",
    "BackpropDisplay",
    "READABLE_BACKPROP",
    "RAW_BACKPROP",
    "OVERLAY_ALPHA",
    "BackpropSeed",
    "BACKPROP_SEEDS",
    "BACKPROP_AT",
    "COLORMAPS",
    "Normalization",
    "NORMALIZATIONS",
    "ObjectiveKind",
    "OBJECTIVE_KINDS",
    "LR_POLICIES",
    "OPTIMIZERS",
    "PARAMETERIZATIONS",
    "PRESET_NAMES",
    "EMBEDDINGS",
    "ENGINES",
    "MODEL_SPEC_HELP",
    "DATASET_SPEC_HELP",
]

#: the backward rule at ReLU-like units (:mod:`deepvis.backprop.rules`)
BackpropMode = Literal["gradient", "deconv", "guided"]
BACKPROP_MODES: tuple[BackpropMode, ...] = get_args(BackpropMode)

#: how a backprop result is drawn (:func:`deepvis.backprop.backprop_image`)
BackpropFilter = Literal["raw", "gray", "norm", "normblur", "rgb"]
BACKPROP_FILTERS: tuple[BackpropFilter, ...] = get_args(BackpropFilter)


@dataclass(frozen=True)
class BackpropDisplay:
    """How a view is drawn: a ``filter`` of :data:`BACKPROP_FILTERS` and the ``percentile`` of the view's
    magnitudes shown at full scale (100: the maximum)."""

    filter: BackpropFilter
    percentile: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: the readable view, the default of the live toolbox, ``deepvis backprop`` and a result's picture in a
#: notebook: the gradient's L2 norm over channels, scaled so that its 99th-percentile magnitude is white
#: (the maximum alone leaves a typical gradient or guided view of a photo nearly black: a few pixels
#: take the whole range)
READABLE_BACKPROP = BackpropDisplay("norm", 99.0)
#: the raw view, one key (or ``--filter raw --percentile 100``) away: the signed sum over channels
#: (green positive, red negative), scaled by the maximum
RAW_BACKPROP = BackpropDisplay("raw", 100.0)
#: the weight of a backprop view blended over its input (``overlay``, ``deepvis backprop --overlay``)
OVERLAY_ALPHA = 0.6


#: what the backward pass starts from: the unit's activation, or 1 (:func:`deepvis.backprop.backprop_view`)
BackpropSeed = Literal["activation", "one"]
BACKPROP_SEEDS: tuple[BackpropSeed, ...] = get_args(BackpropSeed)

#: the named start positions of a backward pass (besides an explicit ``(y, x)``): the channel map's peak
BACKPROP_AT: tuple[Literal["max"], ...] = ("max",)

#: the built-in colormaps (:mod:`deepvis.render.colormap`); any matplotlib name works too
COLORMAPS: tuple[str, ...] = ("gray", "viridis", "magma", "inferno", "plasma", "jet", "coolwarm")

#: how activations are scaled for display: one scale per layer, per channel, or none (:func:`deepvis.render.tile_grid`)
Normalization = Literal["layer", "channel", "none"]
NORMALIZATIONS: tuple[Normalization, ...] = get_args(Normalization)

#: what activation maximization maximizes: a unit at one position, or its channel's mean (:mod:`deepvis.optimize`)
ObjectiveKind = Literal["neuron", "channel"]
OBJECTIVE_KINDS: tuple[ObjectiveKind, ...] = get_args(ObjectiveKind)

#: activation maximization's learning-rate policies and optimizers (:class:`deepvis.optimize.Settings`)
LR_POLICIES: tuple[str, ...] = ("constant", "progress")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
#: image parameterizations of ``deepvis optimize --param`` (pixels, Fourier, MACO: :mod:`deepvis.optimize.maco`)
PARAMETERIZATIONS: tuple[str, ...] = ("pixel", "fourier", "maco")

#: the names of :data:`deepvis.optimize.PRESETS` (1-4: the paper's Table 1), in that mapping's order
PRESET_NAMES: tuple[str, ...] = ("1", "2", "3", "4", "none", "robust", "maco")

#: the 2-D map of the report's clusters: UMAP when installed (auto), PCA, or UMAP (:mod:`deepvis.analysis.clusters`)
EMBEDDINGS: tuple[str, ...] = ("auto", "pca", "umap")

#: the ways to name a model (:func:`deepvis.load_model`)
MODEL_SPEC_HELP = (
    "default (EfficientNet-Lite0, ImageNet, offline), lite1, lite2, torchvision:NAME, timm:NAME, "
    "path/to/file.py:factory or package.module:factory"
)

#: the ways to name a dataset (:func:`deepvis.open_dataset`)
DATASET_SPEC_HELP = "a folder of images (recursive; class subfolders give labels), a .txt file listing image paths, or 'demo'"

#: where the atlas's mining and the report's scan run (:mod:`deepvis.stats.engines`)
ENGINES: tuple[str, ...] = ("local", "ray")
