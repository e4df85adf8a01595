"""Streaming per-unit statistics and top-k, with exact merging of partial results: the one statistics
engine of deepvis, used by the atlas's mining pass and the report's scan (and so by everything that
reads them).

For every unit of a layer, :class:`LayerStats` keeps the ``k`` inputs with the highest activation —
for a conv unit, the maximum of its spatial map, with the position of that maximum — and running
statistics (:class:`StatsAccumulator`, read as :class:`UnitStats`), in memory O(units × k) whatever
the dataset size. Everything is kept on the activations' device (no host sync per batch).

**Order.** Entries are ranked by value (descending), ties broken by the smaller sample index; within
one map, ties between positions go to the first in row-major order. This is a total order, so the
top-k of a dataset is one well-defined list.

**Exact merging.** Two states built from disjoint sets of batches merge into exactly the state one
pass over both would give: top-k merging is a selection under a total order, maxima and counts are
associative, and the sums are accumulated in fixed point (:class:`ExactSum`), so their result does not
depend on the order of the batches. This is what lets shards be computed on different workers (and a
killed job resume from a checkpoint) with bit-identical results — provided each batch is the same set
of inputs wherever it runs (the engines split work on batch boundaries).

**The protocol.** Every accumulator an engine runs (:class:`Accumulator`: this module's
:class:`LayerStats`, and the report's locality, pooled-feature and thumbnail accumulators) reads one
layer's output batch by batch (``update(acts, samples)``), merges exactly with a state built from
other batches (``merge``), and travels as bytes (``to_bytes``/``from_bytes``), so that
:mod:`deepvis.stats.engines` can run any of them locally or on Ray workers.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from ..errors import LayerError

if TYPE_CHECKING:
    from typing import Self

__all__ = [
    "Accumulator",
    "INPUT",
    "EMPTY",
    "ACTIVE_THRESHOLD",
    "ExactSum",
    "TopK",
    "UnitStats",
    "StatsAccumulator",
    "LayerStats",
    "pack_arrays",
    "unpack_arrays",
]

#: the pseudo-layer name of the preprocessed input batch (N, C, H, W), for accumulators that read it
INPUT = "<input>"


def pack_arrays(arrays: dict[str, Any]) -> bytes:
    """Named arrays as one device-independent byte string (npz): the form every accumulator's
    ``to_bytes`` takes (checkpoints, transfer between workers)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def unpack_arrays(data: bytes) -> dict[str, np.ndarray]:
    """The arrays :func:`pack_arrays` packed, by name."""
    with np.load(io.BytesIO(data)) as z:
        return {k: z[k] for k in z.files}


class Accumulator(Protocol):
    """What an engine needs of a streaming, exactly mergeable accumulator.

    ``layer`` is the layer whose output it reads (:data:`INPUT` for the preprocessed input batch);
    ``done`` the set of batch numbers already counted (the engine adds to it after each batch).
    """

    layer: str
    done: set[int]

    def update(self, acts: torch.Tensor, samples: torch.Tensor) -> None:
        """Add one batch: ``acts`` the layer's output (B, ...), ``samples`` (B,) int64 dataset indices."""

    def merge(self, other: Self) -> None:
        """Fold in a state of the same kind built from other batches (they must not overlap)."""

    def to_bytes(self) -> bytes:
        """A compact, device-independent snapshot (for checkpoints and transfer between workers)."""

    @classmethod
    def from_bytes(cls, layer: str, data: bytes, device: torch.device | str = "cpu") -> Self:
        """The state :meth:`to_bytes` wrote, on ``device``."""


#: sample index of an empty top-k slot (sorts after every real sample at equal value)
EMPTY = np.iinfo(np.int64).max
#: a unit is "active" on an input where its activation is above this
ACTIVE_THRESHOLD = 0.0
_FRAC_BITS = 40


