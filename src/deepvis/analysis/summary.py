"""The whole summary of a model on a dataset: one function, :func:`summarize` (what ``deepvis report``
runs), configured by one :class:`SummaryOptions`.

Work is done in streaming passes, so memory does not grow with the number of units × inputs:

1. **scan** — one forward pass over the selected inputs (:mod:`.scan`, on the statistics engine
   :mod:`deepvis.stats`: locally or on Ray, with equal results) records, for every chosen layer, the
   unit activity (:mod:`.activity`), the locality of spatial layers (:mod:`.locality`), the spatially
   pooled activations (N × C per layer, for the probes and clusters) and small thumbnails of the inputs
   as the model saw them;
2. **sensitivity** — a subset of the inputs is perturbed (:mod:`.sensitivity`);
3. **probes** — a linear probe per layer when the dataset has labels (:mod:`.probe`);
4. **clusters** — k-means per layer and a 2-D map (:mod:`.clusters`).

Inputs: with ``max_images`` the summary uses that many inputs spread evenly over the dataset
(indices ``round(linspace(0, n−1, max_images))``), so every class of a sorted ImageFolder is seen.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from PIL import Image

from .._progress import progress_bar
from ..atlas import open_atlas
from ..capture import LOGITS, LayerInfo, get_layer, layer_table, token_layer, token_layer_info
from ..choices import EMBEDDINGS
from ..datasets import ImageDataset, iter_batches, open_dataset
from ..display import html_table, panel
from ..errors import DeepvisError, InputError, LayerError
from ..models.identity import check_identity, model_identity
from ..models.model import Model, require_model
from ..runtime import Autocast, autocast_name
from ..stats import Engine, make_engine
from .activity import LayerActivity, TopInput, activity_from_unit_stats
from .clusters import ClusterResult, cluster_features, umap_available
from .locality import DEFAULT_RADIUS, LayerLocality
from .plots import histogram, render_svg
from .probe import ProbeResult, probe_accuracy
from .scan import THUMBNAIL_SIZE, scan_dataset
from .sensitivity import KINDS, SensitivityResult, measure_sensitivity

__all__ = [
    "DEFAULT_EPSILONS",
    "THUMBNAIL_SIZE",
    "THUMBNAIL_CACHE_LIMIT",
    "EMBEDDINGS",
    "SummaryOptions",
    "DatasetSummary",
    "default_layers",
    "select_indices",
    "summarize",
]

#: default perturbation sizes, in 0–255 pixel steps
DEFAULT_EPSILONS = (1.0, 2.0, 4.0, 8.0)
#: up to this many inputs, the scan keeps every thumbnail; beyond, thumbnails are loaded when needed
THUMBNAIL_CACHE_LIMIT = 2048
#: units per layer (most active by mean, by max) whose top inputs are read from an atlas
_ATLAS_UNITS_SHOWN = 8
#: (option, its `deepvis report` flag, its least value)
_MINIMA = (
    ("batch_size", "--batch-size", 1),
    ("decode_threads", "--decode-threads", 0),
    ("top_k", "--top-k", 1),
    ("sensitivity_images", "--sensitivity-images", 0),
    ("cluster_k", "--clusters", 1),
    ("probe_folds", "--folds", 2),
)


@dataclass(frozen=True)
class SummaryOptions:
    """What :func:`summarize` measures, and how; validated when made (a :class:`~deepvis.errors.DeepvisError`
    names every bad field). :meth:`to_dict` is what the report's JSON records as its settings.

    Inputs: ``layers`` (None: :func:`default_layers`), ``max_images`` inputs spread evenly over the
    dataset (None: all), ``batch_size`` inputs per forward pass, ``decode_threads`` image-decoding threads.
    Activity: ``top_k`` top inputs per unit; ``atlas``: a folder whose per-unit statistics are reused
    (same model and dataset). Locality: ``locality_radius`` (fraction of the map's longer side, in (0, 1]).
    Sensitivity: ``epsilons`` perturbation sizes in 0–255 pixel steps (empty: none), of the
    ``perturbations`` kinds, on ``sensitivity_images`` inputs. Probes: ``probe_folds`` folds (labelled
    datasets). Clusters: ``cluster_k`` clusters for each of ``cluster_layers`` (None: every layer;
    empty: none), mapped in 2-D by ``embedding`` (auto, pca, umap). ``thumbnails``: keep input
    thumbnails for the report; ``seed``: of perturbations, folds and k-means. ``class_token``: each
    summarized token layer with a class token is followed by that token as its own vector layer
    ``LAYER@cls`` (its C units; the layer's own rows, the patch grid, are unchanged). Any prefix token
    can also be named in ``layers`` (``blocks.5@reg0``). ``autocast``: the scan's forward passes run
    under autocast (``"bf16"``, ``"fp16"`` or the torch dtype, kept as the word; None: off; see
    :func:`deepvis.runtime.autocast`); its statistics still accumulate in float32, and the
    sensitivity analysis (gradients of small perturbations) runs in the model's own dtype.
    """

    layers: tuple[str, ...] | None = None
    max_images: int | None = None
    batch_size: int = 32
    decode_threads: int = 2
    top_k: int = 4
    locality_radius: float = DEFAULT_RADIUS
    epsilons: tuple[float, ...] = DEFAULT_EPSILONS
    perturbations: tuple[str, ...] = KINDS
    sensitivity_images: int = 32
    probe_folds: int = 5
    cluster_k: int = 8
    cluster_layers: tuple[str, ...] | None = None
    embedding: str = "auto"
    thumbnails: bool = True
    atlas: str | os.PathLike[str] | None = None
    seed: int = 0
    class_token: bool = True
    autocast: Autocast = None

    def __post_init__(self) -> None:
        # normalize sequences to tuples (the options are hashable and compare by value)
        for name in ("layers", "cluster_layers"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, tuple(dict.fromkeys(str(x) for x in v)))
        object.__setattr__(self, "epsilons", tuple(float(e) for e in self.epsilons))
        object.__setattr__(self, "perturbations", tuple(self.perturbations))
        if self.atlas is not None:
            object.__setattr__(self, "atlas", os.fspath(self.atlas))
        problems = []
        try:
            object.__setattr__(self, "autocast", autocast_name(self.autocast))
        except DeepvisError as exc:
            problems.append(f"{exc} (--autocast)")
        if self.layers is not None and not self.layers:
            problems.append("layers is empty (None: the default layers)")
        if self.max_images is not None and self.max_images < 1:
            problems.append("max_images (--max-images) must be at least 1")
        for name, flag, low in _MINIMA:
            if getattr(self, name) < low:
                problems.append(f"{name} ({flag}) must be at least {low}")
        if not 0 < self.locality_radius <= 1:
            problems.append("locality_radius (--radius) must be in (0, 1]")
        if any(not np.isfinite(e) or e <= 0 for e in self.epsilons):
            problems.append("perturbation sizes (--epsilons) must be positive numbers of 0-255 pixel steps, e.g. 1,2,4,8")
        unknown = [k for k in self.perturbations if k not in KINDS]
        if unknown:
            problems.append(f"unknown perturbation kind {unknown[0]!r}: use {', '.join(KINDS)}")
        if self.embedding not in EMBEDDINGS:
            problems.append(f"unknown map {self.embedding!r}: use {', '.join(EMBEDDINGS)}")
        elif self.embedding == "umap" and not umap_available():
            problems.append("a UMAP map needs the umap-learn package (pip install umap-learn); or use PCA")
        if problems:
            raise DeepvisError("bad summary options: " + "; ".join(problems))

    def replace(self, **changes: Any) -> SummaryOptions:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def to_dict(self) -> dict[str, object]:
        """Every field, JSON-ready (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


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


def _order_layers(model: Model, layers: Sequence[str], *, class_token: bool = False) -> list[LayerInfo]:
    """The layers' infos in execution order; with ``class_token``, each token layer that has a class
    token is followed by it (the pseudo-layer ``LAYER@cls``, a vector of C units)."""
    infos = {}
    for name in dict.fromkeys(layers):
        infos[name] = get_layer(model, name)
    if class_token:
        for info in list(infos.values()):
            key = token_layer(info.name, "cls")
            if info.layout.kind == "tokens" and "cls" in info.prefix and key not in infos:
                infos[key] = token_layer_info(info, "cls")
    # a prefix token shares its layer's place in the order: the stable sort keeps it right after its layer
    return sorted(sorted(infos.values(), key=lambda i: "@" in i.name), key=lambda i: i.order)


@dataclass
class DatasetSummary:
    """Everything measured about a model on a dataset (see :func:`summarize`).

    ``samples`` are the dataset indices analysed (unreadable ones are in ``skipped``), ``labels`` their
    class indices into ``classes`` (−1: unlabelled; None without classes). ``layers`` in depth order.
    ``activity`` covers every layer, ``locality`` the spatial ones, ``probes`` and ``clusters`` the layers
    they were run on; ``sensitivity`` is None when no perturbation size was given. ``identity`` is the
    model's :func:`~deepvis.models.identity.model_identity` (weights hash, input size), recorded in the
    JSON so that a reader (the live toolbox's ``--report``) can tell whether the report fits its model.
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
    identity: dict[str, object] = field(default_factory=dict)
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
            rows: list[dict[str, object]] = []
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
        return _jsonable_dict(out)

    def _repr_html_(self) -> str:
        """The per-layer table and each layer's sparsity histogram (IPython's display protocol); the full
        report is :func:`deepvis.analysis.write_report` (``deepvis.notebook.show_report`` shows it in a cell)."""
        rows = []
        for info in self.layers:
            act, loc, probe = self.activity[info.name], self.locality.get(info.name), self.probes.get(info.name)
            median = float(np.nanmedian(loc.locality)) if loc is not None and np.isfinite(loc.locality).any() else None
            rows.append(
                (info.name, info.shape, act.units, len(act.dead_units), act.layer_sparsity, median, probe.accuracy if probe else None)
            )
        header = ("layer", "shape", "units", "dead", "sparsity", "locality (median)", "probe accuracy")
        plots = "".join(
            render_svg(
                histogram(f"sparsity-{i}", f"{name}: sparsity of its units", a.sparsity, x_label="sparsity", lo=0.0, hi=1.0),
                width=280,
                height=140,
            )
            for i, (name, a) in enumerate(self.activity.items())
        )
        title = f"{self.model} on {self.dataset}: {len(self.samples)} inputs, {len(self.layers)} layers"
        return panel(html_table(rows, header), f"<div style='display:flex;flex-wrap:wrap'>{plots}</div>", title=title)

    def to_dict(self) -> dict[str, object]:
        """Every number of the summary, JSON-ready (NaN and infinities become null)."""
        return _jsonable_dict(
            {
                "model": self.model,
                "identity": self.identity,
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


def _jsonable_dict(obj: dict[str, object]) -> dict[str, object]:
    """:func:`_jsonable` of a dict (keys as strings)."""
    out = _jsonable(obj)
    assert isinstance(out, dict)
    return out


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
    atlas_path: str, model: Model, dataset: ImageDataset, infos: Sequence[LayerInfo], top_k: int, shown: int
) -> tuple[dict[str, LayerActivity], list[str]]:
    """Activity of the layers an atlas has mined (its statistics cover the atlas's whole dataset).

    The atlas must fit the model (:func:`~deepvis.models.identity.check_identity`: same weights and
    input size) and have been made on the same dataset; top inputs are read only for the ``shown`` most
    active units (by mean and by max) of each layer (the other units' rows are empty: see :func:`_fill_top`).
    """
    out: dict[str, LayerActivity] = {}
    notes: list[str] = []
    with open_atlas(atlas_path) as atlas:
        meta = atlas.meta
        check_identity(meta, model, what=f"atlas {atlas_path}", fix="use the same model and input size, or drop --atlas")
        if meta.get("dataset_hash") != dataset.fingerprint():
            raise InputError(
                f"atlas {atlas_path} was made on dataset {meta.get('dataset')!r}, not on this one: give the same dataset or drop --atlas"
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
            top: list[list[TopInput]] = [[] for _ in range(info.units)]
            for u in dict.fromkeys(act.most_active("mean", shown) + act.most_active("max", shown)):
                top[u] = [TopInput(t.sample, t.value, t.position) for t in atlas.unit(info.name, u).top[:top_k]]
            out[info.name] = activity_from_unit_stats(info.name, info.shape, stats, top, top_k)
        if out:
            notes.append(
                f"unit activity of {', '.join(out)} read from atlas {atlas_path} (all {int(meta.get('samples') or len(dataset))} inputs; "
                "top inputs of the other units are among the inputs analysed here)"
            )
        else:
            notes.append(f"atlas {atlas_path} has none of these layers mined: unit activity was computed")
    return out, notes


def _fill_top(act: LayerActivity, scanned: LayerActivity) -> None:
    """Give the units without top inputs (from an atlas) their top inputs among the inputs analysed here."""
    empty = act.top_samples[:, 0] < 0
    act.top_samples[empty] = scanned.top_samples[empty]
    act.top_values[empty] = scanned.top_values[empty]
    act.top_positions[empty] = scanned.top_positions[empty]


def _constant_layers(names: Sequence[str], features: Mapping[str, np.ndarray]) -> list[str]:
    """The layers whose pooled features are the same for every input (to float rounding): input-independent."""
    out = []
    for n in names:
        f = np.asarray(features[n], dtype=np.float64)
        if f.ndim == 2 and f.shape[0] >= 2 and np.all(np.ptp(f, axis=0) <= 1e-6 * max(1.0, float(np.abs(f).max()))):
            out.append(n)
    return out


def summarize(
    model: Model,
    dataset: ImageDataset | str,
    options: SummaryOptions | None = None,
    *,
    engine: str | Engine = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
) -> DatasetSummary:
    """Compute the whole summary of ``model`` on ``dataset`` as ``options`` say (default: :class:`SummaryOptions()`).

    The scan runs on ``engine``: ``local`` (this process), ``ray`` (``workers`` Ray actors, started
    locally or on the cluster at ``ray_address``; the same numbers as local) or an
    :class:`~deepvis.stats.Engine`; sensitivity, probes and clusters run here. ``progress`` shows
    progress bars on stderr (None: when stderr is a terminal). The summary's ``settings`` are
    ``options.to_dict()`` with the layers resolved, plus the model's input size, the device and the engine.
    """
    model = require_model(model)
    if isinstance(dataset, str):  # a dataset spec (a folder, a list file, demo), as build_atlas takes it
        dataset = open_dataset(dataset)
    o = options if options is not None else SummaryOptions()
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    names = list(o.layers) if o.layers else default_layers(model)
    if not names:
        raise LayerError("no layer to summarize")
    infos = _order_layers(model, names, class_token=o.class_token)
    names = [i.name for i in infos]
    indices = select_indices(len(dataset), o.max_images)
    all_labels = dataset.label_indices()
    todo = names if o.cluster_layers is None else list(o.cluster_layers)
    unknown = [n for n in todo if n not in names]
    if unknown:
        raise LayerError(f"cluster layer {unknown[0]!r} is not among the summarized layers ({', '.join(names)})")
    notes: list[str] = []
    from_atlas: dict[str, LayerActivity] = {}
    if o.atlas is not None:  # read (and check) the atlas before the long work
        from_atlas, atlas_notes = _atlas_activity(os.fspath(o.atlas), model, dataset, infos, o.top_k, _ATLAS_UNITS_SHOWN)
        notes += atlas_notes

    eng = make_engine(engine, model, dataset, ray_address=ray_address, workers=workers, decode_threads=o.decode_threads)
    bar = progress_bar(total=len(indices), desc="activations", unit="img", enabled=progress)
    try:
        keep = o.thumbnails and len(indices) <= THUMBNAIL_CACHE_LIMIT
        result = scan_dataset(
            model,
            dataset,
            indices,
            names,
            eng,
            batch_size=o.batch_size,
            top_k=o.top_k,
            radius=o.locality_radius,
            thumbnails=keep,
            on_batch=bar.update,
            autocast=o.autocast,
        )
    finally:
        bar.close()
        if eng is not engine:
            eng.close()
    if not result.samples:
        raise InputError(f"none of the {len(indices)} inputs of dataset {dataset.spec or '?'} could be read")
    times["scan"] = time.perf_counter() - t0
    activity = dict(result.activity)
    for name, act in from_atlas.items():
        _fill_top(act, result.activity[name])
        activity[name] = act

    sens: SensitivityResult | None = None
    if o.epsilons and o.sensitivity_images > 0:
        t1 = time.perf_counter()
        pick = [result.samples[i] for i in select_indices(len(result.samples), o.sensitivity_images)]
        bar = progress_bar(total=len(pick), desc="sensitivity", unit="img", enabled=progress)
        try:
            for batch in iter_batches(dataset, model, min(o.batch_size, 16), indices=pick, workers=o.decode_threads):
                if batch.indices:
                    part = measure_sensitivity(model, batch.x, names, o.epsilons, samples=batch.indices, kinds=o.perturbations, seed=o.seed)
                    sens = part if sens is None else sens.merge(part)
                bar.update(len(batch.indices) + len(batch.skipped))
        finally:
            bar.close()
        times["sensitivity"] = time.perf_counter() - t1

    constant = _constant_layers(names, result.features) if len(result.samples) >= 2 else []
    if constant:  # nothing in them depends on the data: a probe or a k-means of them says nothing (and warns)
        notes.append(
            f"{', '.join(constant)} {'does' if len(constant) == 1 else 'do'} not depend on the input (the same values for all "
            f"{len(result.samples)} inputs, e.g. a class token before the first block): left out of the probes and clusters; "
            f"{'its' if len(constant) == 1 else 'their'} dead units and sparsity describe a constant"
        )
    labels = None
    if all_labels is not None:
        labels = [all_labels[s] for s in result.samples]
    probes: dict[str, ProbeResult] = {}
    if labels is not None:
        t1 = time.perf_counter()
        y = np.asarray(labels)
        for n in progress_bar([n for n in names if n not in constant], desc="probes", unit="layer", enabled=progress):
            probes[n] = probe_accuracy(result.features[n], y, folds=o.probe_folds, seed=o.seed)
        times["probes"] = time.perf_counter() - t1
    else:
        notes.append("the dataset has no labels, so no linear probes were run (use an ImageFolder layout or a labelled .txt list)")

    clusters: dict[str, ClusterResult] = {}
    if todo and len(result.samples) >= 2:
        t1 = time.perf_counter()
        y_or_none = np.asarray(labels) if labels is not None else None
        for n in progress_bar([n for n in todo if n not in constant], desc="clusters", unit="layer", enabled=progress):
            clusters[n] = cluster_features(
                n, result.features[n], result.samples, k=o.cluster_k, labels=y_or_none, seed=o.seed, embedding=o.embedding
            )
        times["clusters"] = time.perf_counter() - t1
    elif todo:
        notes.append("clusters need at least two inputs")
    times["total"] = time.perf_counter() - t0
    referenced = sorted(set(result.samples) | {t.sample for a in activity.values() for u in range(a.units) for t in a.top_inputs(u)})
    settings: dict[str, object] = {
        **o.replace(layers=tuple(names)).to_dict(),
        "input_size": list(model.preprocessing.input_size),
        "device": str(model.device),
        "engine": engine if isinstance(engine, str) else type(engine).__name__,
    }
    return DatasetSummary(
        model=model.name,
        identity=model_identity(model),
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
        thumbnail_loader=(lambda i: _load_thumbnail(model, dataset, i)) if o.thumbnails else None,
        timings=times,
        notes=notes,
    )
