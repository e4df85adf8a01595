"""One connected page: its newest unprocessed frame, its settings and its bounded outbox.

A :class:`Session`'s mutable fields are guarded by the engine's condition lock; the page's WebSocket
task only touches them through :class:`~deepvis.server.engine.Engine` methods. Memory per session is
bounded whatever the page does: one pending frame, one current frame, the newest message of each
live kind (``frame``, ``backprop``, ``input``) and at most ``max_events`` small event messages.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from .frames import DiffState
from .protocol import ViewSettings
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
    """State of one page (see module docstring)."""

    def __init__(self, sid: str, loop: asyncio.AbstractEventLoop, settings: ViewSettings, *, max_events: int = 64) -> None:
        self.id = sid
        self.loop = loop
        self.wake = asyncio.Event()
        self.settings = settings
        self.pending: RawFrame | Frame | None = None
        self.current: Frame | None = None
        self.dirty = False
        self.closed = False
        self.latest: dict[str, Message] = {}
        self.events: deque[Message] = deque()
        self.max_events = max_events
        self.diff = DiffState()
        self.stats = SessionStats()
        #: layers whose receptive-field geometry has been asked for (touched by the frame loop only)
        self.geometry_sent: set[str] = set()
        #: a video decoded by the server for this page (touched by the event loop only)
        self.video: ServerVideo | None = None

    # All methods below are called with the engine's lock held.
    def put_latest(self, kind: str, msg: Message) -> None:
        """Keep only the newest message of ``kind``; an unsent older one is replaced (and counted)."""
        if kind in self.latest:
            self.stats.results_replaced += 1
        self.latest[kind] = msg
        self._notify()

    def put_event(self, msg: Message) -> None:
        """Queue a small event message; past ``max_events`` unsent, the oldest is dropped (and counted)."""
        if len(self.events) >= self.max_events:
            self.events.popleft()
            self.stats.events_dropped += 1
        self.events.append(msg)
        self._notify()

    def take(self) -> list[Message]:
        """Everything waiting to be sent: events first (in order), then the newest live messages."""
        out: list[Message] = list(self.events)
        self.events.clear()
        out.extend(self.latest.values())
        self.latest.clear()
        return out

    def _notify(self) -> None:
        if self.closed:
            return
        try:
            self.loop.call_soon_threadsafe(self.wake.set)
        except RuntimeError:  # the event loop is closed: the page is gone
            self.closed = True
