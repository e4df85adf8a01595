"""Unit activity over a dataset: the most active units, dead units and sparsity, in one streaming pass.

Definitions (per unit, over every input and every map position; a vector layer has one position):

* **active**: an activation above 0 (:data:`ACTIVE_THRESHOLD`, as in the atlas);
* **mean**: the mean activation; **mean_max**: the mean over inputs of the map's maximum;
  **max**: the largest activation seen;
* **sparsity**: the fraction of activations that are not active (≤ 0). For ReLU-family outputs this
  is the fraction of zeros; ``frac_zero`` counts exact zeros separately;
* **dead**: never active on any input;
* **frac_inputs_active**: the fraction of inputs on which the unit is active somewhere.

:class:`ActivityAccumulator` keeps O(units × k) memory whatever the dataset size: sums, extremes,
counts and each unit's top-``k`` inputs by their map maximum (with the position of that maximum).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..atlas.mining import ACTIVE_THRESHOLD  # one definition of "active", shared with the atlas statistics

__all__ = ["ACTIVE_THRESHOLD", "TopInput", "LayerActivity", "ActivityAccumulator", "activity_from_unit_stats"]


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


class ActivityAccumulator:
    """Streaming activity statistics of one layer: feed batches with :meth:`update`, read :meth:`result`."""

    def __init__(self, layer: str, shape: Sequence[int], k: int = 4, device: torch.device | str = "cpu") -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        units = int(shape[0])
        self.layer = layer
        self.shape = tuple(int(s) for s in shape)
        self.k = k
        self.images = 0
        f64 = dict(dtype=torch.float64, device=device)
        i64 = dict(dtype=torch.int64, device=device)
        self.sum = torch.zeros(units, **f64)
        self.sum_max = torch.zeros(units, **f64)
        self.max = torch.full((units,), float("-inf"), dtype=torch.float32, device=device)
        self.min = torch.full((units,), float("inf"), dtype=torch.float32, device=device)
        self.active = torch.zeros(units, **i64)
        self.zero = torch.zeros(units, **i64)
        self.active_inputs = torch.zeros(units, **i64)
        self.positions = 0
        self.top_values = torch.full((units, k), float("-inf"), dtype=torch.float32, device=device)
        self.top_samples = torch.full((units, k), -1, **i64)
        self.top_positions = torch.full((units, k), -1, **i64)

    def update(self, acts: torch.Tensor, samples: torch.Tensor | Sequence[int]) -> None:
        """Add one batch: ``acts`` (B, U, H, W) or (B, U) and ``samples`` (B,) their dataset indices."""
        if acts.shape[0] == 0:
            return
        b, u = acts.shape[:2]
        if u != self.shape[0]:
            raise ValueError(f"layer {self.layer} gave {u} units, expected {self.shape[0]}")
        flat = acts.detach().reshape(b, u, -1).float()
        self.positions = flat.shape[2]
        self.images += b
        peak, pos = flat.max(2)  # (B, U); first maximum in row-major order
        if acts.ndim == 2:
            pos = torch.full_like(pos, -1)
        self.sum += flat.sum(2).double().sum(0)  # per-map sums in float32, accumulated in float64
        self.sum_max += peak.double().sum(0)
        self.max = torch.maximum(self.max, peak.max(0).values)
        self.min = torch.minimum(self.min, flat.amin(2).min(0).values)
        self.active += (flat > ACTIVE_THRESHOLD).sum((0, 2))
        self.zero += (flat == 0).sum((0, 2))
        self.active_inputs += (peak > ACTIVE_THRESHOLD).sum(0)
        ids = torch.as_tensor(samples, dtype=torch.int64, device=flat.device).view(1, b).expand(u, b)
        values = torch.cat([self.top_values, peak.T], 1)
        order = torch.argsort(values, dim=1, descending=True, stable=True)[:, : self.k]
        self.top_values = values.gather(1, order)
        self.top_samples = torch.cat([self.top_samples, ids], 1).gather(1, order)
        self.top_positions = torch.cat([self.top_positions, pos.T], 1).gather(1, order)

    def result(self) -> LayerActivity:
        n = self.images * self.positions
        nan = np.full(self.shape[0], np.nan)

        def per(x: torch.Tensor, count: int) -> np.ndarray:
            return x.cpu().numpy().astype(np.float64) / count if count else nan

        filled = torch.isfinite(self.top_values)
        return LayerActivity(
            layer=self.layer,
            shape=self.shape,
            images=self.images,
            mean=per(self.sum, n),
            mean_max=per(self.sum_max, self.images),
            max=self.max.cpu().numpy().astype(np.float64) if self.images else nan,
            min=self.min.cpu().numpy().astype(np.float64) if self.images else nan,
            sparsity=1.0 - per(self.active, n),
            frac_zero=per(self.zero, n),
            frac_inputs_active=per(self.active_inputs, self.images),
            top_samples=torch.where(filled, self.top_samples, -1).cpu().numpy(),
            top_values=self.top_values.cpu().numpy().astype(np.float64),
            top_positions=torch.where(filled, self.top_positions, -1).cpu().numpy(),
        )


def activity_from_unit_stats(
    layer: str,
    shape: Sequence[int],
    stats: Sequence[object],
    top: Sequence[Sequence[tuple[int, float, tuple[int, int] | None]]] | None = None,
    k: int = 4,
) -> LayerActivity:
    """A :class:`LayerActivity` from per-unit statistics kept elsewhere (the atlas's ``UnitStats``).

    Each element of ``stats`` needs ``unit``, ``images``, ``mean``, ``mean_max``, ``max``, ``min``,
    ``frac_active`` and ``frac_positions_active``; ``top[u]`` lists ``(sample, value, (y, x) or None)``.
    The atlas does not count exact zeros, so ``frac_zero`` is NaN.
    """
    shape = tuple(int(s) for s in shape)
    units = shape[0]
    rows = sorted(stats, key=lambda s: s.unit)  # type: ignore[attr-defined]
    if len(rows) != units or [s.unit for s in rows] != list(range(units)):  # type: ignore[attr-defined]
        raise ValueError(f"statistics for layer {layer} do not cover its {units} units")
    col = lambda name: np.array([float(getattr(s, name)) for s in rows], dtype=np.float64)
    samples = np.full((units, k), -1, dtype=np.int64)
    values = np.full((units, k), -np.inf)
    positions = np.full((units, k), -1, dtype=np.int64)
    w = shape[2] if len(shape) == 3 else 1
    for u, entries in enumerate(top or []):
        for r, (s, v, p) in enumerate(list(entries)[:k]):
            samples[u, r], values[u, r] = s, v
            positions[u, r] = p[0] * w + p[1] if p is not None else -1
    return LayerActivity(
        layer=layer,
        shape=shape,
        images=int(rows[0].images) if rows else 0,  # type: ignore[attr-defined]
        mean=col("mean"),
        mean_max=col("mean_max"),
        max=col("max"),
        min=col("min"),
        sparsity=1.0 - col("frac_positions_active"),
        frac_zero=np.full(units, np.nan),
        frac_inputs_active=col("frac_active"),
        top_samples=samples,
        top_values=values,
        top_positions=positions,
        source="atlas",
    )
