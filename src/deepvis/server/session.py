"""One connected page: its newest unprocessed frame, its settings and its bounded outbox.

A :class:`Session` owns its state: every field is private and every method takes the lock. The lock
is one :class:`threading.Condition` shared by all the sessions of an engine (the engine creates it
and passes it in), so that the frame loop and the background workers can wait for work on any page
and are woken when a page's frame arrives or its results are taken. The lock is held only for a few
field updates, never while computing. Memory per session is bounded whatever the page does: one
pending frame, one current frame, the newest message of each live kind (``frame``, ``backprop``,
``input``) and at most ``max_events`` small event messages.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from PIL import Image

from .frames import DiffState, LayerActivations
from .protocol import ViewSettings, text
from .summary import LiveSummary
from .video import ServerVideo

__all__ = ["Session", "Frame", "RawFrame", "SessionStats", "Message"]

#: a message for the page: text (JSON) or binary
Message = str | bytes


@dataclass
class RawFrame:
    """A frame as received from the page (converted to an image in the frame loop, not in the event loop)."""

    seq: int
    width: int
    height: int
    fmt: str
    pixels: memoryview
    source: str
    received: float = field(default_factory=time.monotonic)


@dataclass
class Frame:
    """An input image at the model's input size, with the model input computed from it (cached)."""

    image: Image.Image
    source: str
    seq: int | None = None
    name: str | None = None
    received: float = field(default_factory=time.monotonic)
    x: torch.Tensor | None = None
    #: its last forward pass (the frame loop's), to redraw another unit of the same layer from
    activations: LayerActivations | None = None


@dataclass
class SessionStats:
    """Counters shown in the page: frames received, processed, dropped as stale, results replaced unsent."""

    received: int = 0
    processed: int = 0
    dropped: int = 0
    results_replaced: int = 0
    events_dropped: int = 0
    errors: int = 0
    last_ms: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "received": self.received,
            "processed": self.processed,
            "dropped": self.dropped,
            "results_replaced": self.results_replaced,
            "events_dropped": self.events_dropped,
            "errors": self.errors,
            "last_ms": round(self.last_ms, 2),
        }


