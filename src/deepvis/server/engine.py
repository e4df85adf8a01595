"""The live engine: one frame loop for every page, background workers for heavy views.

Design (see docs/server.md):

* Each page (:class:`~deepvis.server.session.Session`) has one slot for its newest unprocessed frame.
  A frame that arrives while the previous one still waits replaces it; the replaced one is counted as
  dropped. Nothing queues without bound.
* One frame-loop thread serves the pages round-robin. It takes a page's frame only when that page's
  previous result has been taken by its sender, so a page that stops reading costs no compute and
  holds at most one result, and cannot delay the others.
* Heavy per-frame work (the backprop unit view) runs in :class:`LatestJobs` workers on their own copy
  of the network: the frame loop hands them the newest frame's input and moves on. Synthesis runs in
  its own worker (:mod:`deepvis.server.synthesis`).
* The frame loop and the workers are the same loop (:class:`WorkLoop`): wait on the engine's one
  condition for work, compute it outside the lock, post the result (or the error) to the page. The
  sessions share that condition and take it in each of their methods; it is held only to pick or
  post work, never while computing.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any, Generic, TypeVar

import torch

from ..backprop import READABLE
from ..capture import CaptureCancelled, LayerInfo
from ..errors import DeepvisError
from ..models.cache import ModelCache
from ..models.model import Model
from ..runtime import Autocast
from .frames import FrameOutput, FrameProcessor, choose_memory_format, frame_image
from .protocol import ViewSettings, pack, text
from .session import Frame, Message, RawFrame, Session
from .summary import StoredSummaries

__all__ = ["LiveEngine", "LatestJobs", "WorkLoop", "TooManySessions", "replica", "default_layer", "error_message"]

log = logging.getLogger("deepvis.server")

Item = TypeVar("Item")

#: the backprop view's worker runs at this lower CPU priority: on a machine with few cores it shares
#: them with the frame loop, whose frames should not wait for it (the view follows a frame or two behind)
UNIT_VIEW_NICE = 5


class TooManySessions(DeepvisError):
    """The server already serves its maximum number of pages."""


def replica(model: Model) -> Model:
    """A private copy of the model for a worker thread that shares its weights.

    Capture and the unit views add temporary hooks to the modules they run on, and ``frozen`` sets
    the parameters' ``requires_grad`` flags; threads that share modules would see each other's hooks
    and flags, so every worker runs on its own module objects. The copy's parameters and buffers are
    new tensors over the same storage (same ``data_ptr``: no memory for the weights; a flag changed on
    one does not change the other), and everything else of the model (preprocessing, names, weights
    source, declared layouts) is kept; its cache of derived facts is its own. A copy that is converted
    (``channels_last``, another dtype) gets converted weights of its own; the others are untouched.
    Make copies before any thread runs on the network (a copy taken during a forward pass would carry
    its hooks).
    """
    module = model.module
    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach(), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = b.detach()
    return replace(model, module=copy.deepcopy(module, memo), cache=ModelCache())


def lower_priority(nice: int, what: str) -> None:
    """Lower the calling thread's CPU priority (Linux: threads are tasks with their own nice value, and
    the threads PyTorch starts from it inherit it), so background work yields to the live view."""
    if not hasattr(os, "setpriority"):
        return
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except OSError as exc:
        log.warning("%s runs at normal priority (could not lower it: %s)", what, exc)


def default_layer(table: list[LayerInfo]) -> str:
    """A mid-depth convolutional (or token) layer to open the page on (the logits for a model without maps)."""
    maps = [i for i in table if i.spatial and i.same_as is None and i.listed and i.layout.kind != "attention"]
    if not maps:
        return table[-1].name
    return maps[int(len(maps) * 0.45)].name


def error_message(exc: Exception, where: str) -> str:
    """The one line a page is shown for a failed job: the message of an error the user can cause
    (:class:`DeepvisError`), else ``internal error in <where>: <type>: <message>`` (a bug)."""
    if isinstance(exc, DeepvisError):
        return str(exc)
    return f"internal error in {where}: {type(exc).__name__}: {exc}"


class _Rate:
    """Events per second over the last ``window`` seconds."""

    def __init__(self, window: float = 2.0) -> None:
        self.window = window
        self.times: deque[float] = deque()

    def tick(self, now: float) -> None:
        self.times.append(now)
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()

    def rate(self, now: float) -> float:
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()
        if len(self.times) < 2:
            return 0.0
        return (len(self.times) - 1) / max(1e-6, self.times[-1] - self.times[0])


class WorkLoop(Generic[Item]):
    """A thread that waits for work on a shared condition, runs it outside the lock, and reports failures.

    ``pick()`` is called with ``cond`` held and returns the next item or None (the thread then waits
    until notified); ``run(item)`` computes and posts the result, without the lock; when it raises,
    ``fail(item, exc)`` tells the page. Errors a user can cause (:class:`DeepvisError`) are only
    reported; any other exception is a bug: it is logged with its traceback, reported, and the loop
    goes on serving. ``nice`` > 0 lowers the thread's CPU priority (:func:`lower_priority`).
    """

    def __init__(
        self,
        name: str,
        cond: threading.Condition,
        pick: Callable[[], Item | None],
        run: Callable[[Item], None],
        fail: Callable[[Item, Exception], None],
        *,
        nice: int = 0,
    ) -> None:
        self.name = name
        self.nice = nice
        self._cond = cond
        self._pick = pick
        self._run = run
        self._fail = fail
        self._stop = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread (idempotent)."""
        if self._thread is None:
            with self._cond:
                self._stop = False
            self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
            self._thread.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread once its current item is done (waits up to ``timeout`` seconds)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _next(self) -> Item | None:
        with self._cond:
            while True:
                item = self._pick()
                if item is not None:
                    return item
                if self._stop:
                    return None
                self._cond.wait()

    def _loop(self) -> None:
        if self.nice > 0:
            lower_priority(self.nice, self.name)
        while (item := self._next()) is not None:
            try:
                self._run(item)
            except Exception as exc:
                if not isinstance(exc, DeepvisError):
                    log.exception("%s failed", self.name)
                self._fail(item, exc)


