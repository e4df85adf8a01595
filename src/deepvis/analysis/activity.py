"""Unit activity over a dataset: the most active units, dead units and sparsity, in one streaming pass.

Definitions (per unit, over every input and every map position; a vector layer has one position):

* **active**: an activation above 0 (:data:`ACTIVE_THRESHOLD`, as in the atlas);
* **mean**: the mean activation; **mean_max**: the mean over inputs of the map's maximum;
  **max**: the largest activation seen;
* **sparsity**: the fraction of activations that are not active (≤ 0). For ReLU-family outputs this
  is the fraction of zeros; ``frac_zero`` counts exact zeros separately;
* **dead**: never active on any input;
* **frac_inputs_active**: the fraction of inputs on which the unit is active somewhere.

The numbers come from the one statistics engine, :class:`deepvis.stats.LayerStats` (O(units × k)
memory whatever the dataset size: sums, extremes, counts and each unit's top-``k`` inputs by their
map maximum, with the position of that maximum), whether the report's scan computed it
(:func:`layer_activity`) or an atlas stored its :class:`~deepvis.stats.UnitStats`
(:func:`activity_from_unit_stats`): the same definitions either way, exact zeros included.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..stats import ACTIVE_THRESHOLD, EMPTY, LayerStats, UnitStats

__all__ = ["ACTIVE_THRESHOLD", "TopInput", "LayerActivity", "layer_activity", "activity_from_unit_stats", "activity_from_dict"]


@dataclass(frozen=True)
class TopInput:
    """One of a unit's top inputs: dataset ``sample`` index, the map maximum ``value`` and its position (y, x) (None for vectors)."""

    sample: int
    value: float
    position: tuple[int, int] | None

    def to_dict(self) -> dict[str, object]:
        return {"sample": self.sample, "value": self.value, "position": list(self.position) if self.position else None}


@dataclass
class LayerActivity:
    """Activity of every unit of one layer over a dataset; arrays are shaped (units,).

    ``top_samples``/``top_values``/``top_positions`` are (units, k): each unit's best inputs by map
    maximum, best first (sample −1 marks an empty slot; position −1 for vector layers).
    ``source`` says where the numbers come from: ``"computed"`` or ``"atlas"``.
    """

    layer: str
    shape: tuple[int, ...]
    images: int
    mean: np.ndarray
    mean_max: np.ndarray
    max: np.ndarray
    min: np.ndarray
    sparsity: np.ndarray
    frac_zero: np.ndarray
    frac_inputs_active: np.ndarray
    top_samples: np.ndarray
    top_values: np.ndarray
    top_positions: np.ndarray
    source: str = "computed"

    @property
    def units(self) -> int:
        return len(self.mean)

    @property
    def dead(self) -> np.ndarray:
        """Units never active on any input (bool, (units,))."""
        return (self.frac_inputs_active == 0) & (self.images > 0)

    @property
    def dead_units(self) -> list[int]:
        return [int(u) for u in np.flatnonzero(self.dead)]

    @property
    def layer_sparsity(self) -> float:
        """Fraction of all the layer's activations that are not active."""
        return float(np.mean(self.sparsity)) if self.units else float("nan")

    def most_active(self, by: str = "mean", n: int = 8) -> list[int]:
        """The ``n`` units with the highest ``mean``, ``mean_max`` or ``max`` (ties: lower unit first)."""
        if by not in ("mean", "mean_max", "max"):
            raise ValueError("by must be mean, mean_max or max")
        values = np.nan_to_num(getattr(self, by), nan=-np.inf)
        return [int(u) for u in np.argsort(-values, kind="stable")[:n]]

    def top_inputs(self, unit: int) -> list[TopInput]:
        """The unit's top inputs, best first (filled slots only)."""
        out = []
        w = self.shape[2] if len(self.shape) == 3 else 1
        for s, v, p in zip(self.top_samples[unit], self.top_values[unit], self.top_positions[unit]):
            if s < 0:
                break
            out.append(TopInput(int(s), float(v), divmod(int(p), w) if p >= 0 and len(self.shape) == 3 else None))
        return out

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "shape": list(self.shape),
            "images": self.images,
            "source": self.source,
            "layer_sparsity": self.layer_sparsity,
            "dead_units": self.dead_units,
            "mean": self.mean.tolist(),
            "mean_max": self.mean_max.tolist(),
            "max": self.max.tolist(),
            "min": self.min.tolist(),
            "sparsity": self.sparsity.tolist(),
            "frac_zero": self.frac_zero.tolist(),
            "frac_inputs_active": self.frac_inputs_active.tolist(),
            "top": [[t.to_dict() for t in self.top_inputs(u)] for u in range(self.units)],
        }