class Session:
    """State of one page (see the module docstring).

    ``cond`` is the engine's condition, shared by its sessions; ``loop`` is the event loop of the
    page's WebSocket, whose sender task waits on :attr:`wake`.
    """

    def __init__(
        self, sid: str, loop: asyncio.AbstractEventLoop, settings: ViewSettings, cond: threading.Condition, *, max_events: int = 64
    ) -> None:
        self.id = sid
        self.loop = loop
        #: set (in the event loop) whenever a message waits for the page
        self.wake = asyncio.Event()
        self.max_events = max_events
        #: the running mean of the diff view; used by the frame loop only (one frame of a page at a time)
        self.diff = DiffState()
        #: the summary pane's running statistics of the selected layer (its own lock: see LiveSummary)
        self.summary = LiveSummary()
        self._cond = cond
        self._settings = settings
        self._pending: RawFrame | Frame | None = None
        self._current: Frame | None = None
        self._dirty = False
        #: the settings' generation (one more on every change), how many frames have become current,
        #: and the (generation, frame) of the last frame result posted: a result computed with older
        #: settings than one already shown is never posted after it (no flicker back on a switch)
        self._gen = 0
        self._order = 0
        self._posted = (-1, -1)
        self._closed = False
        self._latest: dict[str, Message] = {}
        self._events: deque[Message] = deque()
        self._stats = SessionStats()
        self._geometry_asked: set[str] = set()
        self._video: ServerVideo | None = None

    # -- what anyone may read (snapshots: changing them changes nothing) --------------------------
    @property
    def settings(self) -> ViewSettings:
        with self._cond:
            return self._settings

    def settings_gen(self) -> tuple[ViewSettings, int]:
        """The settings and their generation (one more on every change)."""
        with self._cond:
            return self._settings, self._gen

    def stale(self, settings: ViewSettings, also: Collection[str] = ()) -> bool:
        """True when a forward pass begun for ``settings`` is no longer wanted: the page has gone, or it
        now shows another layer (one not in ``also``, the other layers that pass captures), query or
        diff view (what no redraw from that pass could give)."""
        with self._cond:
            s = self._settings
            other_layer = s.layer != settings.layer and s.layer not in also
            return self._closed or other_layer or s.query != settings.query or s.diff != settings.diff

    @property
    def closed(self) -> bool:
        with self._cond:
            return self._closed

    @property
    def stats(self) -> SessionStats:
        """A copy of the page's counters."""
        with self._cond:
            return replace(self._stats)

    @property
    def pending(self) -> RawFrame | Frame | None:
        """The newest frame not yet taken by the frame loop."""
        with self._cond:
            return self._pending

    @property
    def latest(self) -> dict[str, Message]:
        """A copy of the newest unsent live message of each kind."""
        with self._cond:
            return dict(self._latest)

    @property
    def events(self) -> tuple[Message, ...]:
        """The unsent event messages, oldest first."""
        with self._cond:
            return tuple(self._events)

    @property
    def current(self) -> Frame | None:
        """The frame last shown to the page (as the frame loop preprocessed it), or None before the first."""
        with self._cond:
            return self._current

    @property
    def video(self) -> ServerVideo | None:
        """The video the server decoded for this page (None: none)."""
        with self._cond:
            return self._video

    def holds(self, kind: str) -> bool:
        """True while a ``kind`` result waits for the page's sender (no new one is computed meanwhile)."""
        with self._cond:
            return kind in self._latest

    # -- the page (event loop) --------------------------------------------------------------------
    def submit(self, frame: RawFrame | Frame) -> None:
        """Make ``frame`` the newest input; a frame still waiting is dropped (and counted)."""
        with self._cond:
            if self._closed:
                return
            self._stats.received += 1
            if self._pending is not None:
                self._stats.dropped += 1
            self._pending = frame
            self._cond.notify_all()

    def change_settings(self, new: ViewSettings) -> None:
        """Show ``new`` from now on; the current frame (or the one being computed) is redrawn with them."""
        with self._cond:
            if new != self._settings:
                self._settings = new
                self._gen += 1
                self._dirty = True
                self._cond.notify_all()

    def attach_video(self, video: ServerVideo) -> None:
        with self._cond:
            self._video = video

    def take(self) -> list[Message]:
        """Everything waiting to be sent: events first (in order), then the newest live messages.

        Taking frees the page's live slots, so the workers are woken to compute its next results.
        """
        with self._cond:
            out: list[Message] = list(self._events)
            self._events.clear()
            out.extend(self._latest.values())
            self._latest.clear()
            if out:
                self._cond.notify_all()
            return out

    def close(self) -> None:
        """The page is gone: drop its frames and messages; results still being computed are discarded."""
        with self._cond:
            self._closed = True
            self._pending = None
            self._current = None
            self._latest.clear()
            self._events.clear()
            self._cond.notify_all()

    # -- results (any thread) ---------------------------------------------------------------------
    def put_latest(self, kind: str, msg: Message) -> None:
        """Keep only the newest message of ``kind``; an unsent older one is replaced (and counted)."""
        with self._cond:
            if self._closed:
                return
            if kind in self._latest:
                self._stats.results_replaced += 1
            self._latest[kind] = msg
            self._notify()

    def put_event(self, msg: Message) -> None:
        """Queue a small event message; past ``max_events`` unsent, the oldest is dropped (and counted)."""
        with self._cond:
            if self._closed:
                return
            if len(self._events) >= self.max_events:
                self._events.popleft()
                self._stats.events_dropped += 1
            self._events.append(msg)
            self._notify()

    def backprop_failed(self, mode: str) -> None:
        """The backprop view ``mode`` cannot be computed for this model: turn it off (unless the page
        has chosen another mode meanwhile) and tell the page its new settings."""
        with self._cond:
            if self._settings.backprop == mode:
                self._settings = replace(self._settings, backprop="off")
                self._gen += 1
                self.put_event(text("settings", settings=self._settings.to_dict()))

    # -- the frame loop ---------------------------------------------------------------------------
    def next_frame(self) -> tuple[RawFrame | Frame, ViewSettings, int] | None:
        """The frame to compute next for this page, the settings to show it with and their generation, or None.

        None while the page's previous result has not been taken (a page that stops reading costs
        nothing), or when there is neither a new frame nor a settings change to redraw. A settings
        change that keeps the layer redraws the current frame first (from its cached forward pass:
        no new forward; the engine's redraw worker usually has shown it already, while this loop was busy).
        """
        with self._cond:
            if self._closed or "frame" in self._latest:
                return None
            cur = self._current
            if self._dirty and self._posted >= (self._gen, self._order):
                self._dirty = False  # the redraw worker has shown the current frame with these settings
            if self._dirty and cur is not None and cur.activations is not None and cur.activations.of(self._settings.layer) is not None:
                # another unit of the layer shown (or a layer that pass captured too): redrawn from it, before any new frame
                self._dirty = False
                return cur, self._settings, self._gen
            if self._pending is not None:
                frame: RawFrame | Frame = self._pending
                self._pending, self._dirty = None, False
            elif self._dirty and self._current is not None:
                frame, self._dirty = self._current, False
            else:
                return None
            return frame, self._settings, self._gen

    def requeue(self, frame: RawFrame | Frame) -> None:
        """A frame whose forward pass was abandoned (:meth:`stale`) is computed again with the new
        settings, unless a newer frame has arrived meanwhile (then it is dropped, and counted)."""
        with self._cond:
            if self._closed:
                return
            if self._pending is None:
                self._pending = frame
                self._cond.notify_all()
            else:
                self._stats.dropped += 1

    def frame_done(self, frame: Frame, settings: ViewSettings, gen: int, msg: Message, ms: float) -> bool:
        """Post the result of ``frame`` (computed with ``settings`` of generation ``gen`` in ``ms``
        milliseconds); it becomes the frame redrawn on a settings change. A result with older settings
        than one already posted is not posted (the frame is redrawn with the new ones instead). False
        when the page has gone meanwhile."""
        with self._cond:
            if self._closed:
                return False
            self._current = frame
            self._order += 1
            if gen != self._gen:  # changed while this frame was computed
                self._dirty = True
            self._stats.processed += 1
            self._stats.last_ms = ms
            if (gen, self._order) > self._posted:
                self._posted = (gen, self._order)
                self.put_latest("frame", msg)
            return True

    def redraw_target(self) -> tuple[Frame, ViewSettings, int, int] | None:
        """(the current frame, the settings, their generation, the frame's order) when the page has
        not yet been shown the current frame with the current settings; None otherwise."""
        with self._cond:
            cur = self._current
            if self._closed or cur is None or cur.activations is None or self._posted >= (self._gen, self._order):
                return None
            return cur, self._settings, self._gen, self._order

    def post_redraw(self, gen: int, order: int, msg: Message) -> bool:
        """Post a redraw of frame ``order`` with settings of generation ``gen`` (see :meth:`redraw_target`)
        unless something newer has been posted meanwhile; True when posted."""
        with self._cond:
            if self._closed or (gen, order) <= self._posted:
                return False
            self._posted = (gen, order)
            self.put_latest("frame", msg)
            return True

    def frame_failed(self, seq: int | None, message: str) -> None:
        """Count a frame that could not be computed and tell the page why."""
        with self._cond:
            self._stats.errors += 1
            self.put_event(text("error", scope="frame", seq=seq, message=message))

    def stats_dict(self) -> dict[str, Any]:
        with self._cond:
            return self._stats.to_dict()

    def ask_geometry(self, layer: str) -> bool:
        """True the first time ``layer``'s receptive fields are asked for (they are sent once per layer)."""
        with self._cond:
            if layer in self._geometry_asked:
                return False
            self._geometry_asked.add(layer)
            return True

    def _notify(self) -> None:
        """Wake the page's sender task (called with the lock held)."""
        try:
            self.loop.call_soon_threadsafe(self.wake.set)
        except RuntimeError:  # the event loop is closed: the page is gone
            self._closed = True