class ExactSum:
    """Per-unit sums that are exact and order-independent: each added float64 is split into an integer
    part and a fraction quantized to 2⁻⁴⁰, both accumulated in int64. Adding the same values in any
    order or grouping gives bit-identical totals (resolution 2⁻⁴⁰ per added value)."""

    def __init__(self, n: int, device: torch.device | str = "cpu") -> None:
        self.whole = torch.zeros(n, dtype=torch.int64, device=device)
        self.frac = torch.zeros(n, dtype=torch.int64, device=device)

    def add(self, x: torch.Tensor) -> None:
        """Add ``x`` (n,) (any float dtype; taken as float64) to the totals."""
        x = x.to(torch.float64)
        w = torch.floor(x)
        self.whole += w.to(torch.int64)
        self.frac += torch.round((x - w) * float(2**_FRAC_BITS)).to(torch.int64)

    def merge(self, other: ExactSum) -> None:
        """Add another state's totals (exact)."""
        self.whole += other.whole.to(self.whole.device)
        self.frac += other.frac.to(self.frac.device)

    def value(self) -> np.ndarray:
        """The totals as float64 (n,)."""
        whole = self.whole.cpu().numpy().astype(np.float64)
        frac = self.frac.cpu().numpy().astype(np.float64)
        return whole + frac / float(2**_FRAC_BITS)


class TopK:
    """The ``k`` best (value, sample, position) entries of each of ``units`` units.

    ``values`` (U, k) float32, ``samples`` (U, k) int64 (``EMPTY`` in unfilled slots) and ``positions``
    (U, k) int64 (flat row-major index into the map; -1 for vector layers), each row sorted by the
    module's total order.
    """

    def __init__(self, units: int, k: int, device: torch.device | str = "cpu") -> None:
        if k < 1:
            raise ValueError("k must be at least 1")
        self.k = k
        self.values = torch.full((units, k), float("-inf"), dtype=torch.float32, device=device)
        self.samples = torch.full((units, k), EMPTY, dtype=torch.int64, device=device)
        self.positions = torch.full((units, k), -1, dtype=torch.int64, device=device)

    @property
    def units(self) -> int:
        """How many units (rows)."""
        return self.values.shape[0]

    def update(self, values: torch.Tensor, samples: torch.Tensor, positions: torch.Tensor) -> None:
        """Offer candidates: ``values`` and ``positions`` (U, M), ``samples`` (U, M) or (M,)."""
        if samples.ndim == 1:
            samples = samples.unsqueeze(0).expand(values.shape[0], -1)
        dev = self.values.device
        self._select(
            torch.cat([self.values, values.to(dev, torch.float32)], 1),
            torch.cat([self.samples, samples.to(dev)], 1),
            torch.cat([self.positions, positions.to(dev)], 1),
        )

    def merge(self, other: TopK) -> None:
        """Merge another state built from a disjoint set of samples."""
        if other.units != self.units or other.k != self.k:
            raise ValueError("cannot merge top-k states of different shapes")
        self.update(other.values, other.samples, other.positions)

    def _select(self, v: torch.Tensor, s: torch.Tensor, p: torch.Tensor) -> None:
        v = torch.nan_to_num(v, nan=float("-inf"))
        # two stable sorts: by sample ascending, then by value descending → ties go to the smaller sample
        o = torch.argsort(s, dim=1, stable=True)
        v, s, p = v.gather(1, o), s.gather(1, o), p.gather(1, o)
        o = torch.argsort(v, dim=1, descending=True, stable=True)[:, : self.k]
        self.values, self.samples, self.positions = v.gather(1, o), s.gather(1, o), p.gather(1, o)

    def filled(self) -> np.ndarray:
        """How many slots of each unit hold a sample (U,)."""
        return (self.samples != EMPTY).sum(1).cpu().numpy()


