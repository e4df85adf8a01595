"""Where the toolbox listens: its listening socket and the uvicorn server over it.

One home for ``deepvis serve``, the notebook's toolbox (:mod:`deepvis.notebook.live`) and the tests.
Two settings matter for the live page's latency and CPU:

* the socket is made with ``IPPROTO_TCP`` as its protocol, so that asyncio sets ``TCP_NODELAY`` on
  every connection it accepts (it does so only for sockets whose ``proto`` says TCP, and a socket made
  with the default ``proto=0`` hands that 0 to its connections). Without it Nagle's algorithm held a
  small message (a redrawn unit map, a settings answer) that followed a large frame result until the
  browser's delayed acknowledgement came: 30-90 ms on every unit switch;
* WebSocket per-message compression is off: the page's messages are pixels and uint8 maps that
  compress little, and deflating each 100-150 KB message (and inflating it on the other side) cost the
  server and the browser's network process CPU on every frame.
"""

from __future__ import annotations

import copy
import logging
import re
import socket
from typing import Any

__all__ = ["listen", "uvicorn_server", "WS_MAX_SIZE", "HideToken"]

#: the largest WebSocket message the server accepts (a camera frame is 224 x 224 x 3 bytes)
WS_MAX_SIZE = 8 * 2**20


def listen(host: str, port: int, *, option: str = "the port") -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: a free one), or a one-line :class:`DeepvisError`
    that names the port as the caller's user sets it (``option``, e.g. ``--port``)."""
    from ..errors import DeepvisError

    if not 0 <= port <= 65535:
        raise DeepvisError(f"{option} must be between 0 and 65535, not {port}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except socket.gaierror as exc:
        raise DeepvisError(f"cannot listen on {host!r}: {exc.strerror}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the port of a stopped toolbox can be used again at once
    try:
        sock.bind(addr)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        taken = f"; choose another {option} (0 picks a free one)" if exc.errno in (98, 48) else ""
        raise DeepvisError(f"cannot listen on {host}:{port}: {exc.strerror}{taken}") from None
    sock.set_inheritable(True)
    return sock


def uvicorn_server(app: Any, *, log_level: str = "warning") -> Any:
    """The uvicorn ``Server`` that serves ``app`` (run it with ``sockets=[listen(...)]``): the app's
    lifespan on, WebSocket messages up to :data:`WS_MAX_SIZE`, no per-message compression, and a ping
    every 20 s (a page that stops answering for 20 s more is closed)."""
    import uvicorn
    from uvicorn.config import LOGGING_CONFIG

    log_config = copy.deepcopy(LOGGING_CONFIG)  # uvicorn's own, with the launch token hidden in the access log
    log_config.setdefault("filters", {})["hide_token"] = {"()": f"{__name__}.HideToken"}
    log_config["handlers"]["access"]["filters"] = ["hide_token"]
    config = uvicorn.Config(
        app,
        log_level=log_level,
        log_config=log_config,
        lifespan="on",
        ws_max_size=WS_MAX_SIZE,
        ws_per_message_deflate=False,
        ws_ping_interval=20.0,
        ws_ping_timeout=20.0,
    )
    return uvicorn.Server(config)


_TOKEN = re.compile(r"(\btoken=)[^&\s\"]+")


class HideToken(logging.Filter):
    """Writes ``token=…`` for the launch token in the access log's request lines (``--log-level info``):
    a log file or a shared terminal must not hand out what lets anyone drive the toolbox."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(_TOKEN.sub(r"\1…", a) if isinstance(a, str) else a for a in record.args)
        return True
