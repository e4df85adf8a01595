"""On-demand synthesis, feature accentuation and quality figures in the background, with progress for the pages.

Requests from any page go into one bounded queue; a worker thread with its own copy of the network
takes the oldest request together with the others waiting for the same layer (up to ``batch``) and
optimizes them as one batch with :func:`deepvis.optimize.visualize`, reporting progress to every page
that asked. The worker runs at a lower CPU priority where the system allows it, so the live view keeps
its share. Finished images are kept in memory (the newest ``max_results``) and served by unit.

Three kinds of job share the queue and the worker (``job`` in every ``synthesis`` message):

* ``synthesize``: activation maximization of a unit (batched per layer);
* ``accentuate``: feature accentuation (:mod:`deepvis.optimize.accentuate`) of a unit starting from
  the frame the page shows (as the server last preprocessed it), one at a time, cancellable; its
  result reports the unit's activation before and after and the pixel distance reached against the ball;
* ``figures``: the quality figures (:func:`deepvis.scores.score_image`) of an atlas's synthesized image.

Every synthesized or accentuated image gets its quality figures (:func:`quality_figures`), computed
on the worker's thread: beats-top-k and plausibility against the unit's top-9 in the atlas (or what
the dataset miner has found so far), transfer to the judges for class units. The judges
(``ServerConfig.judges``) are loaded once, lazily, the first time a figure needs them; a figure that
cannot be computed says why (``no_score``).
"""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

from ..capture import LOGITS, Unit
from ..capture.layers import activation_bytes
from ..errors import DeepvisError, InputError
from ..models.identity import model_identity
from ..models.model import Model
from ..optimize import visualize
from ..optimize.accentuate import Accentuation
from ..optimize.images import contrast_text
from ..runtime import choose_batch_size
from ..scores import DEFAULT_JUDGES, Judge, load_judges, objective_value, score_image
from .atlas_view import AtlasView
from .engine import WorkLoop, error_message
from .protocol import ProtocolError, ViewSettings, json_float, text
from .session import Message, Session

__all__ = [
    "SynthesisService",
    "SynthesisJob",
    "SynthResult",
    "SynthesisBusy",
    "synthesis_batch",
    "quality_figures",
    "JOBS",
    "figures_line",
]

#: the jobs of the worker, as the ``job`` field of a ``synthesis`` message names them
JOBS = ("synthesize", "accentuate", "figures")

#: seconds between two progress messages of one job
PROGRESS_INTERVAL = 0.25
#: requests optimized together on the CPU (on a GPU: what its free memory holds, at most ``_GPU_BATCH``)
CPU_BATCH = 8
_GPU_BATCH = 64


def synthesis_batch(model: Model) -> int:
    """How many requests one synthesis run optimizes together: :data:`CPU_BATCH` on the CPU; on a GPU
    as many as its free memory holds at the model's input size (:func:`deepvis.runtime.choose_batch_size`)."""
    return choose_batch_size(model.device, lambda: activation_bytes(model, backward=True), cpu_batch=CPU_BATCH, upper=_GPU_BATCH)


class SynthesisBusy(DeepvisError):
    """Too many synthesis requests are waiting."""


@dataclass
class SynthesisJob:
    """One unit to synthesize (``job`` ``synthesize``), accentuate from ``start`` (``accentuate``: the
    page's frame at the model's input size, and the pinned ``position`` or None) or score
    (``figures``), and the pages waiting for it."""

    layer: str
    unit: int
    pages: list[Session] = field(default_factory=list)
    state: str = "queued"
    progress: float = 0.0
    last_report: float = 0.0
    job: str = "synthesize"
    start: Image.Image | None = None
    position: tuple[int, int] | None = None
    cancelled: bool = False


@dataclass(frozen=True)
class SynthResult:
    """A finished synthesized or accentuated image (PNG bytes, contrast-stretched for viewing; an
    accentuation as it is), the value reached, its quality figures (``scores``: :func:`quality_figures`)
    and, for an accentuation, ``info`` (activation before and after, distance reached)."""

    png: bytes
    value: float | None
    version: int
    scores: dict[str, Any] | None = None
    info: dict[str, Any] | None = None


