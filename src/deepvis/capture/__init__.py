"""Capture: unit addressing, the layer table and its layouts, hooks and the early-stopping forward pass."""

from .hooks import CaptureCancelled, capture, forward_with_logits, prefix_key
from .layers import LayerInfo, check_unit, get_layer, layer_table, module_device, resolve_module, token_layer_info
from .layouts import Layout, parse_layout, parse_layout_options
from .state import eval_mode, frozen
from .units import LOGITS, Unit, parse_unit, parse_unit_set, split_token_layer, token_layer, unit_activation, unit_index

__all__ = [
    "capture",
    "CaptureCancelled",
    "forward_with_logits",
    "prefix_key",
    "Layout",
    "parse_layout",
    "parse_layout_options",
    "module_device",
    "LayerInfo",
    "layer_table",
    "get_layer",
    "token_layer_info",
    "check_unit",
    "resolve_module",
    "eval_mode",
    "frozen",
    "Unit",
    "parse_unit",
    "parse_unit_set",
    "token_layer",
    "split_token_layer",
    "unit_index",
    "unit_activation",
    "LOGITS",
]