def activity_from_unit_stats(
    layer: str,
    shape: Sequence[int],
    stats: Sequence[UnitStats],
    top: Sequence[Sequence[TopInput]] | None = None,
    k: int = 4,
    *,
    source: str = "atlas",
) -> LayerActivity:
    """A :class:`LayerActivity` from the engine's per-unit statistics (:class:`~deepvis.stats.UnitStats`).

    Args:
        layer: the layer's name.
        shape: its output shape without the batch, (C, H, W) or (C,).
        stats: one :class:`~deepvis.stats.UnitStats` per unit (any order; all C units).
        top: per unit, its top inputs best first (at most ``k`` are kept); None or an empty list: none.
        k: top-input slots per unit.
        source: where the numbers come from (``"computed"`` or ``"atlas"``).

    Returns:
        The layer's activity; ``max``/``min`` are NaN when no input was counted.
    """
    dims = tuple(int(s) for s in shape)
    units = dims[0]
    rows = sorted(stats, key=lambda s: s.unit)
    if [s.unit for s in rows] != list(range(units)):
        raise ValueError(f"statistics for layer {layer} do not cover its {units} units")
    images = rows[0].images if rows else 0

    def col(name: str) -> np.ndarray:
        return np.array([float(getattr(s, name)) for s in rows], dtype=np.float64)

    samples = np.full((units, k), -1, dtype=np.int64)
    values = np.full((units, k), -np.inf)
    positions = np.full((units, k), -1, dtype=np.int64)
    w = dims[2] if len(dims) == 3 else 1
    for u, entries in enumerate(top or []):
        for r, t in enumerate(list(entries)[:k]):
            samples[u, r], values[u, r] = t.sample, t.value
            positions[u, r] = t.position[0] * w + t.position[1] if t.position is not None else -1
    nan = np.full(units, np.nan)
    return LayerActivity(
        layer=layer,
        shape=dims,
        images=images,
        mean=col("mean"),
        mean_max=col("mean_max"),
        max=col("max") if images else nan,
        min=col("min") if images else nan,
        sparsity=1.0 - col("frac_positions_active"),
        frac_zero=col("frac_zero"),
        frac_inputs_active=col("frac_active"),
        top_samples=samples,
        top_values=values,
        top_positions=positions,
        source=source,
    )


def layer_activity(state: LayerStats, shape: Sequence[int]) -> LayerActivity:
    """The :class:`LayerActivity` of a layer's engine state (the report's scan), ``shape`` (C, H, W) or (C,).

    Its top-``k`` slots are the state's (``k`` = ``state.k``), with position −1 for vector layers.
    """
    act = activity_from_unit_stats(state.layer, shape, state.unit_stats(), None, state.k, source="computed")
    samples = state.topk.samples.cpu().numpy()
    filled = samples != EMPTY
    act.top_samples = np.where(filled, samples, -1)
    act.top_values = state.topk.values.cpu().numpy().astype(np.float64)
    act.top_positions = np.where(filled, state.topk.positions.cpu().numpy(), -1)
    return act


def activity_from_dict(d: Mapping[str, Any], *, source: str | None = None) -> LayerActivity:
    """The :class:`LayerActivity` that :meth:`LayerActivity.to_dict` wrote (a report's JSON ``activity`` entry).

    Args:
        d: the dict (JSON nulls, written for NaN or infinite values, are read back as NaN).
        source: where the numbers come from; None keeps the dict's ``source``.

    Returns:
        The layer's activity: the same statistics as the report's (top inputs up to the longest list).
    """

    def arr(name: str) -> np.ndarray:
        return np.array([np.nan if v is None else float(v) for v in d[name]], dtype=np.float64)

    shape = tuple(int(s) for s in d["shape"])
    top = [list(t) for t in d.get("top") or []]
    units = len(d["mean"])
    k = max([len(t) for t in top] + [1])
    w = shape[2] if len(shape) == 3 else 1
    samples = np.full((units, k), -1, dtype=np.int64)
    values = np.full((units, k), -np.inf)
    positions = np.full((units, k), -1, dtype=np.int64)
    for u, entries in enumerate(top[:units]):
        for r, t in enumerate(entries):
            samples[u, r] = int(t["sample"])
            values[u, r] = np.nan if t.get("value") is None else float(t["value"])
            p = t.get("position")
            positions[u, r] = int(p[0]) * w + int(p[1]) if p else -1
    return LayerActivity(
        layer=str(d["layer"]),
        shape=shape,
        images=int(d["images"]),
        mean=arr("mean"),
        mean_max=arr("mean_max"),
        max=arr("max"),
        min=arr("min"),
        sparsity=arr("sparsity"),
        frac_zero=arr("frac_zero"),
        frac_inputs_active=arr("frac_inputs_active"),
        top_samples=samples,
        top_values=values,
        top_positions=positions,
        source=str(d.get("source", "computed")) if source is None else source,
    )
