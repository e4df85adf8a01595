"""Helpers for the server and browser tests: a tiny model, a live server in a thread, message helpers.

(No tests here; the module name keeps it with the server tests.)
"""

from __future__ import annotations

import io
import json
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from PIL import Image
from torch import nn

from deepvis.models import Model, Preprocessing
from deepvis.server.protocol import pack, unpack

TOKEN = "t" * 40


def tiny_model(size: int = 32) -> Model:
    """A small ReLU convnet with known layer names: conv1 (8 maps), conv2 (16 maps at half size), fc (10 classes)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3, padding=1),
            relu1=nn.ReLU(),
            conv2=nn.Conv2d(8, 16, 3, stride=2, padding=1),
            relu2=nn.ReLU(),
            pool=nn.AdaptiveAvgPool2d(1),
            flat=nn.Flatten(),
            fc=nn.Linear(16, 10),
        )
    ).eval()
    pre = Preprocessing(input_size=(size, size), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    return Model(net, pre, name="tiny", class_names=[f"class {i}" for i in range(10)])


def frame_message(seq: int, w: int, h: int, *, seed: int = 0, source: str = "camera") -> bytes:
    """A binary frame message with random RGBA pixels."""
    px = np.random.default_rng(seed).integers(0, 255, (h, w, 4), dtype=np.uint8)
    return pack({"type": "frame", "seq": seq, "w": w, "h": h, "format": "rgba", "source": source}, {"px": px.tobytes()})


def receive_until(ws, predicate, limit: int = 50) -> tuple[Any, list[Any]]:
    """Read messages from a TestClient WebSocket until ``predicate(msg)``; returns (that message, all seen).

    Text messages are parsed to dicts; binary ones to (header, payload).
    """
    seen = []
    for _ in range(limit):
        m = ws.receive()
        if m.get("type") == "websocket.close":
            raise AssertionError(f"socket closed while waiting; seen {seen}")
        msg = json.loads(m["text"]) if m.get("text") is not None else unpack(m["bytes"])
        seen.append(msg)
        if predicate(msg):
            return msg, seen
    raise AssertionError(f"no matching message in {limit}: {[s if isinstance(s, dict) else s[0] for s in seen]}")


def is_frame(msg: Any) -> bool:
    return isinstance(msg, tuple) and msg[0].get("type") == "frame"


def is_type(kind: str):
    return lambda msg: (isinstance(msg, dict) and msg.get("type") == kind) or (isinstance(msg, tuple) and msg[0].get("type") == kind)


class LiveServer:
    """Run an app with uvicorn on a free port in a thread; ready once ``/api/health`` answers (polled)."""

    def __init__(self, app, token: str) -> None:
        from deepvis.server.listen import listen, uvicorn_server

        self.app = app
        self.token = token
        self.sock = listen("127.0.0.1", 0)
        self.port = self.sock.getsockname()[1]
        self.base = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn_server(app)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def url(self, path: str = "/", **query: str) -> str:
        q = "&".join(f"{k}={v}" for k, v in {"token": self.token, **query}.items())
        return f"{self.base}{path}?{q}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread stopped before it was ready")
            try:
                if httpx.get(self.url("/api/health"), timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the server did not become ready within 120 s")

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(60)
        self.sock.close()


def write_photos(root: Path) -> Path:
    """12 random photos (48x40) in ``root`` and two unreadable files (``broken.jpg``, ``truncated.png``)."""
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"photo{i:02d}.png")
    (root / "broken.jpg").write_bytes(b"this is not a JPEG")
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), (9, 9, 9)).save(buf, format="PNG")
    (root / "truncated.png").write_bytes(buf.getvalue()[:40])
    return root