Runner = Callable[[Session, Any], Message | None]


class LatestJobs:
    """A worker thread that runs, for each page and kind of job, only the newest job submitted.

    ``runners[kind](session, job)`` computes a message (or None) outside the lock. Binary messages are
    posted as the page's newest ``kind`` message, text messages as events. A page whose previous
    binary ``kind`` message has not been taken yet is skipped until it has (its job waits, replaced by
    any newer one), so a page that stops reading costs nothing. Failures are sent to the page as an
    ``error`` of scope ``kind`` (bugs are logged too: :class:`WorkLoop`). The worker runs on its own
    copy of the network (:func:`replica`), made by its owner before any thread runs.
    """

    def __init__(self, name: str, cond: threading.Condition, runners: Mapping[str, Runner], *, nice: int = 0) -> None:
        self.name = name
        self._cond = cond
        self._runners = dict(runners)
        self._jobs: dict[tuple[str, str], tuple[Session, Any]] = {}
        self._worker: WorkLoop[tuple[str, Session, Any]] = WorkLoop(name, cond, self._pick, self._run, self._fail, nice=nice)
        self.done = 0
        self.replaced = 0

    def start(self) -> None:
        self._worker.start()

    def close(self, timeout: float = 10.0) -> None:
        self._worker.close(timeout)

    def submit(self, session: Session, kind: str, job: Any) -> None:
        """Replace the page's waiting ``kind`` job (if any) with ``job``."""
        if kind not in self._runners:
            raise ValueError(f"unknown job kind {kind!r}")
        with self._cond:
            if (session.id, kind) in self._jobs:
                self.replaced += 1
            self._jobs[(session.id, kind)] = (session, job)
            self._cond.notify_all()

    def drop(self, session: Session) -> None:
        """Forget the page's waiting jobs."""
        with self._cond:
            for key in [k for k in self._jobs if k[0] == session.id]:
                del self._jobs[key]

    def _pick(self) -> tuple[str, Session, Any] | None:
        for key, (session, job) in list(self._jobs.items()):
            kind = key[1]
            if session.closed:
                del self._jobs[key]
            elif not session.holds(kind):
                del self._jobs[key]
                return kind, session, job
        return None

    def _run(self, item: tuple[str, Session, Any]) -> None:
        kind, session, job = item
        msg = self._runners[kind](session, job)
        if msg is None:
            return
        with self._cond:
            self.done += 1
        if isinstance(msg, str):
            session.put_event(msg)
        else:
            session.put_latest(kind, msg)

    def _fail(self, item: tuple[str, Session, Any], exc: Exception) -> None:
        kind, session, _ = item
        with self._cond:
            self.done += 1
        session.put_event(text("error", scope=kind, message=error_message(exc, kind)))


