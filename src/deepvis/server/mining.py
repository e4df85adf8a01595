"""Dataset mining for the live toolbox (``deepvis serve --dataset DIR|demo``), in the background.

A :class:`DatasetMiner` fills an atlas folder (the resumable atlas of :mod:`deepvis.atlas`: the same
store, mining and views, through :func:`deepvis.atlas.build_atlas`) with the top-k inputs, their
receptive-field crops and deconv views of the layers the pages select: the selected layer first (its
selected unit's views before the others'), other layers when they are selected. It runs in one
:class:`~deepvis.server.engine.WorkLoop` thread on its own copy of the network, at a low CPU priority,
so the frame loop keeps its share; it never takes the engine's lock while it computes.

A build is stopped (its mining checkpointed, as a killed ``deepvis atlas`` job would be) when the
selected layer changes, when the selected unit changes while views are being made (so that unit's
views come next), and when the server stops; it continues from the checkpoint when its layer is
selected again. Progress goes to every page as a ``mining`` message holding the whole status
(newest wins).

The statistics of the layer being mined (every unit's mean, maximum, activity: the atlas's
:class:`~deepvis.stats.LayerStats`, read through the engine that folds the batches into it) are kept
after each batch (:meth:`DatasetMiner.mined_stats`), so the summary pane shows them while the pass
goes on. A temporary atlas (``--dataset`` without ``--atlas``) is a :class:`TemporaryAtlas`: removed
when the server closes, when it is garbage-collected without having been closed, and at interpreter
exit, whichever comes first.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..atlas import AtlasOptions, build_atlas, open_atlas
from ..atlas.store import INDEX_NAME
from ..atlas.views import check_view_mode
from ..capture import get_layer, layer_table
from ..datasets import ImageDataset
from ..errors import DeepvisError
from ..models.model import Model
from ..runtime import Autocast
from ..stats import Accumulator, LayerStats, LocalEngine, MiningProgress, StatsPlan
from .engine import WorkLoop, error_message
from .protocol import text
from .summary import MinedStats

__all__ = ["DatasetMiner", "LayerProgress", "TemporaryAtlas", "MINING_NICE"]

log = logging.getLogger("deepvis.server")

#: the miner's CPU priority (nice, the lowest): below the frame loop, the unit views (+5) and everything else on
#: the machine, it takes the CPU time they leave
MINING_NICE = 19
#: seconds between two progress messages
PROGRESS_INTERVAL = 0.25
#: unreadable inputs listed in a status (the count is always complete)
MAX_SKIPPED_LISTED = 20


@dataclass
class LayerProgress:
    """Where the mining of one layer stands.

    ``phase``: ``queued``, ``mining`` (``done``/``total`` inputs), ``views`` (``done``/``total`` units of
    the layer, those viewed by earlier runs included: a run restarted for another selected unit goes on
    counting), ``done`` or ``error`` (``message``); ``images_mined`` and ``units_viewed`` count
    the work this server did (0 for a layer an atlas held already).
    """

    layer: str
    units: int
    phase: str = "queued"
    done: int = 0
    total: int = 0
    images_mined: int = 0
    units_viewed: int = 0
    message: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "units": self.units,
            "phase": self.phase,
            "done": self.done,
            "total": self.total,
            "images_mined": self.images_mined,
            "units_viewed": self.units_viewed,
            "message": self.message,
        }


class TemporaryAtlas:
    """A temporary atlas folder (``deepvis-atlas-*`` in the system's temporary directory).

    It is removed by :meth:`remove`, or when this object is garbage-collected, or at interpreter exit
    (:func:`weakref.finalize`), whichever comes first: a server built and never started, or one
    whose start-up failed, leaves nothing behind.
    """

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="deepvis-atlas-"))
        self._finalizer = weakref.finalize(self, _remove_tree, self.path)

    def remove(self) -> None:
        """Remove the folder now (idempotent; a failure is logged, e.g. a miner still writing)."""
        self._finalizer()

    @property
    def removed(self) -> bool:
        """True once the folder was removed (or its removal tried)."""
        return not self._finalizer.alive


def _remove_tree(path: Path) -> None:
    """Remove ``path`` and what it holds (the finalizer of :class:`TemporaryAtlas`: holds no reference to it)."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as exc:  # e.g. a miner that did not stop in time still writing: say where it is left
        log.warning("could not remove the temporary atlas %s: %s", path, exc)


class _StatsTap(LocalEngine):
    """The local engine, telling ``on_batch`` about each layer's state after every batch is folded into
    it and once more when the pass ends (``final``): the atlas's own statistics, seen as they grow."""

    def __init__(self, model: Model, dataset: ImageDataset, on_batch: Callable[[LayerStats, bool], None], *, decode_threads: int) -> None:
        super().__init__(model, dataset, decode_threads=decode_threads)
        self._on_batch = on_batch

    def mine(
        self, plan: StatsPlan, states: Mapping[str, Accumulator], batches: Sequence[int], *, indices: Sequence[int] | None = None
    ) -> Iterator[MiningProgress]:
        layers = [st for st in states.values() if isinstance(st, LayerStats)]
        for step in super().mine(plan, states, batches, indices=indices):
            for st in layers:
                self._on_batch(st, False)
            yield step
        for st in layers:  # every batch is in: the pass is complete (also when a checkpoint held them all)
            self._on_batch(st, True)


@dataclass
class _Focus:
    layer: str | None = None
    unit: int = 0
    #: the unit changed since the running build began (its views should come next)
    moved: bool = False
    #: layers selected so far, the newest last
    wanted: list[str] = field(default_factory=list)


class DatasetMiner:
    """Mines ``dataset`` for ``model`` into the atlas folder ``root`` (see the module docstring).

    Args:
        model: a private copy of the network (:func:`~deepvis.server.engine.replica`), used only here.
        dataset: the dataset to mine (:func:`deepvis.datasets.open_dataset`).
        root: the atlas folder (created if missing; an existing atlas is continued).
        broadcast: sends a message to every page (thread-safe).
        on_change: called after a layer's mining or a run of views was recorded (e.g. to re-read the
            atlas's layer list).
        top: inputs kept per unit; batch_size: inputs per forward pass (a layer the atlas holds keeps
            its own recorded parameters).
        nice: the worker's CPU priority.
        autocast: the mining pass's forward passes run under autocast (``"bf16"``, ``"fp16"``; None:
            off; recorded in the atlas, see :class:`~deepvis.atlas.AtlasOptions`); crops and views do not.

    Raises :class:`~deepvis.atlas.AtlasError` when ``root`` holds an atlas of another model or dataset.
    """

    def __init__(
        self,
        model: Model,
        dataset: ImageDataset,
        root: Path,
        broadcast: Callable[[str], None],
        *,
        on_change: Callable[[], None] | None = None,
        top: int = 9,
        batch_size: int = 32,
        view_mode: str | None = None,
        nice: int = MINING_NICE,
        autocast: Autocast = None,
    ) -> None:
        self.model = model
        self.dataset = dataset
        self.root = Path(root)
        self._broadcast = broadcast
        self._on_change = on_change
        self._lock = threading.Condition()
        self._focus = _Focus()
        self._layers: dict[str, LayerProgress] = {}
        self._skipped: dict[int, tuple[str, str]] = {}
        self._mined: dict[str, MinedStats] = {}
        self._version = 0
        self._last_sent = 0.0
        self._stop = threading.Event()
        self.view_mode = view_mode or self._choose_view_mode()
        self.base = AtlasOptions(
            layers=(), top=top, batch_size=batch_size, view_mode=self.view_mode, synthesis=None, decode_threads=2, autocast=autocast
        )
        self._engine = _StatsTap(model, dataset, self._record_stats, decode_threads=self.base.decode_threads)
        self._worker: WorkLoop[str] = WorkLoop("deepvis-mining", self._lock, self._take, self._work, self._fail, nice=nice)

    def _choose_view_mode(self) -> str:
        """Deconv views (the original toolbox's) where the network allows them, else gradient views."""
        deepest = max(layer_table(self.model), key=lambda i: i.order).name
        try:
            check_view_mode(self.model, deepest, "deconv")
        except DeepvisError as exc:
            log.info("dataset views are gradient views: %s", exc)
            return "gradient"
        return "deconv"

    def prepare(self, layer: str) -> None:
        """Create the atlas (or check that the one in ``root`` fits this model and dataset) and record
        ``layer``, without mining: an atlas that does not fit raises now, before the server starts."""
        build_atlas(self.root, self.model, self.dataset, self._options(layer), progress=False, should_stop=lambda: True)

    def start(self) -> None:
        self._stop.clear()
        self._worker.start()

    def close(self, timeout: float = 60.0) -> None:
        """Stop the running build (mining checkpointed after its current batch) and the worker."""
        self._stop.set()
        self._worker.close(timeout)

    # -- what the pages select -------------------------------------------------------------------
    def select(self, layer: str, unit: int) -> None:
        """The pages look at ``layer:unit``: mine that layer first (its unit's views first)."""
        with self._lock:
            f = self._focus
            if (f.layer, f.unit) == (layer, unit):
                return
            new_layer = f.layer != layer
            if not new_layer:
                f.moved = True
            f.layer, f.unit = layer, unit
            if layer in f.wanted:
                f.wanted.remove(layer)
            f.wanted.append(layer)
            if layer not in self._layers:
                try:
                    units = get_layer(self.model, layer).units
                except DeepvisError:  # not a layer of this model: nothing to mine (the page was told already)
                    return
                self._layers[layer] = LayerProgress(layer, units)
            self._lock.notify_all()
        if new_layer:
            self._send(force=True)

    def status(self) -> dict[str, Any]:
        """The whole status (what a ``mining`` message holds): dataset, layers, unreadable inputs."""
        with self._lock:
            skipped = sorted(self._skipped.items())
            return {
                "available": True,
                "dataset": self.dataset.spec,
                "samples": len(self.dataset),
                "view_mode": self.view_mode,
                "layers": {name: p.to_dict() for name, p in self._layers.items()},
                "skipped_count": len(skipped),
                "skipped": [{"name": Path(key).name, "reason": why} for _i, (key, why) in skipped[:MAX_SKIPPED_LISTED]],
            }

    def layer(self, layer: str) -> LayerProgress | None:
        """A copy of where the mining of ``layer`` stands (None: not selected so far)."""
        with self._lock:
            p = self._layers.get(layer)
            return replace(p) if p is not None else None

    def phase(self, layer: str) -> str | None:
        """Where the mining of ``layer`` stands (:class:`LayerProgress` ``phase``; None: not selected so far)."""
        with self._lock:
            p = self._layers.get(layer)
            return p.phase if p is not None else None

    def mined_stats(self, layer: str) -> MinedStats | None:
        """The statistics this server has mined for ``layer`` so far (None: none yet; a layer the atlas
        held before the server started is read from the atlas instead)."""
        with self._lock:
            return self._mined.get(layer)

    def _record_stats(self, state: LayerStats, final: bool) -> None:
        units = tuple(state.unit_stats())  # one small device-to-host copy per batch, in the miner's thread
        with self._lock:
            self._version += 1
            self._mined[state.layer] = MinedStats(state.layer, units, final, self._version)

    # -- the worker ------------------------------------------------------------------------------
    def _take(self) -> str | None:
        """The next layer to work on: the selected one, else the most recently selected unfinished one
        (called with the lock held)."""
        if self._stop.is_set():
            return None
        for name in reversed(self._focus.wanted):
            p = self._layers.get(name)
            if p is not None and p.phase not in ("done", "error"):
                self._focus.moved = False
                return name
        return None

    def _options(self, layer: str) -> AtlasOptions:
        """The build options for ``layer``: the atlas's recorded parameters when it holds the layer."""
        opts = replace(self.base, layers=(layer,))
        if (self.root / INDEX_NAME).exists():
            with open_atlas(self.root) as atlas:
                rec = next((r for r in atlas.layers() if r.name == layer), None)
            if rec is not None:
                p = rec.params
                opts = replace(opts, top=int(p.get("top", opts.top)), batch_size=int(p.get("batch_size", opts.batch_size)))
                opts = replace(opts, view_mode=str(p.get("view_mode", opts.view_mode)))
        return opts

    def _should_stop(self, layer: str, phase: Callable[[], str]) -> bool:
        with self._lock:
            f = self._focus
            return self._stop.is_set() or f.layer != layer or (f.moved and phase() == "views")

    def _work(self, layer: str) -> None:
        with self._lock:
            p = self._layers[layer]
            unit = self._focus.unit if self._focus.layer == layer else 0
        units = p.units
        order = f"{unit}-{units - 1},0-{unit - 1}" if unit > 0 else "all"  # the selected unit's views first
        now = {"phase": "mining"}

        def progress(phase: str, done: int, total: int) -> None:
            now["phase"] = phase
            if phase == "views":  # a run continues the layer's views: count the units viewed before it too
                done, total = done + max(0, p.units - total), p.units
            with self._lock:
                p.phase, p.done, p.total = phase, done, total
            self._send()

        with self._lock:
            stats = self._mined.get(layer)
            if stats is not None and stats.final:  # mined already: a views run restarted (another unit) goes on from its count
                p.phase, p.done, p.total = "views", min(p.units, p.units_viewed), p.units
            else:
                p.phase, p.done, p.total = "mining", 0, len(self.dataset)
        self._send(force=True)
        opts = self._options(layer)

        def stop() -> bool:
            return self._should_stop(layer, lambda: now["phase"])

        # mining first (its top-k and what could not be read are shown as soon as it ends), then the views
        mined = build_atlas(
            self.root,
            self.model,
            self.dataset,
            replace(opts, views=False),
            engine=self._engine,
            progress=False,
            on_progress=progress,
            should_stop=stop,
        )
        self._record(p, mined.images_mined, 0, mined.skipped)
        if mined.stopped:
            self._finish(p, stopped=True)
            return
        if self._on_change is not None:
            self._on_change()  # the atlas has the layer's top-k now
        now["phase"] = "views"
        with self._lock:
            p.phase, p.done, p.total = "views", min(p.units, p.units_viewed), p.units
        self._send(force=True)
        viewed = build_atlas(
            self.root,
            self.model,
            self.dataset,
            replace(opts, units=order),
            engine=self._engine,
            progress=False,
            on_progress=progress,
            should_stop=stop,
        )
        self._record(p, 0, viewed.units_viewed, viewed.skipped)
        self._finish(p, stopped=viewed.stopped)

    def _record(self, p: LayerProgress, images: int, units: int, skipped: list[tuple[int, str, str]]) -> None:
        """Count a build's work and log the inputs it found unreadable (once each)."""
        with self._lock:
            p.images_mined += images
            p.units_viewed += units
            new = [(i, k, why) for i, k, why in skipped if i not in self._skipped]
            self._skipped.update({i: (k, why) for i, k, why in skipped})
        if new:
            listed = ", ".join(f"{Path(k).name} ({why})" for _i, k, why in new[:MAX_SKIPPED_LISTED])
            log.warning("dataset %s: %d unreadable inputs skipped: %s", self.dataset.spec, len(new), listed)

    def _finish(self, p: LayerProgress, *, stopped: bool) -> None:
        with self._lock:
            if stopped:
                p.phase = "queued"  # continued (from its checkpoint) when it is picked again
            else:
                p.phase, p.done, p.total = "done", p.units, p.units
        self._send(force=True)

    def _fail(self, layer: str, exc: Exception) -> None:
        with self._lock:
            p = self._layers[layer]
            p.phase, p.message = "error", error_message(exc, "dataset mining")
        self._send(force=True)

    def _send(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_sent < PROGRESS_INTERVAL:
            return
        self._last_sent = now
        self._broadcast(text("mining", **self.status()))