def _judge(spec: str) -> str:
    """A judge's spec as the line shows it: a file spec by its file name (``dir/m.py:f`` → ``m.py:f``)."""
    return spec.rsplit("/", 1)[-1]


def figures_line(scores: dict[str, Any]) -> str:
    """The figures as one short line for the page, e.g. ``beats-top-9: 1.8x (9/9) · plausibility 0.41 (lite1) ·
    transfer lite2 #3 p=0.12 · contrast 12 levels RMS`` (``*`` after a judge that is the served model; a faint
    image's contrast says how much its display magnifies it); a figure that could not be computed as
    ``beats-top-k: no score (reason)``."""
    parts = []
    b = scores.get("beats_top_k")
    if b:
        ratio = f"{b['ratio']:.2g}x" if b.get("ratio") is not None else "n/a"
        parts.append(f"beats-top-{b['k']}: {ratio} ({b['beats']}/{b['k']})")
    p = scores.get("plausibility") or []
    if p:
        parts.append("plausibility " + " ".join(f"{r['mean']:.2f} ({_judge(r['judge'])}{'*' if r['same_model'] else ''})" for r in p))
    t = [r for r in scores.get("transfer") or [] if "rank" in r]
    if t:
        parts.append(
            "transfer " + " ".join(f"{_judge(r['judge'])}{'*' if r['same_model'] else ''} #{r['rank']} p={r['probability']:.2f}" for r in t)
        )
    c = scores.get("contrast")
    if c:
        parts.append(f"contrast {contrast_text(c)}")
    for what, why in (scores.get("no_score") or {}).items():
        parts.append(f"{what}: no score ({why})")
    return " · ".join(parts)