UnitViewFn = Callable[[Model, torch.Tensor, ViewSettings], tuple[dict[str, Any], Mapping[str, bytes]]]
GeometryFn = Callable[[Model, str], dict[str, Any]]
#: a page, the frame to compute for it, the settings to show it with and their generation
FrameJob = tuple[Session, RawFrame | Frame, ViewSettings, int]


class LiveEngine:
    """Serves the live view of one model to any number of pages (up to ``max_sessions``).

    ``unit_view(model, x, settings) -> (header, blobs)`` computes the backprop view of the selected
    unit for a model input ``x`` (1, C, H, W); ``geometry(model, layer) -> dict`` the receptive fields
    of a layer's positions. Both run in a background worker on a replica of the network; None
    disables them. The frame loop runs on its own replica too, converted to ``channels_last`` when
    that is faster (``tune_memory_format``). ``autocast`` (``"bf16"``, ``"fp16"``; see
    :func:`deepvis.runtime.autocast`) runs the frame loop's forward passes under autocast. The replicas
    share the model's weights (:func:`replica`), except a frame-loop copy converted to ``channels_last``.
    """

    def __init__(
        self,
        model: Model,
        *,
        unit_view: UnitViewFn | None = None,
        geometry: GeometryFn | None = None,
        max_sessions: int = 16,
        max_events: int = 64,
        tune_memory_format: bool = True,
        summaries: StoredSummaries | None = None,
        autocast: Autocast = None,
    ) -> None:
        self.model = model
        #: the summary pane's numbers read from an atlas or a report (layers without them: live statistics)
        self.summaries = summaries
        # the frame loop runs on a private copy too: the user's network is never hooked or converted
        self.frame_model = replica(model)
        fmt = choose_memory_format(self.frame_model) if tune_memory_format else torch.contiguous_format
        self.processor = FrameProcessor(self.frame_model, memory_format=fmt, autocast=autocast)
        # pages open on a backprop view readable on real photos (when there is one)
        self.default_settings = ViewSettings(layer=default_layer(self.processor.table))
        if unit_view is not None:
            self.default_settings = replace(self.default_settings, filter=READABLE.filter, percentile=READABLE.percentile)
        self.max_sessions = max_sessions
        self.max_events = max_events
        #: the one lock of the engine and its sessions (see :mod:`deepvis.server.session`)
        self._cond = threading.Condition()
        self._sessions: dict[str, Session] = {}
        self._rr = 0
        self._rate = _Rate()
        self.frames_done = 0
        self._frames: WorkLoop[FrameJob] = WorkLoop("deepvis-frames", self._cond, self._pick, self._run_frame, self._frame_failed)
        # a settings change that the current frame's forward pass can answer (another unit, scaling,
        # position) is shown by this worker at once, while the frame loop may be in a forward pass
        self.redraws = LatestJobs("deepvis-redraw", self._cond, {"frame": self._run_redraw})
        self._unit_view = unit_view
        self._geometry = geometry
        # each worker runs on its own copy of the network, copied now, before any thread runs (a copy
        # taken during a capture would carry its hooks)
        self.unit_views: LatestJobs | None = None
        self.geometry: LatestJobs | None = None
        self._worker_model: Model | None = None
        self._geometry_model: Model | None = None
        if unit_view is not None:
            self.unit_views = LatestJobs("deepvis-unit-views", self._cond, {"backprop": self._run_unit_view}, nice=UNIT_VIEW_NICE)
            self._worker_model = replica(model)
        if geometry is not None:
            # measuring a layer's receptive fields takes seconds, once per layer: not in the unit-view worker
            self.geometry = LatestJobs("deepvis-geometry", self._cond, {"rf": self._run_geometry})
            self._geometry_model = replica(model)

    # -- lifecycle --------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the frame loop and the background workers (idempotent)."""
        self._frames.start()
        self.redraws.start()
        for worker in (self.unit_views, self.geometry):
            if worker is not None:
                worker.start()

    def close(self, timeout: float = 10.0) -> None:
        """Stop every thread (waits for the current frame to finish)."""
        for s in self.sessions():
            s.close()
        self._frames.close(timeout)
        self.redraws.close(timeout)
        for worker in (self.unit_views, self.geometry):
            if worker is not None:
                worker.close(timeout)

    @property
    def backprop_available(self) -> bool:
        """True when this engine computes the backprop view (the server was not started with it off)."""
        return self._unit_view is not None

    # -- pages (called from the event loop) -------------------------------------------------------
    def open_session(self, loop: asyncio.AbstractEventLoop) -> Session:
        """Register a new page; raises :class:`TooManySessions` past ``max_sessions``."""
        with self._cond:
            if len(self._sessions) >= self.max_sessions:
                raise TooManySessions(f"the server already serves {self.max_sessions} pages; close one and reload")
            sid = secrets.token_hex(8)
            s = Session(sid, loop, self.default_settings, self._cond, max_events=self.max_events)
            self._sessions[sid] = s
            return s

    def session(self, sid: str) -> Session | None:
        with self._cond:
            return self._sessions.get(sid)

    def close_session(self, session: Session) -> None:
        """Forget a page; work in progress for it is discarded when it finishes."""
        with self._cond:
            session.close()
            self._sessions.pop(session.id, None)
        for worker in (self.unit_views, self.geometry, self.redraws):
            if worker is not None:
                worker.drop(session)

    def sessions(self) -> list[Session]:
        with self._cond:
            return list(self._sessions.values())

    def submit_frame(self, session: Session, frame: RawFrame | Frame) -> None:
        """Make ``frame`` the page's newest input; a frame still waiting is dropped (and counted)."""
        session.submit(frame)

    def update_settings(self, session: Session, data: Mapping[str, Any], filters: tuple[str, ...]) -> ViewSettings:
        """Apply a ``settings`` message (validated against the model); the current frame is redrawn with them."""
        old = session.settings
        new = ViewSettings.parse(data, old, filters)
        if new.layer != old.layer and "unit" not in data:
            new = replace(new, unit=0, position=None)
        self.processor.check(new)
        if new.backprop != "off" and self._unit_view is None:
            raise DeepvisError("the backprop view is off on this server (deepvis serve --no-backprop)")
        session.change_settings(new)
        self.redraws.submit(session, "frame", None)  # shown from the current frame's pass when it can be
        return new

    def summary_message(self, session: Session, layer: str) -> str:
        """The page's ``summary`` message for ``layer``: the stored numbers when there are some, else its live statistics."""
        stored = self.summaries.get(layer) if self.summaries is not None else None
        return text("summary", **(stored if stored is not None else session.summary.fields(layer)))

    def send_summary(self, session: Session, *, reset: bool = False) -> None:
        """Send the page its summary of the selected layer (``reset``: forget its live statistics first).
        Called from the event loop's thread pool, outside the frame loop."""
        if reset:
            session.summary.reset()
        session.put_latest("summary", self.summary_message(session, session.settings.layer))

    def post_event(self, session: Session, msg: Message) -> None:
        """Queue an event message for a page (thread-safe)."""
        session.put_event(msg)

    def post_latest(self, session: Session, kind: str, msg: Message) -> None:
        """Make ``msg`` the page's newest ``kind`` message (thread-safe)."""
        session.put_latest(kind, msg)

    def take(self, session: Session) -> list[Message]:
        """Everything waiting for the page (its sender calls this); frees its slots for new results."""
        return session.take()

    def status(self) -> dict[str, Any]:
        """Engine-wide figures: pages, frames processed, current frames per second."""
        with self._cond:
            return {
                "sessions": len(self._sessions),
                "frames": self.frames_done,
                "fps": round(self._rate.rate(time.monotonic()), 2),
                "unit_views": self.unit_views.done if self.unit_views else 0,
            }

    # -- the frame loop ---------------------------------------------------------------------------
    def _pick(self) -> FrameJob | None:
        ids = list(self._sessions)
        n = len(ids)
        for i in range(n):
            s = self._sessions[ids[(self._rr + i) % n]]
            work = s.next_frame()
            if work is not None:
                self._rr = (self._rr + i + 1) % max(1, n)
                return s, *work
        return None

    def _run_frame(self, job: FrameJob) -> None:
        session, frame, settings, gen = job
        start = time.perf_counter()
        started = time.monotonic()
        if isinstance(frame, RawFrame):
            image = frame_image(frame.pixels, frame.width, frame.height, frame.fmt, self.model)
            frame = Frame(image, frame.source, frame.seq, received=frame.received)
        if frame.x is None:
            frame.x = self.processor.to_input(frame.image)
        # the first frame of a newly selected layer stops at that layer (its predictions come with the
        # next), unless the last pass captured it as a neighbour (then the page has been shown it)
        cur = session.current
        first_of_layer = cur is not None and cur.activations is not None and cur.activations.of(settings.layer) is None
        near = self.processor.neighbours(settings.layer)
        try:
            # a forward pass for a layer the page has left meanwhile (for one the pass does not capture)
            # is abandoned between two blocks
            out = self.processor.process(
                frame.x,
                settings,
                session.diff,
                frame.activations,
                cancel=lambda: session.stale(settings, near),
                predictions=not first_of_layer,
            )
        except CaptureCancelled:
            session.requeue(frame)  # computed again at once, for the layer now shown
            return
        frame.activations = out.activations
        latest, latest_gen = session.settings_gen()
        if latest_gen != gen and self.processor.redrawable(frame.activations, latest):
            # another unit (or scaling) was chosen during the pass: shown from it, not one frame later
            out = self.processor.process(frame.x, latest, None, frame.activations)
            settings, gen = latest, latest_gen
        msg = self._message(session, frame, out, started)
        with self._cond:
            self.frames_done += 1
            self._rate.tick(time.monotonic())
        if not session.frame_done(frame, settings, gen, msg, (time.perf_counter() - start) * 1000):
            return
        self._summarize(session, frame, settings.layer)
        if self.unit_views is not None and settings.backprop != "off":
            self.unit_views.submit(session, "backprop", (frame.x, settings, frame.seq))
        if self.geometry is not None and session.ask_geometry(settings.layer):
            self.geometry.submit(session, "rf", settings.layer)

    def _run_redraw(self, session: Session, _job: object) -> Message | None:
        """Show the page its current frame with its new settings, from that frame's forward pass (no
        new one), when that pass can give them (:meth:`FrameProcessor.redrawable`); posts it itself."""
        target = session.redraw_target()
        if target is None:
            return None
        frame, settings, gen, order = target
        if frame.x is None or not self.processor.redrawable(frame.activations, settings):
            return None  # the frame loop computes it (a new layer needs a forward pass)
        started = time.monotonic()
        out = self.processor.process(frame.x, settings, None, frame.activations)
        posted = session.post_redraw(gen, order, self._message(session, frame, out, started))
        if posted and self.unit_views is not None and settings.backprop != "off":
            self.unit_views.submit(session, "backprop", (frame.x, settings, frame.seq))
        return None

    def _summarize(self, session: Session, frame: Frame, layer: str) -> None:
        """Count the frame in the page's live statistics of ``layer`` (once per frame; not for a layer
        with stored numbers). The page asks for the summary itself (:meth:`send_summary`)."""
        stored = self.summaries is not None and self.summaries.get(layer) is not None
        if not stored and frame.activations is not None and frame.activations.layer == layer:
            session.summary.update(frame, layer, frame.activations.acts)

    def _frame_failed(self, job: FrameJob, exc: Exception) -> None:
        session, frame, _, _ = job
        session.frame_failed(frame.seq, error_message(exc, "the frame loop"))

    def _message(self, session: Session, frame: Frame, out: FrameOutput, started: float) -> bytes:
        """The page's ``frame`` message for ``out``, a view of ``frame`` begun at ``started`` (monotonic seconds)."""
        header = out.header
        header.update(
            seq=frame.seq,
            source=frame.source,
            ms=round((time.monotonic() - started) * 1000, 2),
            wait_ms=round((started - frame.received) * 1000, 2),
        )
        with self._cond:
            server_fps = round(self._rate.rate(time.monotonic()), 2)
        header["stats"] = {**session.stats_dict(), "server_fps": server_fps}
        return pack(header, out.blobs)

    # -- background work ------------------------------------------------------------------------
    def _run_unit_view(self, session: Session, job: tuple[torch.Tensor, ViewSettings, int | None]) -> Message | None:
        x, settings, seq = job
        assert self._unit_view is not None and self._worker_model is not None
        start = time.perf_counter()
        try:
            header, blobs = self._unit_view(self._worker_model, x, settings)
        except DeepvisError:
            # e.g. deconv on a model whose nonlinearities it does not cover: turn the view off rather
            # than failing again on every frame; the page shows the error and the new setting
            session.backprop_failed(settings.backprop)
            raise
        header = {
            "type": "backprop",
            "layer": settings.layer,
            "unit": settings.unit,
            "position": list(settings.position) if settings.position else None,
            "token": settings.token,
            "mode": settings.backprop,
            "filter": settings.filter,
            "percentile": settings.percentile,
            "seq": seq,
            "ms": round((time.perf_counter() - start) * 1000, 2),
            **header,
        }
        return pack(header, blobs)

    def _run_geometry(self, session: Session, layer: str) -> Message | None:
        assert self._geometry is not None and self._geometry_model is not None
        if not self.processor.layer(layer).spatial:
            return None
        return text("rf", **self._geometry(self._geometry_model, layer))