@dataclass(frozen=True)
class UnitStats:
    """Statistics of one unit over a dataset.

    ``images``: inputs seen; ``positions``: map positions per input (1 for vector layers);
    ``mean``/``std``: over every position of every input; ``mean_max``: mean over inputs of the map's
    maximum; ``max``/``min``: extremes over everything; ``active_images``: inputs where the map's
    maximum is above :data:`ACTIVE_THRESHOLD` (0); ``active_positions``: (input, position) pairs above
    it; ``zero_positions``: (input, position) pairs exactly 0. Sums are kept too (``sum``, ``sum_sq``,
    ``sum_max``) so that analyses can combine them.
    """

    layer: str
    unit: int
    images: int
    positions: int
    sum: float
    sum_sq: float
    sum_max: float
    max: float
    min: float
    active_images: int
    active_positions: int
    zero_positions: int

    @property
    def mean(self) -> float:
        """Mean activation over every position of every input (NaN without inputs)."""
        n = self.images * self.positions
        return self.sum / n if n else float("nan")

    @property
    def std(self) -> float:
        """Standard deviation over every position of every input (population; NaN without inputs)."""
        n = self.images * self.positions
        if not n:
            return float("nan")
        return float(np.sqrt(max(0.0, self.sum_sq / n - self.mean**2)))

    @property
    def mean_max(self) -> float:
        """Mean over inputs of the map's maximum (NaN without inputs)."""
        return self.sum_max / self.images if self.images else float("nan")

    @property
    def frac_active(self) -> float:
        """Fraction of inputs on which the unit is active somewhere."""
        return self.active_images / self.images if self.images else float("nan")

    @property
    def frac_positions_active(self) -> float:
        """Fraction of all activations (inputs × positions) that are active; 1 − this is the sparsity."""
        n = self.images * self.positions
        return self.active_positions / n if n else float("nan")

    @property
    def frac_zero(self) -> float:
        """Fraction of all activations (inputs × positions) that are exactly 0."""
        n = self.images * self.positions
        return self.zero_positions / n if n else float("nan")

    @property
    def dead(self) -> bool:
        """Never active on any input."""
        return self.images > 0 and self.active_images == 0

    def to_dict(self) -> dict[str, object]:
        """The counts, sums and derived statistics, JSON-ready except for non-finite floats."""
        return {
            "layer": self.layer,
            "unit": self.unit,
            "images": self.images,
            "positions": self.positions,
            "mean": self.mean,
            "std": self.std,
            "mean_max": self.mean_max,
            "max": self.max,
            "min": self.min,
            "frac_active": self.frac_active,
            "frac_positions_active": self.frac_positions_active,
            "active_images": self.active_images,
            "active_positions": self.active_positions,
            "frac_zero": self.frac_zero,
            "zero_positions": self.zero_positions,
            "sum": self.sum,
            "sum_sq": self.sum_sq,
            "sum_max": self.sum_max,
        }


