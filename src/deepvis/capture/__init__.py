"""Capture: unit addressing, the layer table, hooks and the early-stopping forward pass."""

from .hooks import capture, forward_with_logits
from .layers import LayerInfo, check_unit, get_layer, layer_table, resolve_module
from .state import eval_mode, frozen
from .units import LOGITS, Unit, parse_unit, parse_unit_set

__all__ = [
    "capture",
    "forward_with_logits",
    "LayerInfo",
    "layer_table",
    "get_layer",
    "check_unit",
    "resolve_module",
    "eval_mode",
    "frozen",
    "Unit",
    "parse_unit",
    "parse_unit_set",
    "LOGITS",
]