def quality_figures(
    model: Model,
    image: Image.Image,
    unit: Unit,
    judges: Callable[[], list[Judge]],
    atlas: AtlasView | None,
    *,
    identity: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The quality figures of ``image`` (as ``model`` saw it) for ``unit``, through :func:`deepvis.scores.score_image`.

    ``judges()`` gives the judge models (called only when a figure needs them: transfer for class
    units, plausibility when the atlas has the unit's top-9 crops); ``atlas`` (None: none) gives the
    unit's top-9; ``identity``: ``model``'s :func:`~deepvis.models.model_identity` when known (hashing
    reads every weight). Returns score_image's dict plus ``no_score`` (figure → reason, for each figure that
    could not be computed) and ``line`` (:func:`figures_line`).
    """
    no_score: dict[str, str] = {}
    classes = unit.layer == LOGITS
    mined = atlas is not None and atlas.has_top(unit.layer, unit.channel)
    has_crops = mined and atlas is not None and atlas.has_crops(unit.layer, unit.channel)
    need_judges = classes or has_crops
    try:
        js = judges() if need_judges else []
    except DeepvisError as exc:
        js = []
        no_score["judges"] = f"cannot load the judges: {exc}"
    record: dict[str, Any] = {
        "unit": str(Unit(unit.layer, unit.channel)),
        "model_identity": dict(identity or model_identity(model)),
        "mean_pixel": model.preprocessing.mean_pixel().tolist(),
    }
    if classes:
        record["classes"] = {"index": unit.channel, "name": model.label(unit.channel)}
    if mined and atlas is not None:
        out = atlas.read(lambda a: score_image(image, record, js, atlas=a, optimized=model))
    else:
        out = score_image(image, record, js)
    if out["beats_top_k"] is None:
        skipped = [f for f in out["flags"] if f.startswith("beats-top-k skipped")]
        if atlas is None:
            no_score["beats-top-k"] = "no atlas: start with --atlas or --dataset"
        else:
            no_score["beats-top-k"] = skipped[0].split(": ", 1)[1] if skipped else "the unit's top-9 are not mined yet"
    if not out["plausibility"]:
        if atlas is None:
            no_score["plausibility"] = "no atlas: start with --atlas or --dataset"
        elif not mined:
            no_score["plausibility"] = "the unit's top-9 are not mined yet"
        elif not has_crops:
            no_score["plausibility"] = "no top-9 crops in the atlas yet"
        elif not js:
            no_score["plausibility"] = "no judge model (ServerConfig.judges)"
    if classes and not [r for r in out["transfer"] if "rank" in r]:
        notes = [r["note"] for r in out["transfer"] if "note" in r]
        no_score["transfer"] = notes[0] if notes else "no judge model (ServerConfig.judges)"
    out["no_score"] = no_score
    out["line"] = figures_line(out)
    return out


class SynthesisService:
    """The background synthesis worker (see module docstring).

    ``post(session, message)`` delivers a message to a page (thread-safe); ``params(layer)`` gives the
    synthesis parameters for a layer (``preset``, ``steps``, ``size``, ``seed``: e.g. the atlas's).
    """

    def __init__(
        self,
        model: Model,
        post: Callable[[Session, Message], None],
        params: Callable[[str], dict[str, Any]],
        *,
        max_waiting: int = 8,
        max_results: int = 256,
        batch: int | None = None,
        nice: int = 5,
        atlas: AtlasView | None = None,
        judges: tuple[str, ...] = DEFAULT_JUDGES,
    ) -> None:
        self.model = model
        #: the atlas the quality figures compare with (its top-9 per unit), or None
        self.atlas = atlas
        #: the judge models' specs (:func:`deepvis.scores.load_judges`), loaded on first use
        self.judge_specs = tuple(judges)
        self._judges: list[Judge] | None = None
        self._judges_error: DeepvisError | None = None
        self._identity: dict[str, Any] | None = None
        #: quality figures of atlas images: (layer, unit) -> figures
        self._figures: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()
        self._post = post
        self._params = params
        self.max_waiting = max_waiting
        self.max_results = max_results
        #: requests optimized together: ``batch``, or 8 on the CPU and what the GPU's free memory holds there
        self.batch = batch if batch is not None else synthesis_batch(model)
        self.nice = nice
        self._lock = threading.Condition()
        self._queue: list[SynthesisJob] = []
        self._running: list[SynthesisJob] = []
        #: (job, layer, unit) -> result, job ``synthesize`` or ``accentuate``
        self._results: OrderedDict[tuple[str, str, int], SynthResult] = OrderedDict()
        self._version = 0
        #: set when the service stops: no new batch starts, and the running one stops after its current step
        self._stop = threading.Event()
        self._worker: WorkLoop[list[SynthesisJob]] = WorkLoop(
            "deepvis-synthesis", self._lock, self._take, self._work, self._fail, nice=nice
        )
        self.done = 0

    def start(self) -> None:
        self._stop.clear()
        self._worker.start()

    def close(self, timeout: float = 30.0) -> None:
        """Cancel the running batch (after its current step) and stop the worker."""
        self._stop.set()
        self._worker.close(timeout)

    # -- requests --------------------------------------------------------------------------------
    def request(self, session: Session, layer: str, unit: int) -> str:
        """Queue ``layer:unit`` for ``session`` (joining a job already queued or running); returns its state.

        Raises :class:`SynthesisBusy` when ``max_waiting`` jobs already wait.
        """
        with self._lock:
            if ("synthesize", layer, unit) in self._results:
                done = self._results[("synthesize", layer, unit)]
                self._send(session, layer, unit, "done", 1.0, value=done.value, scores=done.scores)
                return "done"
            for job in (*self._running, *self._queue):
                if (job.job, job.layer, job.unit) == ("synthesize", layer, unit):
                    if session not in job.pages:
                        job.pages.append(session)
                    self._send(session, layer, unit, job.state, job.progress)
                    return job.state
            if len(self._queue) >= self.max_waiting:
                raise SynthesisBusy(f"{len(self._queue)} units are already waiting to be synthesized; try again when they are done")
            self._queue.append(SynthesisJob(layer, unit, [session]))
            self._send(session, layer, unit, "queued", 0.0)  # before the worker can report "running"
            self._lock.notify_all()
        return "queued"

    def accentuate(self, session: Session, layer: str, unit: int, position: tuple[int, int] | None = None) -> str:
        """Queue the feature accentuation of ``layer:unit`` (at the pinned ``position``, else its channel's
        mean) starting from the frame ``session`` shows; returns its state. A request for the same unit
        still waiting takes the newest frame; a page's earlier accentuation still waiting is replaced.

        Raises :class:`~deepvis.errors.InputError` when the page shows no frame yet, and
        :class:`SynthesisBusy` when ``max_waiting`` jobs already wait.
        """
        frame = session.current
        if frame is None:
            raise InputError("no frame to accentuate yet: show an image, a sample or the camera first")
        start = frame.image.copy()
        with self._lock:
            for job in list(self._queue):
                if job.job == "accentuate" and session in job.pages:
                    job.pages.remove(session)
                    if not job.pages:
                        self._queue.remove(job)
            if len(self._queue) >= self.max_waiting:
                raise SynthesisBusy(f"{len(self._queue)} jobs are already waiting; try again when they are done")
            self._queue.append(SynthesisJob(layer, unit, [session], job="accentuate", start=start, position=position))
            self._send(session, layer, unit, "queued", 0.0, job="accentuate")
            self._lock.notify_all()
        return "queued"

    def cancel(self, session: Session, layer: str, unit: int) -> None:
        """Cancel ``session``'s accentuation of ``layer:unit``: dropped when it waits, stopped after the
        current step when it runs (the page is told ``cancelled``)."""
        with self._lock:
            for job in (*self._queue, *self._running):
                if job.job == "accentuate" and (job.layer, job.unit) == (layer, unit) and session in job.pages:
                    job.pages.remove(session)
                    if not job.pages:
                        job.cancelled = True
                        if job in self._queue:
                            self._queue.remove(job)
            self._send(session, layer, unit, "cancelled", 0.0, job="accentuate", message="cancelled")

    def figures(self, session: Session, layer: str, unit: int) -> str:
        """Queue the quality figures of the atlas's synthesized image of ``layer:unit`` for ``session``
        (sent at once when known); returns the job's state."""
        with self._lock:
            known = self._figures.get((layer, unit))
            if known is not None:
                self._send(session, layer, unit, "done", 1.0, job="figures", scores=known)
                return "done"
            for job in (*self._running, *self._queue):
                if (job.job, job.layer, job.unit) == ("figures", layer, unit):
                    if session not in job.pages:
                        job.pages.append(session)
                    return job.state
            if len(self._queue) >= self.max_waiting:
                raise SynthesisBusy(f"{len(self._queue)} jobs are already waiting; try again when they are done")
            self._queue.append(SynthesisJob(layer, unit, [session], job="figures"))
            self._lock.notify_all()
        return "queued"

    def on_message(self, session: Session, msg: dict[str, Any], check: Callable[[ViewSettings], object]) -> None:
        """A page's ``accentuate`` (``{layer, unit, position?, cancel?}``) or ``figures`` (``{layer, unit}``)
        message; ``check`` refuses a unit the model does not have (one line)."""
        layer, unit, position = msg.get("layer"), msg.get("unit"), msg.get("position")
        if not isinstance(layer, str) or not isinstance(unit, int) or isinstance(unit, bool):
            raise ProtocolError(f"{msg.get('type')} needs a layer name and a unit number")
        if position is not None and not (
            isinstance(position, list) and len(position) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in position)
        ):
            raise ProtocolError("position must be [row, column]")
        pos = (position[0], position[1]) if position is not None else None
        check(ViewSettings(layer=layer, unit=unit, position=pos))
        if msg.get("type") == "figures":
            self.figures(session, layer, unit)
        elif msg.get("cancel") is True:
            self.cancel(session, layer, unit)
        else:
            self.accentuate(session, layer, unit, pos)

    def result(self, layer: str, unit: int, job: str = "synthesize") -> SynthResult | None:
        """The newest result of ``job`` (``synthesize`` or ``accentuate``) for ``layer:unit``, or None."""
        with self._lock:
            return self._results.get((job, layer, unit))

    def units(self, layer: str) -> list[int]:
        """Units of ``layer`` with a finished synthesized image."""
        with self._lock:
            return sorted(u for (job, name, u) in self._results if name == layer and job == "synthesize")

    def annotate(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Add to an atlas unit record (:meth:`AtlasView.unit`) this server's synthesized image when the
        atlas has none, the figures known for the atlas's one, and the newest accentuation."""
        layer, unit = rec["layer"], rec["unit"]
        with self._lock:
            live = self._results.get(("synthesize", layer, unit))
            acc = self._results.get(("accentuate", layer, unit))
            known = self._figures.get((layer, unit))
        if rec.get("synth") is None and live is not None:
            rec["synth"] = {"value": live.value, "source": "live", "version": live.version, "scores": live.scores}
        elif rec.get("synth") is not None and known is not None:
            rec["synth"]["scores"] = known
        rec["accentuation"] = (
            {"value": acc.value, "version": acc.version, "scores": acc.scores, **(acc.info or {})} if acc is not None else None
        )
        return rec

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"waiting": len(self._queue), "running": len(self._running), "done": self.done}

    # -- the worker ------------------------------------------------------------------------------
    def _send(self, session: Session, layer: str, unit: int, state: str, progress: float, **extra: Any) -> None:
        extra.setdefault("job", "synthesize")
        self._post(session, text("synthesis", layer=layer, unit=unit, state=state, progress=round(progress, 4), **extra))

    def _broadcast(self, jobs: list[SynthesisJob], state: str, progress: float, **extra: Any) -> None:
        for job in jobs:
            job.state, job.progress = state, progress
            for page in list(job.pages):
                self._send(page, job.layer, job.unit, state, progress, job=job.job, **extra)

    def _take(self) -> list[SynthesisJob] | None:
        """The next batch: the oldest request and those waiting for the same layer (called with the lock
        held); an accentuation or figures job alone."""
        if not self._queue or self._stop.is_set():
            return None
        first = self._queue[0]
        if first.job != "synthesize":
            self._queue.remove(first)
            self._running = [first]
            return [first]
        layer = first.layer
        jobs = [j for j in self._queue if j.layer == layer and j.job == "synthesize"][: self.batch]
        for j in jobs:
            self._queue.remove(j)
        self._running = jobs
        return jobs

    def _work(self, jobs: list[SynthesisJob]) -> None:
        try:
            self._run(jobs)
        finally:
            with self._lock:
                self._running = []

    def _fail(self, jobs: list[SynthesisJob], exc: Exception) -> None:
        self._broadcast(jobs, "error", 0.0, message=error_message(exc, "synthesis"))

    def _load_judges(self) -> list[Judge]:
        """The judge models, loaded on the worker's thread the first time a figure needs them (once:
        a failure is remembered and raised again)."""
        if self._judges_error is not None:
            raise self._judges_error
        if self._judges is None:
            try:
                self._judges = load_judges(self.judge_specs, device=self.model.device)
            except DeepvisError as exc:
                self._judges_error = exc
                raise
        return self._judges

    def _scores(self, image: Image.Image, layer: str, unit: int) -> dict[str, Any]:
        if self._identity is None:  # once: the worker's network never changes
            self._identity = model_identity(self.model)
        return quality_figures(self.model, image, Unit(layer, unit), self._load_judges, self.atlas, identity=self._identity)

    def _keep(
        self, key: tuple[str, str, int], png: bytes, value: float | None, scores: dict[str, Any] | None, info: dict[str, Any] | None = None
    ) -> SynthResult:
        with self._lock:
            self._version += 1
            res = SynthResult(png, value, self._version, scores, info)
            self._results[key] = res
            self._results.move_to_end(key)
            while len(self._results) > self.max_results:
                self._results.popitem(last=False)
            return res

    def _run(self, jobs: list[SynthesisJob]) -> None:
        if jobs[0].job == "accentuate":
            self._accentuate(jobs[0])
            return
        if jobs[0].job == "figures":
            self._atlas_figures(jobs[0])
            return
        layer = jobs[0].layer
        p = self._params(layer)
        self._broadcast(jobs, "running", 0.0)

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - jobs[0].last_report >= PROGRESS_INTERVAL or done == total:
                jobs[0].last_report = now
                self._broadcast(jobs, "running", done / max(1, total))

        results = visualize(
            self.model,
            [Unit(layer, j.unit) for j in jobs],
            preset=p.get("preset", "3"),
            steps=p.get("steps"),
            size=p.get("size"),
            seed=int(p.get("seed", 0)),
            batch_size=len(jobs),
            progress=progress,
            should_stop=self._stop,
        )
        if len(results) < len(jobs) or any(r.stopped for r in results):
            self._broadcast(jobs, "cancelled", 0.0, message="the server is stopping")
            return
        for job, r in zip(jobs, results):
            buf = io.BytesIO()
            r.display_image().save(buf, format="PNG")
            value = json_float(r.value)
            scores = self._scores(r.raw_image(), job.layer, job.unit)
            self._keep(("synthesize", job.layer, job.unit), buf.getvalue(), value, scores)
            with self._lock:
                self.done += 1
            self._broadcast([job], "done", 1.0, value=value, scores=scores)

    def _accentuate(self, job: SynthesisJob) -> None:
        """Feature accentuation of one unit from the page's frame (:func:`deepvis.optimize.visualize` with ``start=``)."""
        assert job.start is not None
        p = self._params(job.layer)
        self._broadcast([job], "running", 0.0)
        unit = Unit(job.layer, job.unit, job.position)
        before = objective_value(self.model, job.start, unit)  # what the accentuation raises, not the map's maximum

        def progress(done: int, total: int) -> None:
            now = time.monotonic()
            if now - job.last_report >= PROGRESS_INTERVAL or done == total:
                job.last_report = now
                self._broadcast([job], "running", done / max(1, total))

        accent = Accentuation()
        results = visualize(
            self.model,
            [unit],
            preset=p.get("preset", "3"),
            steps=p.get("steps"),
            size=(job.start.height, job.start.width),
            seed=int(p.get("seed", 0)),
            batch_size=1,
            kind="neuron" if job.position is not None else "channel",
            progress=progress,
            should_stop=lambda: self._stop.is_set() or job.cancelled,
            start=job.start,
            accentuation=accent,
        )
        if not results or results[0].stopped:
            self._broadcast([job], "cancelled", 0.0, message="cancelled" if job.cancelled else "the server is stopping")
            return
        r = results[0]
        raw = r.raw_image()
        after = objective_value(self.model, raw, unit)
        d = r.distance or {}
        info = {
            "objective": r.objective,
            "measure": f"value at {job.position[0]},{job.position[1]}" if job.position is not None else "channel mean",
            "note": (
                f"the unit's gradient is exactly 0 on this frame{' at that position' if job.position is not None else ''}: "
                "nothing raises it, the frame is returned unchanged"
                if r.dead
                else None
            ),
            "before": json_float(before),
            "after": json_float(after),
            "objective_before": json_float(r.start_value),
            "objective_after": json_float(r.value),
            "pixel_rms": json_float(d.get("pixel_rms")),
            "pixel_max": json_float(d.get("pixel_max")),
            "feature": json_float(d.get("feature")),
            "radius": accent.radius,
        }
        scores = self._scores(raw, job.layer, job.unit)
        res = self._keep(("accentuate", job.layer, job.unit), png_of(raw), json_float(r.value), scores, info)
        self._broadcast([job], "done", 1.0, value=res.value, version=res.version, scores=scores, **info)

    def _atlas_figures(self, job: SynthesisJob) -> None:
        """The quality figures of the atlas's synthesized image of a unit (its raw picture, as the model saw it)."""
        self._broadcast([job], "running", 0.0)
        data = self.atlas.image(job.layer, job.unit, "synth_raw") if self.atlas is not None else None
        if data is None:
            scores: dict[str, Any] = {
                "no_score": {"figures": "no synthesized image in the atlas"},
                "line": "no score (no synthesized image)",
            }
        else:
            image = Image.open(io.BytesIO(data))
            image.load()
            scores = self._scores(image.convert(self.model.preprocessing.pil_mode), job.layer, job.unit)
        with self._lock:
            self._figures[(job.layer, job.unit)] = scores
            while len(self._figures) > self.max_results:
                self._figures.popitem(last=False)
        self._broadcast([job], "done", 1.0, scores=scores)


def png_of(image: Image.Image) -> bytes:
    """``image`` as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
