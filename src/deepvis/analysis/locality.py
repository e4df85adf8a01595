"""Locality: how concentrated in space a unit's response is.

Two measures, both computed on the positive part ``m = max(a, 0)`` of one unit's map (H × W) for one
input, and both 1 for a single active position and 0 for a uniform map:

**Peak-share locality** (the primary measure, ``locality``). Let ``p`` be the position of the map's
maximum (the first one in row-major order), ``D`` the positions within Euclidean distance
``r = radius · max(H, W)`` of ``p`` (clipped at the map's border), ``share = Σ_D m / Σ m`` the share of
the activation mass near the peak, and ``b = |D| / (H·W)`` the share a uniform map would have. Then

    locality = (share − b) / (1 − b)

A map whose mass lies entirely within ``r`` of its peak scores 1; a uniform map scores exactly 0
(wherever its "peak" is); a map with mass spread elsewhere can score below 0. Because ``r`` is a
fraction of the map's side, maps of different sizes are compared at the same relative scale (default
``radius = 0.15``: the peak and its four neighbours on a 7×7 map).

**Entropy locality** (``entropy_locality``): ``1 − H(q) / log(H·W)`` with ``q = m / Σ m`` and
``H(q) = −Σ q log q``. A point scores 1, a uniform map 0, a map spread evenly over ``k`` positions
``1 − log k / log(H·W)``. It needs no radius, but depends on the map's size.

Maps with no positive activation (``Σ m = 0``) have no locality (NaN) and are skipped. Per unit,
:class:`LocalityAccumulator` averages the per-input values **weighted by the input's peak
activation**, so the inputs that drive the unit most count most (sums kept exactly, so partial states
merge exactly); the result is in :class:`LayerLocality`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..stats import ExactSum, pack_arrays, unpack_arrays

__all__ = [
    "DEFAULT_RADIUS",
    "MapLocality",
    "map_locality",
    "LocalityAccumulator",
    "LayerLocality",
]

#: radius of the peak neighbourhood as a fraction of the map's longer side
DEFAULT_RADIUS = 0.15


@dataclass(frozen=True)
class MapLocality:
    """Per-map results of :func:`map_locality`, each shaped like the maps without (H, W).

    ``locality`` and ``entropy_locality`` are NaN where the map has no positive mass; ``peak`` is the
    map's maximum (of the positive part) and ``peak_y``/``peak_x`` its position.
    """

    locality: torch.Tensor
    entropy_locality: torch.Tensor
    peak: torch.Tensor
    peak_y: torch.Tensor
    peak_x: torch.Tensor

    @property
    def valid(self) -> torch.Tensor:
        """Maps with positive mass (bool)."""
        return ~torch.isnan(self.locality)


def neighbourhood_radius(height: int, width: int, radius: float = DEFAULT_RADIUS) -> float:
    """The peak neighbourhood's radius in map positions: ``radius · max(height, width)``."""
    return radius * max(height, width)


def map_locality(maps: torch.Tensor, radius: float = DEFAULT_RADIUS) -> MapLocality:
    """Locality of each map of ``maps`` (..., H, W) (any float dtype; computed in float32).

    See the module docs for the definitions. A 1×1 map has no locality (NaN).
    """
    if maps.ndim < 2:
        raise ValueError(f"maps must be (..., H, W), got shape {tuple(maps.shape)}")
    if radius <= 0:
        raise ValueError("radius must be positive")
    *lead, h, w = maps.shape
    m = maps.detach().float().clamp_min(0).reshape(-1, h, w)
    flat = m.reshape(m.shape[0], -1)
    mass = flat.sum(1)
    peak, arg = flat.max(1)  # first maximum in row-major order
    py, px = arg // w, arg % w
    n = h * w
    nan = torch.full_like(mass, float("nan"))
    if n < 2:
        shape = tuple(lead)
        return MapLocality(nan.reshape(shape), nan.reshape(shape), peak.reshape(shape), py.reshape(shape), px.reshape(shape))
    r = neighbourhood_radius(h, w, radius)
    yy = torch.arange(h, device=m.device, dtype=torch.float32).view(1, h, 1)
    xx = torch.arange(w, device=m.device, dtype=torch.float32).view(1, 1, w)
    near = (yy - py.view(-1, 1, 1).float()).square() + (xx - px.view(-1, 1, 1).float()).square() <= r * r + 1e-6
    inside = (m * near).reshape(m.shape[0], -1).sum(1)
    base = near.reshape(m.shape[0], -1).sum(1).float() / n
    ok = mass > 0
    safe_mass = torch.where(ok, mass, torch.ones_like(mass))
    share = inside / safe_mass
    denom = 1 - base
    loc = torch.where(ok & (denom > 0), (share - base) / torch.where(denom > 0, denom, torch.ones_like(denom)), nan)
    q = flat / safe_mass[:, None]
    ent = -torch.special.xlogy(q, q).sum(1)
    ent_loc = torch.where(ok, 1 - ent / math.log(n), nan)
    shape = tuple(lead)
    return MapLocality(loc.reshape(shape), ent_loc.reshape(shape), peak.reshape(shape), py.reshape(shape), px.reshape(shape))


