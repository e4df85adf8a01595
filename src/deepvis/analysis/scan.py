"""The report's scan: one forward pass over the inputs, on the statistics engine (:mod:`deepvis.stats`).

For every chosen layer the scan keeps four streaming states, each an exactly mergeable
:class:`~deepvis.stats.Accumulator`, so that the scan runs on the same engines as the atlas (``local``
or ``ray``) with equal results:

* ``activity:LAYER`` — :class:`~deepvis.stats.LayerStats` (per-unit statistics and top-k), read as a
  :class:`~.activity.LayerActivity`;
* ``locality:LAYER`` — :class:`~.locality.LocalityAccumulator` (spatial layers with at least 2 positions);
* ``features:LAYER`` — :class:`FeatureAccumulator`, the spatially pooled activations (N × C);
* ``thumbnails`` — :class:`ThumbnailAccumulator`, small pictures of the inputs as the model saw them.

Pooled features and thumbnails are kept per sample and ordered by sample index, so merging partial
states (from other workers, in any order) gives exactly the one-pass result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..capture import LayerInfo, get_layer
from ..datasets import Batch, ImageDataset
from ..models.model import Model
from ..models.preprocessing import Preprocessing
from ..runtime import Autocast, autocast_name
from ..stats import INPUT, Accumulator, Engine, LayerStats, num_batches, pack_arrays, unpack_arrays, update_states
from .activity import LayerActivity, layer_activity
from .locality import DEFAULT_RADIUS, LayerLocality, LocalityAccumulator
from .probe import pool_features

__all__ = ["THUMBNAIL_SIZE", "FeatureAccumulator", "ThumbnailAccumulator", "ScanPlan", "ScanResult", "scan", "scan_dataset"]

#: side of the stored input thumbnails, in pixels
THUMBNAIL_SIZE = 64


class FeatureAccumulator:
    """The spatially pooled activations of one layer, one row of C float32 per input
    (:func:`~.probe.pool_features`), kept with their sample indices; :meth:`result` orders them by sample."""

    def __init__(self, layer: str, channels: int) -> None:
        self.layer = layer
        self.channels = channels
        self.done: set[int] = set()
        self._samples: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []

    def update(self, acts: torch.Tensor, samples: torch.Tensor) -> None:
        """Add one batch: ``acts`` (B, C, H, W) or (B, C), ``samples`` (B,) their dataset indices."""
        self._samples.append(samples.cpu().numpy().astype(np.int64))
        self._rows.append(pool_features(acts))

    def merge(self, other: FeatureAccumulator) -> None:
        """Fold in the rows of other batches."""
        self._samples += other._samples
        self._rows += other._rows
        self.done |= other.done

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(samples (N,) int64 ascending, features (N, C) float32 in the same order)."""
        if not self._rows:
            return np.zeros(0, np.int64), np.zeros((0, self.channels), np.float32)
        samples = np.concatenate(self._samples)
        order = np.argsort(samples, kind="stable")
        return samples[order], np.concatenate(self._rows)[order]

    def to_bytes(self) -> bytes:
        """A compact snapshot (npz)."""
        samples, rows = self.result()
        return pack_arrays(
            {"samples": samples, "rows": rows, "channels": np.array([self.channels]), "done": np.array(sorted(self.done), np.int64)}
        )

    @classmethod
    def from_bytes(cls, layer: str, data: bytes, device: torch.device | str = "cpu") -> FeatureAccumulator:
        """The state :meth:`to_bytes` wrote (kept on the host whatever ``device``)."""
        a = unpack_arrays(data)
        out = cls(layer, int(a["channels"][0]))
        if len(a["samples"]):
            out._samples, out._rows = [a["samples"]], [a["rows"]]
        out.done = {int(b) for b in a["done"]}
        return out


