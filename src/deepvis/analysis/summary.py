"""The whole summary of a model on a dataset: one function, :func:`summarize`, used by the report and the live server.

Work is done in streaming passes, so memory does not grow with the number of units × inputs:

1. **scan** — one forward pass over the selected inputs records, for every chosen layer, the unit
   activity (:mod:`.activity`), the locality of spatial layers (:mod:`.locality`), the spatially pooled
   activations (N × C per layer, for the probes and clusters) and small thumbnails of the inputs as
   the model saw them;
2. **sensitivity** — a subset of the inputs is perturbed (:mod:`.sensitivity`);
3. **probes** — a linear probe per layer when the dataset has labels (:mod:`.probe`);
4. **clusters** — k-means per layer and a 2-D map (:mod:`.clusters`).

Inputs: with ``max_images`` the summary uses that many inputs spread evenly over the dataset
(indices ``round(linspace(0, n−1, max_images))``), so every class of a sorted ImageFolder is seen.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .._progress import progress_bar
from ..capture import LOGITS, LayerInfo, capture, get_layer, layer_table
from ..datasets import Batch, ImageDataset, iter_batches
from ..errors import DeepvisError, InputError, LayerError
from ..models.model import Model
from .activity import ActivityAccumulator, LayerActivity, activity_from_unit_stats
from .clusters import ClusterResult, cluster_features, umap_available
from .locality import DEFAULT_RADIUS, LayerLocality, LocalityAccumulator
from .probe import ProbeResult, pool_features, probe_accuracy
from .sensitivity import KINDS, SensitivityResult, measure_sensitivity

__all__ = [
    "DEFAULT_EPSILONS",
    "THUMBNAIL_SIZE",
    "THUMBNAIL_CACHE_LIMIT",
    "ScanResult",
    "DatasetSummary",
    "default_layers",
    "select_indices",
    "scan",
    "summarize",
]

#: default perturbation sizes, in 0–255 pixel steps
DEFAULT_EPSILONS = (1.0, 2.0, 4.0, 8.0)
#: side of the stored input thumbnails, in pixels
THUMBNAIL_SIZE = 64
#: up to this many inputs, the scan keeps every thumbnail; beyond, thumbnails are loaded when needed
THUMBNAIL_CACHE_LIMIT = 2048
#: units per layer (most active by mean, by max) whose top inputs are read from an atlas
_ATLAS_UNITS_SHOWN = 8


def _depth(name: str) -> int:
    return name.count(".") + 1


def _load_thumbnail(model: Model, dataset: ImageDataset, sample: int, size: int = THUMBNAIL_SIZE) -> Image.Image:
    pre = model.preprocessing
    return pre.fit(dataset.load(sample, pre.pil_mode)).convert("RGB").resize((size, size), Image.Resampling.BILINEAR)


def default_layers(model: Model, *, max_layers: int = 8) -> list[str]:
    """A handful of layers spread over depth: the end of each resolution stage, plus ``logits``.

    Among the layers at most two levels deep in the module tree (``blocks.3``, ``layer2``, ``bn2``)
    whose output is a map of at least 2×2, the last one (in execution order) at each spatial size is
    taken — for most convnets, the output of each stage. If the model has fewer than two such maps,
    vector layers are spread over depth instead. At most ``max_layers`` (evenly spaced, keeping the
    deepest), then ``logits``.
    """
    table = [i for i in layer_table(model) if i.name != LOGITS]
    maps = [i for i in table if i.spatial and i.shape[1] * i.shape[2] >= 2 and _depth(i.name) <= 2]
    last: dict[tuple[int, int], LayerInfo] = {}
    for info in maps:
        key = (info.shape[1], info.shape[2])
        if key not in last or info.order > last[key].order:
            last[key] = info
    chosen = sorted(last.values(), key=lambda i: i.order)
    if len(chosen) < 2:
        chosen = [i for i in table if _depth(i.name) <= 2] or table
    if len(chosen) > max_layers:
        pick = np.unique(np.round(np.linspace(0, len(chosen) - 1, max_layers)).astype(int))
        chosen = [chosen[i] for i in pick]
    return [i.name for i in chosen] + [LOGITS]


def select_indices(n: int, max_images: int | None) -> list[int]:
    """``max_images`` dataset indices spread evenly over ``0..n−1`` (all of them when None or ≥ n)."""
    if max_images is None or max_images >= n:
        return list(range(n))
    if max_images < 1:
        raise DeepvisError("the number of images must be at least 1")
    return sorted({int(v) for v in np.round(np.linspace(0, n - 1, max_images))})


def _order_layers(model: Model, layers: Sequence[str]) -> list[LayerInfo]:
    infos = {}
    for name in dict.fromkeys(layers):
        infos[name] = get_layer(model, name)
    return sorted(infos.values(), key=lambda i: i.order)


@dataclass
class ScanResult:
    """What one forward pass over a dataset records (see :func:`scan`)."""

    layers: list[LayerInfo]
    samples: list[int]
    activity: dict[str, LayerActivity]
    locality: dict[str, LayerLocality]
    features: dict[str, np.ndarray]
    thumbnails: dict[int, Image.Image]
    skipped: list[tuple[int, str]]


def scan(
    model: Model,
    batches: Iterable[Batch],
    layers: Sequence[str],
    *,
    top_k: int = 4,
    radius: float = DEFAULT_RADIUS,
    thumbnails: bool = True,
    thumbnail_size: int = THUMBNAIL_SIZE,
    on_batch=None,
) -> ScanResult:
    """One forward pass over ``batches`` recording activity, locality, pooled features and thumbnails for ``layers``.

    ``batches`` yields :class:`~deepvis.datasets.Batch` es (``indices`` are dataset indices);
    ``on_batch(n)`` is called after each batch with the number of inputs it held or skipped.
    """
    infos = _order_layers(model, layers)
    names = [i.name for i in infos]
    device = model.device
    acts_acc = {i.name: ActivityAccumulator(i.name, i.shape, top_k, device) for i in infos}
    loc_acc = {
        i.name: LocalityAccumulator(i.name, i.shape[0], i.shape[1:], radius, device)
        for i in infos
        if i.spatial and i.shape[1] * i.shape[2] >= 2
    }
    feats: dict[str, list[np.ndarray]] = {n: [] for n in names}
    samples: list[int] = []
    thumbs: dict[int, Image.Image] = {}
    skipped: list[tuple[int, str]] = []
    for batch in batches:
        skipped += batch.skipped
        if batch.indices:
            out = capture(model, batch.x, names, stop_early=LOGITS not in names)
            ids = torch.tensor(batch.indices, dtype=torch.int64)
            for n in names:
                a = out[n]
                if tuple(a.shape[1:]) != acts_acc[n].shape:
                    raise LayerError(
                        f"layer {n} gave shape {tuple(a.shape[1:])}, expected {acts_acc[n].shape}: all inputs must have the model's input size"
                    )
                acts_acc[n].update(a, ids)
                if n in loc_acc:
                    loc_acc[n].update(a)
                feats[n].append(pool_features(a))
            samples += batch.indices
            if thumbnails:
                small = F.interpolate(
                    batch.x.float(), size=(thumbnail_size, thumbnail_size), mode="bilinear", antialias=True, align_corners=False
                )
                for i, row in zip(batch.indices, small.cpu()):
                    thumbs[i] = model.preprocessing.to_image(row).convert("RGB")
        if on_batch is not None:
            on_batch(len(batch.indices) + len(batch.skipped))
    features = {n: (np.concatenate(f) if f else np.zeros((0, acts_acc[n].shape[0]), np.float32)) for n, f in feats.items()}
    return ScanResult(
        infos,
        samples,
        {n: a.result() for n, a in acts_acc.items()},
        {n: a.result() for n, a in loc_acc.items()},
        features,
        thumbs,
        skipped,
    )


@dataclass
class DatasetSummary:
    """Everything measured about a model on a dataset (see :func:`summarize`).

    ``samples`` are the dataset indices analysed (unreadable ones are in ``skipped``), ``labels`` their
    class indices into ``classes`` (−1: unlabelled; None without classes). ``layers`` in depth order.
    ``activity`` covers every layer, ``locality`` the spatial ones, ``probes`` and ``clusters`` the layers
    they were run on; ``sensitivity`` is None when no perturbation size was given.
    """

    model: str
    dataset: str
    settings: dict[str, object]
    layers: list[LayerInfo]
    samples: list[int]
    keys: dict[int, str]
    sample_labels: dict[int, str | None]
    labels: list[int] | None
    classes: list[str] | None
    skipped: list[tuple[int, str]]
    activity: dict[str, LayerActivity]
    locality: dict[str, LayerLocality]
    sensitivity: SensitivityResult | None
    probes: dict[str, ProbeResult]
    clusters: dict[str, ClusterResult]
    thumbnails: dict[int, Image.Image] = field(default_factory=dict, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    #: loads the thumbnail of a dataset sample that the scan did not keep (None: no thumbnails)
    thumbnail_loader: Callable[[int], Image.Image] | None = field(default=None, repr=False)

    @property
    def layer_names(self) -> list[str]:
        return [i.name for i in self.layers]

    def thumbnail(self, sample: int) -> Image.Image | None:
        """A dataset sample as the model saw it, :data:`THUMBNAIL_SIZE` px square: kept by the scan or
        loaded now (and kept); None when thumbnails are off or the file cannot be read any more."""
        im = self.thumbnails.get(sample)
        if im is None and self.thumbnail_loader is not None:
            try:
                im = self.thumbnail_loader(sample)
            except InputError as exc:  # the file went away or broke since the scan: shown as a blank tile
                self.notes.append(f"no thumbnail for input {sample}: {exc}")
                return None
            self.thumbnails[sample] = im
        return im

    def label_of(self, sample: int) -> str | None:
        """The class name of a dataset sample, when known."""
        return self.sample_labels.get(sample)

    def layer_summary(self, layer: str, *, n: int = 8) -> dict[str, object]:
        """The per-layer summary (JSON-ready) the live toolbox shows for a selected layer.

        Holds the layer's shape and depth, its most active units (by mean and by max) with their top
        inputs, dead units, sparsity, its most local units and locality distribution, its sensitivity
        at each perturbation size, its probe accuracy and its clusters.
        """
        info = next((i for i in self.layers if i.name == layer), None)
        if info is None:
            have = ", ".join(self.layer_names)
            raise LayerError(f"layer {layer!r} is not in this summary (it has: {have})")
        act = self.activity[layer]

        def unit_rows(units: Sequence[int]) -> list[dict[str, object]]:
            rows = []
            for u in units:
                loc = self.locality.get(layer)
                rows.append(
                    {
                        "unit": u,
                        "mean": float(act.mean[u]),
                        "mean_max": float(act.mean_max[u]),
                        "max": float(act.max[u]),
                        "sparsity": float(act.sparsity[u]),
                        "locality": float(loc.locality[u]) if loc is not None else None,
                        "top": [dict(t.to_dict(), key=self.keys.get(t.sample), label=self.label_of(t.sample)) for t in act.top_inputs(u)],
                    }
                )
            return rows

        out: dict[str, object] = {
            "layer": layer,
            "shape": list(info.shape),
            "depth": self.layer_names.index(layer),
            "images": act.images,
            "activity_source": act.source,
            "units": act.units,
            "dead_units": act.dead_units,
            "layer_sparsity": act.layer_sparsity,
            "most_active_by_mean": unit_rows(act.most_active("mean", n)),
            "most_active_by_max": unit_rows(act.most_active("max", n)),
        }
        loc = self.locality.get(layer)
        if loc is not None:
            out["locality"] = {
                "median": _nanstat(np.nanmedian, loc.locality),
                "entropy_median": _nanstat(np.nanmedian, loc.entropy_locality),
                "most_local": unit_rows(loc.most_local(n)),
                "values": loc.locality.tolist(),
            }
        if self.sensitivity is not None and layer in self.sensitivity.layers:
            li = self.sensitivity.layers.index(layer)
            out["sensitivity"] = {
                "epsilons": self.sensitivity.epsilons,
                "mean_change": {k: self.sensitivity.mean_change(k)[:, li].tolist() for k in self.sensitivity.kinds},
            }
        if layer in self.probes:
            out["probe"] = self.probes[layer].to_dict()
        if layer in self.clusters:
            out["clusters"] = self.clusters[layer].to_dict()
        return _jsonable(out)

    def to_dict(self) -> dict[str, object]:
        """Every number of the summary, JSON-ready (NaN and infinities become null)."""
        return _jsonable(
            {
                "model": self.model,
                "dataset": self.dataset,
                "settings": self.settings,
                "layers": [i.to_dict() for i in self.layers],
                "samples": [{"sample": s, "key": self.keys.get(s), "label": self.label_of(s)} for s in self.samples],
                "classes": self.classes,
                "skipped": [{"sample": i, "reason": r} for i, r in self.skipped],
                "activity": {n: a.to_dict() for n, a in self.activity.items()},
                "locality": {n: a.to_dict() for n, a in self.locality.items()},
                "sensitivity": self.sensitivity.to_dict() if self.sensitivity is not None else None,
                "probes": {n: p.to_dict() for n, p in self.probes.items()},
                "clusters": {n: c.to_dict() for n, c in self.clusters.items()},
                "timings": self.timings,
                "notes": self.notes,
            }
        )


def _nanstat(fn, a: np.ndarray) -> float | None:
    a = np.asarray(a, dtype=np.float64)
    return float(fn(a)) if np.isfinite(a).any() else None


def _jsonable(obj: object) -> object:
    """Turn numpy scalars/arrays into Python values and non-finite floats into None, recursively."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if np.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    return obj