@dataclass
class LayerLocality:
    """Locality of every unit of one spatial layer over a dataset (arrays shaped (units,)).

    ``locality``/``entropy_locality``: peak-weighted means over the inputs where the unit has positive
    mass (NaN for a unit that never has any); ``inputs``: how many inputs that is; ``radius``: the
    neighbourhood fraction used; ``map_size``: (H, W).
    """

    layer: str
    map_size: tuple[int, int]
    radius: float
    locality: np.ndarray
    entropy_locality: np.ndarray
    inputs: np.ndarray

    @property
    def units(self) -> int:
        return len(self.locality)

    def most_local(self, n: int = 8, *, min_inputs: int = 2) -> list[int]:
        """The ``n`` units with the highest locality among those with positive mass on at least ``min_inputs`` inputs."""
        ok = np.flatnonzero((self.inputs >= min_inputs) & np.isfinite(self.locality))
        order = ok[np.argsort(-self.locality[ok], kind="stable")]
        return [int(u) for u in order[:n]]

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "map_size": list(self.map_size),
            "radius": self.radius,
            "radius_positions": neighbourhood_radius(*self.map_size, self.radius),
            "locality": self.locality.tolist(),
            "entropy_locality": self.entropy_locality.tolist(),
            "inputs": self.inputs.tolist(),
        }


class LocalityAccumulator:
    """Streaming per-unit locality of one layer: feed (B, U, H, W) batches with :meth:`update`, read
    :meth:`result`.

    An :class:`~deepvis.stats.Accumulator` of the statistics engine: the peak-weighted sums are kept in
    fixed point (:class:`~deepvis.stats.ExactSum`), so states built from disjoint batches merge into
    exactly the state of one pass (the report's scan on Ray equals the local one).
    """

    def __init__(
        self, layer: str, units: int, map_size: tuple[int, int], radius: float = DEFAULT_RADIUS, device: torch.device | str = "cpu"
    ) -> None:
        self.layer = layer
        self.map_size = (int(map_size[0]), int(map_size[1]))
        self.radius = radius
        self.weight = ExactSum(units, device)
        self.weighted_loc = ExactSum(units, device)
        self.weighted_ent = ExactSum(units, device)
        self.inputs = torch.zeros(units, dtype=torch.int64, device=device)
        self.done: set[int] = set()

    @property
    def units(self) -> int:
        return int(self.inputs.shape[0])

    def update(self, acts: torch.Tensor, samples: torch.Tensor | None = None) -> None:
        """Add one batch of maps ``acts`` (B, U, H, W); ``samples`` (their dataset indices) are not needed."""
        res = map_locality(acts, self.radius)
        ok = res.valid
        w = torch.where(ok, res.peak, torch.zeros_like(res.peak)).double()
        self.weight.add(w.sum(0))
        self.weighted_loc.add((w * torch.nan_to_num(res.locality).double()).sum(0))
        self.weighted_ent.add((w * torch.nan_to_num(res.entropy_locality).double()).sum(0))
        self.inputs += ok.sum(0).to(self.inputs.device)

    def merge(self, other: LocalityAccumulator) -> None:
        """Fold in a state built from other batches (same layer, map size and radius)."""
        if (other.units, other.map_size, other.radius) != (self.units, self.map_size, self.radius):
            raise ValueError("cannot merge locality states of different layers or radii")
        overlap = self.done & other.done
        if overlap:
            raise ValueError(f"cannot merge locality states that both counted batch {min(overlap)}")
        self.weight.merge(other.weight)
        self.weighted_loc.merge(other.weighted_loc)
        self.weighted_ent.merge(other.weighted_ent)
        self.inputs += other.inputs.to(self.inputs.device)
        self.done |= other.done

    def to_bytes(self) -> bytes:
        """A compact, device-independent snapshot (npz)."""
        arrays: dict[str, Any] = {
            f"{name}_{part}": getattr(getattr(self, name), part).cpu().numpy() for name in _SUMS for part in ("whole", "frac")
        }
        arrays["inputs"] = self.inputs.cpu().numpy()
        arrays["map_size"] = np.array(self.map_size, np.int64)
        arrays["radius"] = np.array([self.radius], np.float64)
        arrays["done"] = np.array(sorted(self.done), np.int64)
        return pack_arrays(arrays)

    @classmethod
    def from_bytes(cls, layer: str, data: bytes, device: torch.device | str = "cpu") -> LocalityAccumulator:
        """The state :meth:`to_bytes` wrote, on ``device``."""
        a = unpack_arrays(data)
        ms = a["map_size"]
        out = cls(layer, len(a["inputs"]), (int(ms[0]), int(ms[1])), float(a["radius"][0]), device)
        for name in _SUMS:
            acc = getattr(out, name)
            acc.whole = torch.from_numpy(a[f"{name}_whole"].copy()).to(device)
            acc.frac = torch.from_numpy(a[f"{name}_frac"].copy()).to(device)
        out.inputs = torch.from_numpy(a["inputs"].copy()).to(device)
        out.done = {int(b) for b in a["done"]}
        return out

    def result(self) -> LayerLocality:
        """Per-unit peak-weighted mean locality (NaN for units never positive)."""
        wt = self.weight.value()
        safe = np.where(wt > 0, wt, 1.0)
        loc = np.where(wt > 0, self.weighted_loc.value() / safe, np.nan)
        ent = np.where(wt > 0, self.weighted_ent.value() / safe, np.nan)
        return LayerLocality(self.layer, self.map_size, self.radius, loc, ent, self.inputs.cpu().numpy().astype(np.int64))


_SUMS = ("weight", "weighted_loc", "weighted_ent")
