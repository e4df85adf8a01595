"""The summary pane: sparsity, dead units and the most active units of the selected layer.

The numbers are the report's (:class:`deepvis.analysis.activity.LayerActivity`, built from the one
statistics engine :mod:`deepvis.stats`), from one of four sources, said in each message (the first
that has the layer wins):

* ``report``: ``deepvis serve --report report.json`` — the report's ``activity``, ``locality`` and
  ``sensitivity`` of the layer;
* ``dataset``: ``deepvis serve --dataset DIR|demo`` — the statistics the background miner
  (:class:`~deepvis.server.mining.DatasetMiner`) has gathered for the layer, from the first mined
  batch on ("from N dataset images so far" while the pass goes on), or that the atlas it fills held
  when the server started;
* ``atlas``: ``deepvis serve --atlas DIR`` — the statistics rows the atlas recorded for its mined layers;
* ``live``: any other layer — running statistics (:class:`~deepvis.stats.LayerStats`) over the frames
  this page has shown, one update per new frame in the frame loop (a few small tensor operations on
  the activations' device, no host sync), reset on demand. They restart when the page selects
  another layer.

The page asks for its summary (a ``summary`` message) every :data:`SUMMARY_INTERVAL` seconds while
frames arrive or mining progresses, on a layer change and after a reset; the answer is built outside
the frame loop (turning the running sums into per-unit numbers costs about a millisecond per thousand
units), so the frame loop pays only for the update. The mined numbers are derived once per mined
batch and kept.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..analysis.activity import LayerActivity, activity_from_dict, activity_from_unit_stats, layer_activity
from ..atlas import open_atlas
from ..atlas.store import INDEX_NAME
from ..capture import LayerInfo
from ..datasets import ImageDataset
from ..errors import InputError, ModelError
from ..models.identity import check_identity
from ..models.model import Model
from ..stats import LayerStats, UnitStats
from .protocol import json_float

__all__ = ["SUMMARY_INTERVAL", "MOST_ACTIVE", "LiveSummary", "MinedStats", "MinedSource", "StoredSummaries", "summary_fields"]

log = logging.getLogger("deepvis.server")

#: the page asks for its live summary at most this often (seconds; sent to it in ``hello``)
SUMMARY_INTERVAL = 0.5
#: most active units listed (by mean and by max)
MOST_ACTIVE = 8
#: dead units listed by number (the count is always sent)
MAX_DEAD_LISTED = 64


def summary_fields(
    act: LayerActivity | None,
    *,
    layer: str,
    source: str,
    origin: str,
    locality: Sequence[float | None] | None = None,
    sensitivity: Mapping[str, Any] | None = None,
    n: int = MOST_ACTIVE,
) -> dict[str, Any]:
    """The fields of a ``summary`` message for one layer (JSON-ready).

    Args:
        act: the layer's activity (None: nothing counted yet).
        layer: the layer's name.
        source: ``"live"``, ``"dataset"``, ``"atlas"`` or ``"report"``.
        origin: one line saying where the numbers come from, for the page.
        locality: per-unit locality in [0, 1] (the report's), or None where unknown.
        sensitivity: the layer's ``{"epsilons": [...], "mean_change": {kind: [...]}}`` or None.
        n: how many most active units to list by mean and by max.

    Returns:
        ``layer``, ``source``, ``origin``, ``images`` (inputs counted), ``units``, ``sparsity`` (fraction of
        activations ≤ 0), ``dead`` (count) and ``dead_units`` (the first :data:`MAX_DEAD_LISTED`),
        ``most_active_by_mean`` / ``most_active_by_max`` (``[{"unit", "mean", "max"}]``), ``locality``
        (``{"median"}`` or None) and ``sensitivity`` (or None). Numbers are None when unknown.
    """
    out: dict[str, Any] = {"layer": layer, "source": source, "origin": origin, "locality": None, "sensitivity": None}
    if act is None or act.images == 0:
        out.update(images=0, units=act.units if act is not None else None, sparsity=None, dead=None, dead_units=[])
        out.update(most_active_by_mean=[], most_active_by_max=[])
    else:
        dead = act.dead_units

        def rows(units: list[int]) -> list[dict[str, Any]]:
            return [{"unit": u, "mean": json_float(float(act.mean[u])), "max": json_float(float(act.max[u]))} for u in units]

        out.update(
            images=act.images,
            units=act.units,
            sparsity=json_float(act.layer_sparsity),
            dead=len(dead),
            dead_units=dead[:MAX_DEAD_LISTED],
            most_active_by_mean=rows(act.most_active("mean", n)),
            most_active_by_max=rows(act.most_active("max", n)),
        )
    if locality is not None:
        values = np.array([np.nan if v is None else float(v) for v in locality], dtype=np.float64)
        med = float(np.nanmedian(values)) if np.isfinite(values).any() else float("nan")
        out["locality"] = {"median": json_float(med)}
    if sensitivity is not None:
        out["sensitivity"] = sensitivity
    return out


class LiveSummary:
    """Running statistics of one page's selected layer over the frames it has shown.

    The frame loop calls :meth:`update` with each new frame's activations; the page's reset (event
    loop) calls :meth:`reset`. Both take the summary's own lock, held only for a few tensor operations.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: LayerStats | None = None
        self._shape: tuple[int, ...] = ()
        self._last_frame: object | None = None

    def reset(self) -> None:
        """Forget every frame counted (the layer's statistics start again from the next frame)."""
        with self._lock:
            self._state, self._last_frame = None, None

    def update(self, frame: object, layer: str, acts: torch.Tensor) -> None:
        """Count one frame's activations of ``layer``, (C, H, W) or (C,), once per ``frame`` object.

        A frame redrawn (another unit, another setting) is not counted again; another layer than the
        one counted so far starts its statistics afresh.
        """
        with self._lock:
            if self._state is None or self._state.layer != layer or tuple(acts.shape) != self._shape:
                maps = (int(acts.shape[1]), int(acts.shape[2])) if acts.ndim == 3 else None
                self._state = LayerStats(layer, int(acts.shape[0]), 1, maps, acts.device)
                self._shape, self._last_frame = tuple(acts.shape), None
            if frame is self._last_frame:
                return
            self._last_frame = frame
            samples = torch.full((1,), self._state.stats.images, dtype=torch.int64, device=acts.device)
            self._state.update(acts[None], samples)

    def activity(self, layer: str) -> LayerActivity | None:
        """The statistics of ``layer`` so far (None: no frame of it counted since the last reset)."""
        with self._lock:
            if self._state is None or self._state.layer != layer or self._state.stats.images == 0:
                return None
            return layer_activity(self._state, self._shape)

    def fields(self, layer: str) -> dict[str, Any]:
        """The ``summary`` message fields of the live statistics of ``layer``."""
        act = self.activity(layer)
        frames = act.images if act is not None else 0
        return summary_fields(act, layer=layer, source="live", origin=f"live: {frames} frame{'s' if frames != 1 else ''} seen on this page")


@dataclass(frozen=True)
class MinedStats:
    """The statistics of one layer as mined so far: one :class:`~deepvis.stats.UnitStats` per unit
    (unit order), over ``images`` dataset inputs; ``final`` once the mining pass is complete;
    ``version`` grows with every update (to cache what is derived from it)."""

    layer: str
    units: tuple[UnitStats, ...]
    final: bool
    version: int

    @property
    def images(self) -> int:
        """Dataset inputs counted (unreadable files are not)."""
        return self.units[0].images if self.units else 0


class MinedSource(Protocol):
    """What the summaries need of the dataset miner (:class:`deepvis.server.mining.DatasetMiner`)."""

    #: the atlas folder it fills
    root: Path
    #: the dataset it mines
    dataset: ImageDataset

    def mined_stats(self, layer: str) -> MinedStats | None:
        """The statistics mined for ``layer`` so far (None: none yet)."""
        ...

    def phase(self, layer: str) -> str | None:
        """Where the mining of ``layer`` stands (``mining``, ``queued``, ...; None: not selected)."""
        ...


class StoredSummaries:
    """The summaries of the layers a report covers, an atlas mined, or the dataset miner is mining (see
    the module docstring for which wins). The report and the atlas are read once, when the app is
    built; the miner's statistics are asked for on each call (derived again only when they changed).

    Args:
        model: the served model.
        table: its layer table (the layers' shapes).
        atlas: an atlas folder whose mined layers' statistics are shown (``--atlas``).
        report: a report's JSON (``--report``).
        miner: the dataset miner (``--dataset``); its atlas folder's mined layers are read too, and
            labelled as dataset statistics.

    Raises :class:`~deepvis.errors.ModelError` (one line) for a report made for another model: by the
    one identity policy when the report records its model's identity, else when one of its layers is
    missing from this model or has another shape. :class:`~deepvis.errors.InputError` for a report
    that cannot be read.
    """

    def __init__(
        self,
        model: Model,
        table: Sequence[LayerInfo],
        *,
        atlas: str | os.PathLike[str] | None = None,
        report: str | os.PathLike[str] | None = None,
        miner: MinedSource | None = None,
    ) -> None:
        self._fields: dict[str, dict[str, Any]] = {}
        self._shapes = {i.name: tuple(i.shape) for i in table}
        self._miner = miner
        self._lock = threading.Lock()
        #: per layer, the miner's statistics' (version, phase) and the fields derived from them
        self._derived: dict[str, tuple[tuple[int, bool], dict[str, Any]]] = {}
        root = Path(atlas) if atlas is not None else miner.root if miner is not None else None
        if root is not None and (miner is None or (root / INDEX_NAME).exists()):
            self._read_atlas(root, self._shapes)
        if report is not None:
            self._read_report(Path(report), model, self._shapes)

    @property
    def layers(self) -> list[str]:
        """The layers with stored numbers (the report's and the atlas's; the miner's come as it goes)."""
        return sorted(self._fields)

    def get(self, layer: str) -> dict[str, Any] | None:
        """The ``summary`` message fields of ``layer`` (None: no stored or mined numbers for it)."""
        stored = self._fields.get(layer)
        if stored is not None and stored["source"] == "report":
            return stored
        mined = self._mined(layer)
        return mined if mined is not None else stored

    def _mined(self, layer: str) -> dict[str, Any] | None:
        """The fields of what the miner has gathered for ``layer`` so far (None: nothing yet)."""
        if self._miner is None or layer not in self._shapes:
            return None
        snap = self._miner.mined_stats(layer)
        if snap is None:
            return None
        mining = not snap.final and self._miner.phase(layer) == "mining"
        key = (snap.version, mining)
        with self._lock:
            hit = self._derived.get(layer)
        if hit is not None and hit[0] == key:
            return hit[1]
        act = activity_from_unit_stats(layer, self._shapes[layer], snap.units, None, 1, source="dataset")
        ds = self._miner.dataset
        if snap.final:
            unread = len(ds) - act.images
            origin = f"from {act.images} dataset images ({ds.spec}{f'; {unread} unreadable' if unread else ''})"
        else:
            origin = f"from {act.images} dataset images so far ({ds.spec}, {len(ds)} in all: {'mining' if mining else 'mining paused'})"
        fields = summary_fields(act, layer=layer, source="dataset", origin=origin)
        with self._lock:
            self._derived[layer] = (key, fields)
        return fields

    def _read_atlas(self, root: Path, shapes: Mapping[str, tuple[int, ...]]) -> None:
        # the atlas fits the model: AtlasView checked it by the identity policy when the app was built
        with open_atlas(root) as atlas:
            samples = atlas.meta.get("samples")
            dataset = atlas.meta.get("dataset")
            for rec in atlas.layers():
                if not rec.mined or rec.name not in shapes:
                    continue
                # a layer mined for --dataset by an earlier run shows as the dataset's statistics
                source = "dataset" if self._miner is not None else "atlas"
                act = activity_from_unit_stats(rec.name, shapes[rec.name], atlas.stats(rec.name), None, 1, source=source)
                if self._miner is not None:
                    origin = f"from {act.images} dataset images ({dataset or self._miner.dataset.spec})"
                else:
                    origin = f"atlas {root.name}: {act.images} inputs of {dataset or 'its dataset'}"
                    if samples is not None and int(samples) != act.images:
                        origin += f" ({samples} samples)"
                self._fields[rec.name] = summary_fields(act, layer=rec.name, source=source, origin=origin)

    def _read_report(self, path: Path, model: Model, shapes: Mapping[str, tuple[int, ...]]) -> None:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InputError(f"cannot read the report {path}: {exc}") from None
        if not isinstance(data, dict) or not isinstance(data.get("activity"), dict):
            raise InputError(f"{path} is not a deepvis report's JSON (it has no 'activity'): give the .json that `deepvis report` wrote")
        what = f"report {path}"
        fix = "serve the model it was made for (same weights and --input-size), make a report of this model, or drop --report"
        recorded = data.get("identity")
        identity: dict[str, Any] = recorded if isinstance(recorded, dict) else data
        if "model_hash" in identity:
            check_identity(identity, model, what=what, fix=fix)
        else:
            log.warning("%s records no model identity (weights hash): its layers are checked by name and shape only", what)
        activity: dict[str, Any] = data["activity"]
        for name, d in activity.items():
            if name not in shapes:
                raise ModelError(f"{what} was made for another model (it has layer {name!r}, this model has none): {fix}")
            if tuple(d.get("shape") or ()) != shapes[name]:
                raise ModelError(
                    f"{what} was made for another model (layer {name} has shape {d.get('shape')}, here {list(shapes[name])}): {fix}"
                )
        locality = data.get("locality") or {}
        sens = data.get("sensitivity")
        for name, d in activity.items():
            act = activity_from_dict(d, source="report")
            loc = locality.get(name, {}).get("locality") if isinstance(locality.get(name), dict) else None
            self._fields[name] = summary_fields(
                act,
                layer=name,
                source="report",
                origin=f"report {path.name}: {act.images} inputs of {data.get('dataset') or 'its dataset'}",
                locality=loc,
                sensitivity=_layer_sensitivity(sens, name),
            )


def _layer_sensitivity(sens: Any, layer: str) -> dict[str, Any] | None:
    """One layer's part of a report's ``sensitivity``: its epsilons and mean change per perturbation kind."""
    if not isinstance(sens, dict) or layer not in (sens.get("layers") or []):
        return None
    li = sens["layers"].index(layer)
    return {
        "epsilons": sens.get("epsilons"),
        "mean_change": {k: [row[li] for row in rows] for k, rows in (sens.get("mean_change") or {}).items()},
    }