def _atlas_activity(
    atlas_path: str | os.PathLike[str], model: Model, dataset: ImageDataset, infos: Sequence[LayerInfo], top_k: int, shown: int
) -> tuple[dict[str, LayerActivity], list[str]]:
    """Activity of the layers an atlas has mined (its statistics cover the atlas's whole dataset).

    The atlas must have been made with the same model weights, input size and dataset; top inputs are
    read only for the ``shown`` most active units (by mean and by max) of each layer (the other units'
    rows are empty: see :func:`_fill_top`).
    """
    try:
        from ..atlas import model_hash, open_atlas  # the atlas package (issue 5); imported only when asked for
    except ImportError as exc:
        raise InputError(f"--atlas needs the deepvis atlas package, which cannot be imported here: {exc}") from exc
    out: dict[str, LayerActivity] = {}
    notes: list[str] = []
    with open_atlas(atlas_path) as atlas:
        meta = atlas.meta
        where = os.fspath(atlas_path)
        if meta.get("dataset_hash") != dataset.fingerprint():
            raise InputError(
                f"atlas {where} was made on dataset {meta.get('dataset')!r}, not on this one: give the same dataset or drop --atlas"
            )
        if meta.get("model_hash") != model_hash(model):
            raise InputError(f"atlas {where} was made with other model weights ({meta.get('model')!r}): use the same model or drop --atlas")
        if list(meta.get("input_size") or []) != list(model.preprocessing.input_size):
            raise InputError(
                f"atlas {where} was made at input size {meta.get('input_size')}, not {list(model.preprocessing.input_size)}: use the same size or drop --atlas"
            )
        mined = {r.name: r for r in atlas.layers() if r.mined}
        for info in infos:
            rec = mined.get(info.name)
            if rec is None or tuple(rec.shape) != tuple(info.shape):
                continue
            stats = atlas.stats(info.name)
            if len(stats) != info.units:
                continue
            act = activity_from_unit_stats(info.name, info.shape, stats, None, top_k)
            top: list[list[tuple[int, float, tuple[int, int] | None]]] = [[] for _ in range(info.units)]
            for u in dict.fromkeys(act.most_active("mean", shown) + act.most_active("max", shown)):
                top[u] = [(t.sample, t.value, t.position) for t in atlas.unit(info.name, u).top[:top_k]]
            out[info.name] = activity_from_unit_stats(info.name, info.shape, stats, top, top_k)
        if out:
            notes.append(
                f"unit activity of {', '.join(out)} read from atlas {where} (all {int(meta.get('samples') or len(dataset))} inputs; "
                "exact zeros are not counted there; top inputs of the other units are among the inputs analysed here)"
            )
        else:
            notes.append(f"atlas {where} has none of these layers mined: unit activity was computed")
    return out, notes