class StatsAccumulator:
    """Running per-unit sums, extremes and activity counts (exactly mergeable)."""

    def __init__(self, units: int, device: torch.device | str = "cpu") -> None:
        self.images = 0
        self.positions = 0
        self.sum = ExactSum(units, device)
        self.sum_sq = ExactSum(units, device)
        self.sum_max = ExactSum(units, device)
        self.max = torch.full((units,), float("-inf"), dtype=torch.float32, device=device)
        self.min = torch.full((units,), float("inf"), dtype=torch.float32, device=device)
        self.active_images = torch.zeros(units, dtype=torch.int64, device=device)
        self.active_positions = torch.zeros(units, dtype=torch.int64, device=device)
        self.zero_positions = torch.zeros(units, dtype=torch.int64, device=device)

    def update(self, flat: torch.Tensor, peak: torch.Tensor) -> None:
        """Add a batch: ``flat`` (B, U, P) activations (P positions per map), ``peak`` (B, U) their maxima."""
        self.images += flat.shape[0]
        self.positions = flat.shape[2]
        # per-map sums in float32 (fast; at most a few thousand positions), over the batch in float64
        self.sum.add(flat.sum(2).sum(0, dtype=torch.float64))
        self.sum_sq.add(torch.linalg.vecdot(flat, flat, dim=2).sum(0, dtype=torch.float64))
        self.sum_max.add(peak.sum(0, dtype=torch.float64))
        self.max = torch.maximum(self.max, peak.max(0).values)
        self.min = torch.minimum(self.min, flat.amin(2).min(0).values)
        self.active_images += torch.count_nonzero(peak > ACTIVE_THRESHOLD, dim=0)
        self.active_positions += torch.count_nonzero(flat > ACTIVE_THRESHOLD, dim=(0, 2))
        self.zero_positions += torch.count_nonzero(flat == 0, dim=(0, 2))

    def merge(self, other: StatsAccumulator) -> None:
        """Fold in a state built from other inputs (exact; maps of the same size)."""
        if self.images and other.images and self.positions != other.positions:
            raise ValueError("cannot merge statistics of maps of different sizes")
        self.images += other.images
        self.positions = self.positions or other.positions
        for name in ("sum", "sum_sq", "sum_max"):
            getattr(self, name).merge(getattr(other, name))
        self.max = torch.maximum(self.max, other.max.to(self.max.device))
        self.min = torch.minimum(self.min, other.min.to(self.min.device))
        self.active_images += other.active_images.to(self.active_images.device)
        self.active_positions += other.active_positions.to(self.active_positions.device)
        self.zero_positions += other.zero_positions.to(self.zero_positions.device)

    def result(self, layer: str) -> list[UnitStats]:
        """One :class:`UnitStats` per unit, in unit order."""
        s, sq, sm = self.sum.value(), self.sum_sq.value(), self.sum_max.value()
        mx, mn = self.max.cpu().numpy(), self.min.cpu().numpy()
        ai, ap = self.active_images.cpu().numpy(), self.active_positions.cpu().numpy()
        zp = self.zero_positions.cpu().numpy()
        return [
            UnitStats(
                layer,
                u,
                self.images,
                self.positions,
                float(s[u]),
                float(sq[u]),
                float(sm[u]),
                float(mx[u]),
                float(mn[u]),
                int(ai[u]),
                int(ap[u]),
                int(zp[u]),
            )
            for u in range(len(s))
        ]


