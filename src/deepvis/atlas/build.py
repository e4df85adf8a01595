"""Building an atlas: mining, then views, then synthesis, resumably, on any engine."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .._progress import progress_bar
from .._version import __version__
from ..capture import LayerInfo, get_layer, parse_unit_set, token_layer, token_layer_info
from ..datasets import ImageDataset, open_dataset
from ..errors import DeepvisError
from ..models.identity import model_identity
from ..models.model import Model, require_model
from ..runtime import autocast_name
from ..stats import Engine, LayerStats, batch_indices, make_engine, num_batches
from .mining import MiningPlan
from .options import AtlasOptions, SynthesisOptions
from .runner import run_task
from .store import AUTOCAST_KEY, DEVICE_KEY, AtlasWriter
from .synthesis import check_synthesis_options
from .tasks import UnitTask
from .views import check_view_mode

__all__ = ["AtlasSummary", "build_atlas"]


@dataclass
class AtlasSummary:
    """What a build did: the atlas folder, images mined in this run, units given views and synthesized
    images in this run, and every input skipped so far (sample, key, reason)."""

    root: Path
    layers: list[str]
    images_mined: int = 0
    units_viewed: int = 0
    units_synthesized: int = 0
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    #: True when ``should_stop`` ended the build early (mining checkpointed; run again to continue)
    stopped: bool = False


def build_atlas(
    output: str | os.PathLike[str],
    model: Model,
    dataset: ImageDataset | str,
    options: AtlasOptions,
    *,
    engine: str | Engine = "local",
    ray_address: str | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    on_progress: Callable[[str, int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    allow_other_device: bool = False,
    allow_other_autocast: bool = False,
) -> AtlasSummary:
    """Build (or resume) the atlas in folder ``output`` for ``options.layers`` of ``model`` over ``dataset``.

    Phases: (1) mining — one pass over the dataset keeping each unit's top-k and statistics,
    checkpointed every ``options.checkpoint_seconds``; (2) views — crops and backprop views of every
    top-k input; (3) synthesis. Finished work recorded in the atlas is never redone, so a killed job
    resumes where it stopped; parameters that differ from the recorded ones raise
    :class:`~deepvis.atlas.store.AtlasError`. ``engine`` is ``local``, ``ray`` (see
    :class:`~deepvis.atlas.engines.RayEngine`; ``workers`` actors) or an :class:`Engine`.
    ``progress`` shows a bar per phase (None: when stderr is a terminal). ``on_progress(phase, done, total)``
    is called as work is done (``mining``: inputs, ``views``: units of this run). ``should_stop()`` is asked
    before mining and after every batch or unit: when it returns True the build stops at once (mining
    progress checkpointed, later phases not started) with ``stopped`` set; with a ``should_stop`` that is
    always True, the call only creates or checks the atlas and records its layers. The device type
    (``cpu``, ``cuda``) is recorded: resuming on another type raises :class:`~deepvis.atlas.store.AtlasError`
    unless ``allow_other_device`` (results agree across devices only within float rounding).
    ``options.autocast`` (the mining pass's forward passes; crops, views and synthesis run in the
    model's own dtype) is recorded too: resuming with another setting raises
    :class:`~deepvis.atlas.store.AtlasError` unless ``allow_other_autocast``.
    """
    model = require_model(model)
    stop = should_stop or (lambda: False)
    ds = open_dataset(dataset) if isinstance(dataset, (str, os.PathLike)) else dataset
    if not options.layers:
        raise DeepvisError("no layer given: pass at least one layer (see `deepvis layers`)")
    if options.top < 1 or options.batch_size < 1:
        raise DeepvisError("--top and --batch-size must be at least 1")
    infos = [get_layer(model, name) for name in dict.fromkeys(options.layers)]
    if options.prefix_tokens:  # every prefix token of each token layer, as its own vector layer LAYER@TOKEN
        named = {i.name for i in infos}
        infos += [
            token_layer_info(i, t)
            for i in list(infos)
            if i.layout.kind == "tokens"
            for t in i.prefix
            if token_layer(i.name, t) not in named
        ]
    unit_sets = {info.name: parse_unit_set(options.units or "all", info.units, info.name) for info in infos}
    meta = {
        **model_identity(model),
        "dataset": ds.spec,
        "dataset_hash": ds.fingerprint(),
        "samples": len(ds),
        "deepvis": __version__,
        DEVICE_KEY: model.device.type,
        AUTOCAST_KEY: options.autocast,
    }
    summary = AtlasSummary(Path(output), [i.name for i in infos])
    if options.views:
        check_view_mode(model, max(infos, key=lambda i: i.order).name, options.view_mode)
    if options.synthesis is not None:
        check_synthesis_options(model, options.synthesis)
    with AtlasWriter(Path(output), meta, allow_other_device=allow_other_device, allow_other_autocast=allow_other_autocast) as writer:
        for info in infos:
            writer.ensure_layer(info.name, info.order, info.shape, options.layer_params())
            if options.synthesis is not None:
                writer.ensure_synth_params(info.name, options.synthesis.params())
        eng = None
        try:
            pending = [i for i in infos if not writer.mined(i.name)]
            if pending and stop():
                summary.stopped = True
            elif pending:
                eng = eng or make_engine(engine, model, ds, ray_address=ray_address, workers=workers, decode_threads=options.decode_threads)
                t0 = time.perf_counter()
                summary.images_mined, summary.stopped = _mine(writer, eng, ds, pending, options, progress, on_progress, stop)
                summary.seconds["mining"] = time.perf_counter() - t0
            if options.views and not summary.stopped:
                tasks = _view_tasks(writer, infos, unit_sets, options)
                if tasks:
                    eng = eng or make_engine(
                        engine, model, ds, ray_address=ray_address, workers=workers, decode_threads=options.decode_threads
                    )
                    t0 = time.perf_counter()
                    summary.units_viewed, summary.stopped = _run_views(writer, eng, ds, tasks, progress, on_progress, stop)
                    summary.seconds["views"] = time.perf_counter() - t0
            if options.synthesis is not None and not summary.stopped:
                tasks = _synth_tasks(writer, infos, unit_sets, options.synthesis)
                if tasks:
                    eng = eng or make_engine(
                        engine, model, ds, ray_address=ray_address, workers=workers, decode_threads=options.decode_threads
                    )
                    t0 = time.perf_counter()
                    summary.units_synthesized = _run_synth(writer, eng, tasks, progress)
                    summary.seconds["synthesis"] = time.perf_counter() - t0
        finally:
            if eng is not None and not isinstance(engine, Engine):
                eng.close()
        summary.skipped = writer.skipped()
    return summary


def _map_size(info: LayerInfo) -> tuple[int, int] | None:
    return (info.shape[1], info.shape[2]) if info.spatial else None


def _mine(
    writer: AtlasWriter,
    eng: Engine,
    ds: ImageDataset,
    infos: Sequence[LayerInfo],
    options: AtlasOptions,
    progress: bool | None,
    on_progress: Callable[[str, int, int], None] | None,
    stop: Callable[[], bool],
) -> tuple[int, bool]:
    """Mine ``infos``; returns (inputs mined, stopped early: progress checkpointed, mining not finished)."""
    plan = MiningPlan({i.name: (i.units, _map_size(i)) for i in infos}, options.top, options.batch_size, autocast_name(options.autocast))
    states: dict[str, LayerStats] = {}
    for name, (units, ms) in plan.layers.items():
        st = writer.load_checkpoint(name, eng.state_device)
        if st is not None and (st.units != units or st.k != options.top or st.map_size != ms):
            st = None  # cannot happen with matching parameters; start the layer over rather than mix
        states[name] = st or LayerStats(name, units, options.top, ms, eng.state_device)
    total = num_batches(len(ds), options.batch_size)
    batches = [b for b in range(total) if any(b not in st.done for st in states.values())]
    already = len(ds) - sum(len(batch_indices(b, options.batch_size, len(ds))) for b in batches)
    skipped: list[tuple[int, str, str]] = []
    mined = 0
    bar = progress_bar(total=len(ds), initial=already, desc="mining", unit="img", enabled=progress)
    last = time.monotonic()
    try:
        for step in eng.mine(plan, states, batches):
            mined += step.images
            skipped += [(i, ds.samples[i].key, why) for i, why in step.skipped]
            bar.update(step.images + len(step.skipped))
            if on_progress is not None:
                on_progress("mining", bar.n, len(ds))
            if stop():
                writer.save_progress(states.values(), skipped)
                return mined, True
            if time.monotonic() - last >= options.checkpoint_seconds:
                writer.save_progress(states.values(), skipped)
                skipped = []
                last = time.monotonic()
    finally:
        bar.close()
    writer.finish_mining(states.values(), ds.samples, skipped)
    return mined, False


def _chunks(items: Sequence[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(items[i : i + size]) for i in range(0, len(items), size)]


def _view_tasks(writer: AtlasWriter, infos: Sequence[LayerInfo], unit_sets: dict[str, list[int]], options: AtlasOptions) -> list[UnitTask]:
    tasks = []
    opts = tuple(sorted({"mode": options.view_mode}.items()))
    for info in infos:
        todo = set(writer.units_without_views(info.name, unit_sets[info.name]))
        for group in _chunks(unit_sets[info.name], options.views_units_per_task):
            group = tuple(u for u in group if u in todo)
            if group:
                entries = tuple(tuple((r, s, p) for r, s, p, _v in writer.top_entries(info.name, u)) for u in group)
                tasks.append(UnitTask("views", info.name, group, entries, opts))
    return tasks


def _synth_tasks(
    writer: AtlasWriter, infos: Sequence[LayerInfo], unit_sets: dict[str, list[int]], synth: SynthesisOptions
) -> list[UnitTask]:
    tasks = []
    opts = tuple(sorted(synth.params().items()))
    for info in infos:
        todo = set(writer.units_without_synth(info.name, unit_sets[info.name]))
        # groups are fixed slices of the unit list: a group is recomputed whole when any unit is missing,
        # so a unit's batch companions (and so its exact result) never depend on where a job stopped
        for group in _chunks(unit_sets[info.name], synth.units_per_batch):
            if todo.intersection(group):
                tasks.append(UnitTask("synth", info.name, group, (), opts))
    return tasks


def _run_views(
    writer: AtlasWriter,
    eng: Engine,
    ds: ImageDataset,
    tasks: list[UnitTask],
    progress: bool | None,
    on_progress: Callable[[str, int, int], None] | None,
    stop: Callable[[], bool],
) -> tuple[int, bool]:
    """Make and write the views of ``tasks``; returns (units written, stopped early)."""
    n = 0
    total = sum(len(t.units) for t in tasks)
    bar = progress_bar(total=total, desc="views", unit="unit", enabled=progress)
    try:
        for results in eng.map(run_task, tasks):
            for r in results:
                if r.skipped:
                    writer.save_progress([], [(i, ds.samples[i].key, why) for i, why in r.skipped])
                writer.write_views(r.layer, r.unit, r.crops, r.views)
                n += 1
            bar.update(len(results))
            if on_progress is not None:
                on_progress("views", n, total)
            if stop():
                return n, True
    finally:
        bar.close()
    return n, False


def _run_synth(writer: AtlasWriter, eng: Engine, tasks: list[UnitTask], progress: bool | None) -> int:
    n = 0
    todo = {(t.layer, u) for t in tasks for u in writer.units_without_synth(t.layer, t.units)}
    bar = progress_bar(total=len(todo), desc="synthesis", unit="unit", enabled=progress)
    try:
        for results in eng.map(run_task, tasks):
            for r in results:
                if (r.layer, r.unit) in todo:
                    assert r.image is not None and r.raw is not None
                    writer.write_synth(r.layer, r.unit, r.image, r.raw, r.value, r.info)
                    n += 1
                    bar.update(1)
    finally:
        bar.close()
    return n
