"""Unit views on an input (gradient, deconvnet, guided backprop), receptive fields and crops."""

from .filters import FILTERS, RAW, READABLE, Display, Filter, backprop_image, filter_map, gaussian_blur_reflect, overlay
from .receptive import AxisField, LayerField, ReceptiveField, crop, crop_image, layer_field, receptive_field
from .rules import MODES, Mode, NonlinearityError, RuleReport, plain_nonlinearities, relu_rules
from .views import SEEDS, At, BackpropResult, PlainGradientWarning, Seed, backprop_view, backprop_views

__all__ = [
    "MODES",
    "Mode",
    "At",
    "Seed",
    "SEEDS",
    "NonlinearityError",
    "PlainGradientWarning",
    "RuleReport",
    "relu_rules",
    "plain_nonlinearities",
    "BackpropResult",
    "backprop_view",
    "backprop_views",
    "AxisField",
    "LayerField",
    "ReceptiveField",
    "layer_field",
    "receptive_field",
    "crop",
    "crop_image",
    "FILTERS",
    "Filter",
    "Display",
    "READABLE",
    "RAW",
    "filter_map",
    "backprop_image",
    "overlay",
    "gaussian_blur_reflect",
]