class LayerStats:
    """Top-k and statistics of every unit of one layer, plus which batches went into them.

    ``map_size`` is the (H, W) of the layer's maps (None for a vector layer); ``done`` the set of batch
    numbers already counted (see :func:`~deepvis.stats.engines.batch_indices`).
    """

    def __init__(self, layer: str, units: int, k: int, map_size: tuple[int, int] | None, device: torch.device | str = "cpu") -> None:
        self.layer = layer
        self.map_size = map_size
        self.topk = TopK(units, k, device)
        self.stats = StatsAccumulator(units, device)
        self.done: set[int] = set()

    @property
    def units(self) -> int:
        """How many units the layer has."""
        return self.topk.units

    @property
    def k(self) -> int:
        """Top-k slots per unit."""
        return self.topk.k

    def update(self, acts: torch.Tensor, samples: torch.Tensor) -> None:
        """Add one batch: ``acts`` (B, U, H, W) or (B, U), ``samples`` (B,) their dataset indices."""
        if acts.shape[0] == 0:
            return
        b, u = acts.shape[:2]
        maps = tuple(acts.shape[2:]) or None
        if u != self.units or (self.map_size is not None and maps != tuple(self.map_size)):
            want = (self.units, *(self.map_size or ()))
            raise LayerError(
                f"layer {self.layer} gave shape {tuple(acts.shape[1:])}, expected {want}: all inputs must have the model's input size"
            )
        flat = acts.detach().reshape(b, u, -1).float()
        peak, pos = flat.max(2)  # first maximum in row-major order
        if acts.ndim == 2:
            pos = torch.full_like(pos, -1)
        self.topk.update(peak.T, samples.to(peak.device), pos.T)
        self.stats.update(flat, peak)

    def merge(self, other: LayerStats) -> None:
        """Fold in a state mined from other batches (they must not overlap)."""
        overlap = self.done & other.done
        if overlap:
            raise ValueError(f"cannot merge statistics states that both counted batch {min(overlap)}")
        self.topk.merge(other.topk)
        self.stats.merge(other.stats)
        self.done |= other.done

    def top(self, unit: int) -> list[tuple[float, int, tuple[int, int] | None]]:
        """The ranked ``(value, sample, (y, x) or None)`` entries of ``unit`` (filled slots only)."""
        v = self.topk.values[unit].cpu().tolist()
        s = self.topk.samples[unit].cpu().tolist()
        p = self.topk.positions[unit].cpu().tolist()
        out = []
        for value, sample, flat in zip(v, s, p):
            if sample == EMPTY:
                break
            pos = None if flat < 0 or self.map_size is None else divmod(int(flat), self.map_size[1])
            out.append((float(value), int(sample), pos))
        return out

    def unit_stats(self) -> list[UnitStats]:
        """The statistics of every unit (see :class:`UnitStats`), in unit order."""
        return self.stats.result(self.layer)

    # -- serialization (checkpoints, transfer between workers) ---------------------------------------
    def to_bytes(self) -> bytes:
        """A compact, device-independent snapshot (npz)."""
        st = self.stats
        arrays: dict[str, Any] = {
            "values": self.topk.values.cpu().numpy(),
            "samples": self.topk.samples.cpu().numpy(),
            "positions": self.topk.positions.cpu().numpy(),
            "sum_whole": st.sum.whole.cpu().numpy(),
            "sum_frac": st.sum.frac.cpu().numpy(),
            "sq_whole": st.sum_sq.whole.cpu().numpy(),
            "sq_frac": st.sum_sq.frac.cpu().numpy(),
            "max_whole": st.sum_max.whole.cpu().numpy(),
            "max_frac": st.sum_max.frac.cpu().numpy(),
            "max": st.max.cpu().numpy(),
            "min": st.min.cpu().numpy(),
            "active_images": st.active_images.cpu().numpy(),
            "active_positions": st.active_positions.cpu().numpy(),
            "zero_positions": st.zero_positions.cpu().numpy(),
            "counts": np.array([st.images, st.positions], np.int64),
            "map_size": np.array(self.map_size if self.map_size else (-1, -1), np.int64),
            "done": np.array(sorted(self.done), np.int64),
        }
        return pack_arrays(arrays)

    @classmethod
    def from_bytes(cls, layer: str, data: bytes, device: torch.device | str = "cpu") -> LayerStats:
        """The state :meth:`to_bytes` wrote, on ``device``."""
        a = unpack_arrays(data)
        units, k = a["values"].shape
        ms = tuple(int(v) for v in a["map_size"])
        out = cls(layer, units, k, None if ms[0] < 0 else (ms[0], ms[1]), device)
        t = lambda name: torch.from_numpy(a[name].copy()).to(device)
        out.topk.values, out.topk.samples, out.topk.positions = t("values"), t("samples"), t("positions")
        st = out.stats
        st.sum.whole, st.sum.frac = t("sum_whole"), t("sum_frac")
        st.sum_sq.whole, st.sum_sq.frac = t("sq_whole"), t("sq_frac")
        st.sum_max.whole, st.sum_max.frac = t("max_whole"), t("max_frac")
        st.max, st.min = t("max"), t("min")
        st.active_images, st.active_positions, st.zero_positions = t("active_images"), t("active_positions"), t("zero_positions")
        st.images, st.positions = int(a["counts"][0]), int(a["counts"][1])
        out.done = {int(b) for b in a["done"]}
        return out

    def equal(self, other: LayerStats) -> bool:
        """Bit-identical states (same entries, same sums, same batches)."""
        return self.to_bytes() == other.to_bytes()