class ThumbnailAccumulator:
    """``size``-pixel square thumbnails of the inputs as the model saw them (antialiased bilinear
    resize of the preprocessed batch, shown through ``preprocessing``), kept as RGB uint8 per sample.
    A state read back with :meth:`from_bytes` has no ``preprocessing``: it merges and reads, nothing more."""

    layer = INPUT

    def __init__(self, preprocessing: Preprocessing | None, size: int = THUMBNAIL_SIZE) -> None:
        self.preprocessing = preprocessing
        self.size = size
        self.done: set[int] = set()
        self.images: dict[int, np.ndarray] = {}

    def update(self, acts: torch.Tensor, samples: torch.Tensor) -> None:
        """Add one batch: ``acts`` the preprocessed inputs (B, C, H, W), ``samples`` (B,)."""
        if self.preprocessing is None:
            raise ValueError("a thumbnail state read back from bytes cannot be updated")
        small = F.interpolate(acts.float(), size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        for i, row in zip(samples.tolist(), small.cpu()):
            self.images[int(i)] = np.asarray(self.preprocessing.to_image(row).convert("RGB"))

    def merge(self, other: ThumbnailAccumulator) -> None:
        """Fold in the thumbnails of other batches."""
        self.images.update(other.images)
        self.done |= other.done

    def result(self) -> dict[int, Image.Image]:
        """Sample index → thumbnail (RGB, ``size`` × ``size``)."""
        return {i: Image.fromarray(self.images[i], "RGB") for i in sorted(self.images)}

    def to_bytes(self) -> bytes:
        """A compact snapshot (npz)."""
        keys = sorted(self.images)
        pixels = np.stack([self.images[i] for i in keys]) if keys else np.zeros((0, self.size, self.size, 3), np.uint8)
        return pack_arrays(
            {
                "samples": np.array(keys, np.int64),
                "pixels": pixels,
                "size": np.array([self.size]),
                "done": np.array(sorted(self.done), np.int64),
            }
        )

    @classmethod
    def from_bytes(cls, layer: str, data: bytes, device: torch.device | str = "cpu") -> ThumbnailAccumulator:
        """The state :meth:`to_bytes` wrote: pictures only (it can be merged and read, not updated)."""
        a = unpack_arrays(data)
        out = cls(None, int(a["size"][0]))
        out.images = {int(i): a["pixels"][k] for k, i in enumerate(a["samples"])}
        out.done = {int(b) for b in a["done"]}
        return out


def _map_size(shape: Sequence[int]) -> tuple[int, int] | None:
    return (int(shape[1]), int(shape[2])) if len(shape) == 3 else None


def _has_locality(shape: Sequence[int]) -> bool:
    return len(shape) == 3 and shape[1] * shape[2] >= 2


@dataclass(frozen=True)
class ScanPlan:
    """What the scan keeps (a :class:`~deepvis.stats.StatsPlan`): for each of ``layers`` ((name, output
    shape (C, H, W) or (C,)), in depth order) its activity with ``top_k`` inputs per unit, its locality
    at ``radius`` (spatial layers) and its pooled features; thumbnails of ``thumbnail_size`` pixels
    shown through ``thumbnails`` (None: no thumbnails); ``batch_size`` inputs per batch; ``autocast``
    the forward pass's autocast (``"bf16"``, ``"fp16"``; None: off; the states accumulate in float32)."""

    layers: tuple[tuple[str, tuple[int, ...]], ...]
    top_k: int = 4
    radius: float = DEFAULT_RADIUS
    batch_size: int = 32
    thumbnails: Preprocessing | None = None
    thumbnail_size: int = THUMBNAIL_SIZE
    autocast: str | None = None

    def empty_states(self, device: torch.device | str = "cpu", names: Iterable[str] | None = None) -> dict[str, Accumulator]:
        """Fresh states (``activity:L``, ``locality:L``, ``features:L``, ``thumbnails``); ``names`` picks some."""
        states: dict[str, Accumulator] = {}
        for name, shape in self.layers:
            states[f"activity:{name}"] = LayerStats(name, shape[0], self.top_k, _map_size(shape), device)
            if _has_locality(shape):
                states[f"locality:{name}"] = LocalityAccumulator(name, shape[0], (shape[1], shape[2]), self.radius, device)
            states[f"features:{name}"] = FeatureAccumulator(name, shape[0])
        if self.thumbnails is not None:
            states["thumbnails"] = ThumbnailAccumulator(self.thumbnails, self.thumbnail_size)
        if names is not None:
            states = {n: states[n] for n in names}
        return states


@dataclass
class ScanResult:
    """What one pass over a dataset records (see :func:`scan`): ``samples`` the dataset indices counted
    (ascending), ``features`` per layer (len(samples), C) in that order, ``thumbnails`` per sample,
    ``skipped`` the unreadable inputs (sample, reason)."""

    layers: list[LayerInfo]
    samples: list[int]
    activity: dict[str, LayerActivity]
    locality: dict[str, LayerLocality]
    features: dict[str, np.ndarray]
    thumbnails: dict[int, Image.Image]
    skipped: list[tuple[int, str]]


def _plan(
    model: Model, layers: Sequence[str], top_k: int, radius: float, batch_size: int, thumbnails: bool, size: int, autocast: Autocast
) -> ScanPlan:
    infos = sorted({n: get_layer(model, n) for n in dict.fromkeys(layers)}.values(), key=lambda i: i.order)
    return ScanPlan(
        tuple((i.name, tuple(i.shape)) for i in infos),
        top_k,
        radius,
        batch_size,
        model.preprocessing if thumbnails else None,
        size,
        autocast_name(autocast),
    )


def _result(model: Model, plan: ScanPlan, states: dict[str, Accumulator], skipped: list[tuple[int, str]]) -> ScanResult:
    activity: dict[str, LayerActivity] = {}
    locality: dict[str, LayerLocality] = {}
    features: dict[str, np.ndarray] = {}
    samples = np.zeros(0, np.int64)
    for name, shape in plan.layers:
        st = states[f"activity:{name}"]
        loc = states.get(f"locality:{name}")
        feat = states[f"features:{name}"]
        assert isinstance(st, LayerStats) and isinstance(feat, FeatureAccumulator)
        activity[name] = layer_activity(st, shape)
        if isinstance(loc, LocalityAccumulator):
            locality[name] = loc.result()
        samples, features[name] = feat.result()
    thumbs = states.get("thumbnails")
    return ScanResult(
        [get_layer(model, name) for name, _ in plan.layers],
        [int(s) for s in samples],
        activity,
        locality,
        features,
        thumbs.result() if isinstance(thumbs, ThumbnailAccumulator) else {},
        sorted(skipped),
    )


def scan(
    model: Model,
    batches: Iterable[Batch],
    layers: Sequence[str],
    *,
    top_k: int = 4,
    radius: float = DEFAULT_RADIUS,
    thumbnails: bool = True,
    thumbnail_size: int = THUMBNAIL_SIZE,
    on_batch: Callable[[int], object] | None = None,
    autocast: Autocast = None,
) -> ScanResult:
    """One forward pass over ``batches`` recording activity, locality, pooled features and thumbnails for ``layers``.

    ``batches`` yields :class:`~deepvis.datasets.Batch` es (``indices`` are dataset indices, each seen
    once); ``on_batch(n)`` is called after each batch with the number of inputs it held or skipped.
    ``autocast`` (``"bf16"``, ``"fp16"``; None: off) runs the forward passes under
    :func:`deepvis.runtime.autocast`; every state accumulates in float32 (thumbnails are made from
    the inputs, which autocast does not change).
    :func:`scan_dataset` does the same over a dataset on an engine (``local`` or ``ray``).
    """
    plan = _plan(model, layers, top_k, radius, 1, thumbnails, thumbnail_size, autocast)
    states = plan.empty_states(model.device)
    skipped: list[tuple[int, str]] = []
    for batch in batches:
        skipped += batch.skipped
        if batch.indices:
            update_states(model, batch.x, torch.tensor(batch.indices, dtype=torch.int64), states.values(), autocast=plan.autocast)
        if on_batch is not None:
            on_batch(len(batch.indices) + len(batch.skipped))
    return _result(model, plan, states, skipped)


def scan_dataset(
    model: Model,
    dataset: ImageDataset,
    indices: Sequence[int],
    layers: Sequence[str],
    engine: Engine,
    *,
    batch_size: int = 32,
    top_k: int = 4,
    radius: float = DEFAULT_RADIUS,
    thumbnails: bool = True,
    thumbnail_size: int = THUMBNAIL_SIZE,
    on_batch: Callable[[int], object] | None = None,
    autocast: Autocast = None,
) -> ScanResult:
    """:func:`scan` over the samples ``indices`` of ``dataset``, in batches of ``batch_size``
    consecutive entries of ``indices``, on ``engine`` (see :mod:`deepvis.stats.engines`): every engine
    gives the same result, bit for bit on the same hardware; the forward passes under ``autocast``."""
    plan = _plan(model, layers, top_k, radius, batch_size, thumbnails, thumbnail_size, autocast)
    states = plan.empty_states(engine.state_device)
    skipped: list[tuple[int, str]] = []
    for step in engine.mine(plan, states, range(num_batches(len(indices), batch_size)), indices=indices):
        skipped += step.skipped
        if on_batch is not None:
            on_batch(step.images + len(step.skipped))
    return _result(model, plan, states, skipped)
