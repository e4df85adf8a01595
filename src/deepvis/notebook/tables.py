"""``deepvis.layers(model)``: the layer table (``deepvis layers``), shown as a table in a notebook."""

from __future__ import annotations

import torch.nn as nn

from ..capture import LayerInfo, layer_table
from ..display import html_table, panel
from ..models.model import Model
from .look import as_model

__all__ = ["LayerTable", "layers"]


class LayerTable(list[LayerInfo]):
    """A model's layers (a plain list of :class:`~deepvis.capture.LayerInfo`), shown as the table of
    ``deepvis layers``: name, type, layout, output shape as every tool reads it (C,H,W or C), units."""

    def __init__(self, rows: list[LayerInfo], model: str = "") -> None:
        super().__init__(rows)
        self.model = model

    def rows(self) -> list[tuple[object, ...]]:
        """One row per layer: (name, type, layout, shape, units or the reason it is not viewable)."""
        return [(r.name, r.type, r.layout.describe(), r.shape, r.units if r.viewable else f"not viewable: {r.layout.reason}") for r in self]

    def _repr_html_(self) -> str:
        """The table (IPython's display protocol)."""
        return panel(
            html_table(self.rows(), ("layer", "type", "layout", "output shape", "units")), title=f"{self.model}: {len(self)} layers"
        )


def layers(model: Model | nn.Module | str, *, everything: bool = False, filter: str | None = None) -> LayerTable:
    """The layers deepvis can show, in execution order (``everything``: also those it cannot, with the reason).

    Args:
        model: a :class:`~deepvis.models.Model`, an ``nn.Module`` or a spec string (see :func:`as_model`).
        everything: include the layers that are not viewable.
        filter: only layers whose name contains this text.
    """
    m = as_model(model)
    rows = [r for r in layer_table(m, everything=everything) if not filter or filter in r.name]
    return LayerTable(rows, m.name)
