"""On-demand synthesis (activation maximization) in the background, with progress for the pages.

Requests from any page go into one bounded queue; a worker thread with its own copy of the network
takes the oldest request together with the others waiting for the same layer (up to ``batch``) and
optimizes them as one batch with :func:`deepvis.optimize.visualize`, reporting progress to every page
that asked. The worker runs at a lower CPU priority where the system allows it, so the live view keeps
its share. Finished images are kept in memory (the newest ``max_results``) and served by unit.
"""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..capture import Unit
from ..capture.layers import activation_bytes
from ..errors import DeepvisError
from ..models.model import Model
from ..optimize import visualize
from ..runtime import choose_batch_size
from .engine import WorkLoop, error_message
from .protocol import text
from .session import Message, Session

__all__ = ["SynthesisService", "SynthesisJob", "SynthResult", "SynthesisBusy", "synthesis_batch"]

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
    """One unit to synthesize and the pages waiting for it."""

    layer: str
    unit: int
    pages: list[Session] = field(default_factory=list)
    state: str = "queued"
    progress: float = 0.0
    last_report: float = 0.0


@dataclass(frozen=True)
class SynthResult:
    """A finished synthesized image (PNG bytes, contrast-stretched for viewing) and the value reached."""

    png: bytes
    value: float | None
    version: int


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
    ) -> None:
        self.model = model
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
        self._results: OrderedDict[tuple[str, int], SynthResult] = OrderedDict()
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
            if (layer, unit) in self._results:
                self._send(session, layer, unit, "done", 1.0, value=self._results[(layer, unit)].value)
                return "done"
            for job in (*self._running, *self._queue):
                if (job.layer, job.unit) == (layer, unit):
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

    def result(self, layer: str, unit: int) -> SynthResult | None:
        with self._lock:
            return self._results.get((layer, unit))

    def units(self, layer: str) -> list[int]:
        """Units of ``layer`` with a finished image."""
        with self._lock:
            return sorted(u for (name, u) in self._results if name == layer)

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"waiting": len(self._queue), "running": len(self._running), "done": self.done}

    # -- the worker ------------------------------------------------------------------------------
    def _send(self, session: Session, layer: str, unit: int, state: str, progress: float, **extra: Any) -> None:
        self._post(session, text("synthesis", layer=layer, unit=unit, state=state, progress=round(progress, 4), **extra))

    def _broadcast(self, jobs: list[SynthesisJob], state: str, progress: float, **extra: Any) -> None:
        for job in jobs:
            job.state, job.progress = state, progress
            for page in job.pages:
                self._send(page, job.layer, job.unit, state, progress, **extra)

    def _take(self) -> list[SynthesisJob] | None:
        """The next batch: the oldest request and those waiting for the same layer (called with the lock held)."""
        if not self._queue or self._stop.is_set():
            return None
        layer = self._queue[0].layer
        jobs = [j for j in self._queue if j.layer == layer][: self.batch]
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

    def _run(self, jobs: list[SynthesisJob]) -> None:
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
            value = float(r.value) if r.value == r.value and abs(r.value) != float("inf") else None
            with self._lock:
                self._version += 1
                self._results[(job.layer, job.unit)] = SynthResult(buf.getvalue(), value, self._version)
                self._results.move_to_end((job.layer, job.unit))
                while len(self._results) > self.max_results:
                    self._results.popitem(last=False)
                self.done += 1
            self._broadcast([job], "done", 1.0, value=value)