def _fill_top(act: LayerActivity, scanned: LayerActivity) -> None:
    """Give the units without top inputs (from an atlas) their top inputs among the inputs analysed here."""
    empty = act.top_samples[:, 0] < 0
    act.top_samples[empty] = scanned.top_samples[empty]
    act.top_values[empty] = scanned.top_values[empty]
    act.top_positions[empty] = scanned.top_positions[empty]


def summarize(
    model: Model,
    dataset: ImageDataset,
    layers: Sequence[str] | None = None,
    *,
    max_images: int | None = None,
    batch_size: int = 32,
    workers: int = 2,
    top_k: int = 4,
    radius: float = DEFAULT_RADIUS,
    epsilons: Sequence[float] = DEFAULT_EPSILONS,
    kinds: Sequence[str] = KINDS,
    sensitivity_images: int = 32,
    probe_folds: int = 5,
    cluster_k: int = 8,
    cluster_layers: Sequence[str] | None = None,
    embedding: str = "auto",
    thumbnails: bool = True,
    atlas: str | os.PathLike[str] | None = None,
    seed: int = 0,
    progress: bool | None = None,
) -> DatasetSummary:
    """Compute the whole summary of ``model`` on ``dataset``.

    ``layers`` default to :func:`default_layers`; ``max_images`` caps the inputs (spread evenly);
    ``epsilons`` are perturbation sizes in 0–255 pixel steps (empty: no sensitivity analysis), applied
    to ``sensitivity_images`` of the inputs; ``probe_folds`` folds for the linear probes (run when the
    dataset has labels); ``cluster_k`` clusters for each of ``cluster_layers`` (default: every layer;
    empty: none); ``atlas`` reuses the per-unit statistics of an atlas of the same model and dataset;
    ``progress`` shows progress bars on stderr (None: when stderr is a terminal).
    """
    if batch_size < 1 or top_k < 1 or sensitivity_images < 0 or cluster_k < 1 or probe_folds < 2:
        raise DeepvisError("batch size, top-k and cluster count must be at least 1, folds at least 2, sensitivity images at least 0")
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    names = list(dict.fromkeys(layers)) if layers else default_layers(model)
    if not names:
        raise LayerError("no layer to summarize")
    infos = _order_layers(model, names)
    names = [i.name for i in infos]
    indices = select_indices(len(dataset), max_images)
    all_labels = dataset.label_indices()
    if embedding == "umap" and not umap_available():
        raise DeepvisError("a UMAP map needs the umap-learn package (pip install umap-learn); or use PCA")
    if any(not np.isfinite(float(e)) or float(e) <= 0 for e in epsilons):
        raise DeepvisError("perturbation sizes must be positive numbers of 0-255 pixel steps, e.g. 1,2,4,8")
    unknown_kinds = [k for k in kinds if k not in KINDS]
    if unknown_kinds:
        raise DeepvisError(f"unknown perturbation kind {unknown_kinds[0]!r}: use {', '.join(KINDS)}")
    if not radius > 0:
        raise DeepvisError("the locality radius must be positive")
    todo = names if cluster_layers is None else list(dict.fromkeys(cluster_layers))
    unknown = [n for n in todo if n not in names]
    if unknown:
        raise LayerError(f"cluster layer {unknown[0]!r} is not among the summarized layers ({', '.join(names)})")
    notes: list[str] = []
    from_atlas: dict[str, LayerActivity] = {}
    if atlas is not None:  # read (and check) the atlas before the long work
        from_atlas, atlas_notes = _atlas_activity(atlas, model, dataset, infos, top_k, _ATLAS_UNITS_SHOWN)
        notes += atlas_notes

    bar = progress_bar(total=len(indices), desc="activations", unit="img", enabled=progress)
    try:
        stream = iter_batches(dataset, model, batch_size, indices=indices, workers=workers)
        keep = thumbnails and len(indices) <= THUMBNAIL_CACHE_LIMIT
        result = scan(model, stream, names, top_k=top_k, radius=radius, thumbnails=keep, on_batch=bar.update)
    finally:
        bar.close()
    if not result.samples:
        raise InputError(f"none of the {len(indices)} inputs of dataset {dataset.spec or '?'} could be read")
    times["scan"] = time.perf_counter() - t0
    activity = dict(result.activity)
    for name, act in from_atlas.items():
        _fill_top(act, result.activity[name])
        activity[name] = act

    sens: SensitivityResult | None = None
    if epsilons and sensitivity_images > 0:
        t1 = time.perf_counter()
        pick = [result.samples[i] for i in select_indices(len(result.samples), sensitivity_images)]
        bar = progress_bar(total=len(pick), desc="sensitivity", unit="img", enabled=progress)
        try:
            for batch in iter_batches(dataset, model, min(batch_size, 16), indices=pick, workers=workers):
                if batch.indices:
                    part = measure_sensitivity(model, batch.x, names, epsilons, samples=batch.indices, kinds=kinds, seed=seed)
                    sens = part if sens is None else sens.merge(part)
                bar.update(len(batch.indices) + len(batch.skipped))
        finally:
            bar.close()
        times["sensitivity"] = time.perf_counter() - t1

    labels = None
    if all_labels is not None:
        labels = [all_labels[s] for s in result.samples]
    probes: dict[str, ProbeResult] = {}
    if labels is not None:
        t1 = time.perf_counter()
        y = np.asarray(labels)
        for n in progress_bar(names, desc="probes", unit="layer", enabled=progress):
            probes[n] = probe_accuracy(result.features[n], y, folds=probe_folds, seed=seed)
        times["probes"] = time.perf_counter() - t1
    else:
        notes.append("the dataset has no labels, so no linear probes were run (use an ImageFolder layout or a labelled .txt list)")

    clusters: dict[str, ClusterResult] = {}
    if todo and len(result.samples) >= 2:
        t1 = time.perf_counter()
        y = np.asarray(labels) if labels is not None else None
        for n in progress_bar(todo, desc="clusters", unit="layer", enabled=progress):
            clusters[n] = cluster_features(n, result.features[n], result.samples, k=cluster_k, labels=y, seed=seed, embedding=embedding)
        times["clusters"] = time.perf_counter() - t1
    elif todo:
        notes.append("clusters need at least two inputs")
    times["total"] = time.perf_counter() - t0
    referenced = sorted(set(result.samples) | {t.sample for a in activity.values() for u in range(a.units) for t in a.top_inputs(u)})
    settings: dict[str, object] = {
        "layers": names,
        "max_images": max_images,
        "batch_size": batch_size,
        "top_k": top_k,
        "locality_radius": radius,
        "epsilons": [float(e) for e in epsilons],
        "perturbations": list(kinds),
        "sensitivity_images": sensitivity_images,
        "probe_folds": probe_folds,
        "cluster_k": cluster_k,
        "seed": seed,
        "input_size": list(model.preprocessing.input_size),
        "device": str(model.device),
        "atlas": os.fspath(atlas) if atlas is not None else None,
    }
    return DatasetSummary(
        model=model.name,
        dataset=dataset.spec,
        settings=settings,
        layers=infos,
        samples=result.samples,
        keys={s: dataset.samples[s].key for s in referenced},
        sample_labels={s: dataset.samples[s].label for s in referenced},
        labels=labels,
        classes=dataset.classes,
        skipped=result.skipped,
        activity=activity,
        locality=result.locality,
        sensitivity=sens,
        probes=probes,
        clusters=clusters,
        thumbnails=result.thumbnails,
        thumbnail_loader=(lambda i: _load_thumbnail(model, dataset, i)) if thumbnails else None,
        timings=times,
        notes=notes,
    )
