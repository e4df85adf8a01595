"""``deepvis.toolbox(model)``: the live toolbox (``deepvis serve``) on the in-memory model, in a cell.

The same app as ``deepvis serve`` (:func:`deepvis.server.create_app`) runs under uvicorn in a background
thread, on a free port of 127.0.0.1 (or ``port=``). The page is shown in an iframe. The security of
``deepvis serve`` stays: the launch token, the Host and Origin checks; the one change is framing, which is
allowed for the notebook's own origin only (CSP ``frame-ancestors``; every other page still cannot frame
it, and a WebSocket from another origin is refused). The model object is shared with the kernel (not
copied to disk); when the toolbox stops, its threads end and the model's hooks are gone (the server's
tools remove theirs after every call).

One toolbox runs per kernel by default: starting another (re-running the cell) stops the previous one.
"""

from __future__ import annotations

import html
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch.nn as nn

from ..errors import DeepvisError
from ..models import Model, Preprocessing
from ..server import ServerConfig, create_app
from ..server.listen import listen, uvicorn_server
from ..server.security import frame_ancestors
from .look import as_model

__all__ = ["NotebookToolbox", "toolbox", "notebook_origins"]

#: how long :func:`toolbox` waits for the server to listen, and :meth:`NotebookToolbox.stop` for it to end (s)
_START_TIMEOUT = 120.0
_STOP_TIMEOUT = 30.0


def _origins_of(url: str) -> list[str]:
    """The origins a browser may use for a Jupyter server at ``url`` (a local one: localhost and 127.0.0.1)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return []
    port = f":{parts.port}" if parts.port else ""
    hosts = [parts.hostname]
    if parts.hostname in ("localhost", "127.0.0.1", "0.0.0.0", "::", "::1"):
        hosts = ["localhost", "127.0.0.1"]
    return [f"{parts.scheme}://{h}{port}" for h in hosts]


def notebook_origins() -> tuple[str, ...]:
    """The origins of the Jupyter servers running on this machine, as a browser on it sees them.

    ``DEEPVIS_NOTEBOOK_ORIGIN`` (space-separated origins) wins; otherwise the ``url`` of every Jupyter
    server's runtime file (``jpserver-*.json``, ``nbserver-*.json`` in Jupyter's runtime folder). Empty
    when none is found (then no page may frame the toolbox: pass ``origin=``).
    """
    env = os.environ.get("DEEPVIS_NOTEBOOK_ORIGIN", "").split()
    if env:
        return tuple(env)
    try:
        from jupyter_core.paths import jupyter_runtime_dir  # comes with a Jupyter kernel: optional, lazy
    except ImportError:
        return ()
    found: list[str] = []
    for f in sorted(Path(jupyter_runtime_dir()).glob("*server-*.json")):
        try:
            url = json.loads(f.read_text()).get("url", "")
        except (OSError, ValueError):
            continue
        found += [o for o in _origins_of(str(url)) if o not in found]
    return tuple(found)


class _Running:
    """The registry of toolboxes started in this process (so that re-running a cell replaces the old one)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current: NotebookToolbox | None = None

    def replace(self, new: NotebookToolbox | None) -> NotebookToolbox | None:
        with self._lock:
            old, self._current = self._current, new
        return old

    def forget(self, tb: NotebookToolbox) -> None:
        with self._lock:
            if self._current is tb:
                self._current = None


_RUNNING = _Running()


class NotebookToolbox:
    """A running toolbox: ``url`` (with the token), ``port``, ``model``; :meth:`stop` ends it.

    Shown in a cell as the page in an iframe (when the notebook's origin may frame it) or as a link.
    """

    def __init__(self, model: Model, config: ServerConfig, sock: socket.socket, height: int) -> None:
        self.model = model
        self.height = height
        self.origins = config.frame_origins
        self._sock = sock
        self.port: int = sock.getsockname()[1]
        self.app = create_app(config)
        self.token: str = self.app.state.toolbox.token
        self.url = f"http://127.0.0.1:{self.port}/?token={self.token}"
        self._server = uvicorn_server(self.app)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"deepvis-toolbox-{self.port}", daemon=True
        )
        self._display: Any = None
        self.stopped = False

    def _start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._server.started:  # uvicorn sets it once it listens; the thread ends on a failure
            if not self._thread.is_alive():
                self._sock.close()
                raise DeepvisError("the toolbox server stopped before it was ready (see the log above)")
            if time.monotonic() > deadline:
                self.stop()
                raise DeepvisError(f"the toolbox server did not start within {_START_TIMEOUT:.0f} s")
            time.sleep(0.02)

    @property
    def running(self) -> bool:
        return not self.stopped and self._thread.is_alive()

    def stop(self) -> NotebookToolbox:
        """End the server (its threads and the page's connection), free the port, and say so in the cell
        that showed the toolbox. The model is left as found (no hooks). Returns self (shows "stopped")."""
        if not self.stopped:
            self.stopped = True
            self._server.should_exit = True
            if self._thread.is_alive():
                self._thread.join(_STOP_TIMEOUT)
            self._sock.close()
            _RUNNING.forget(self)
            if self._display is not None:
                self._display.update(_Frame(self))
        return self

    def __repr__(self) -> str:
        return f"<deepvis toolbox {'stopped' if self.stopped else 'running at ' + self.url} on {self.model.name}>"

    def frame_html(self) -> str:
        """The page in an iframe (a link when no notebook origin may frame it), or "stopped"."""
        if self.stopped:
            return f"<div class='deepvis-toolbox'>deepvis toolbox on port {self.port} stopped ({html.escape(self.model.name)}).</div>"
        link = f"<a href='{html.escape(self.url)}' target='_blank'>{html.escape(self.url)}</a>"
        if not self.origins:
            return (
                f"<div class='deepvis-toolbox'>deepvis toolbox running at {link}. It is not framed here: the notebook's origin is "
                "unknown (pass <code>origin='http://localhost:8888'</code>, as your browser shows it).</div>"
            )
        frame = f"<iframe src='{html.escape(self.url)}' allow='camera' style='width:100%;height:{int(self.height)}px;border:1px solid #ccc'></iframe>"
        return f"<div class='deepvis-toolbox'>{frame}<div>deepvis toolbox: {link} (<code>.stop()</code> ends it)</div></div>"

    def _repr_html_(self) -> str:
        """IPython's display protocol: :meth:`frame_html`, or one status line when :func:`toolbox` has shown
        the frame already (so that a cell ending with ``deepvis.toolbox(model)`` does not open the page twice)."""
        if self._display is None or self.stopped:
            return self.frame_html()
        return f"<div class='deepvis-toolbox'>deepvis toolbox running at <a href='{html.escape(self.url)}' target='_blank'>port {self.port}</a>.</div>"


class _Frame:
    """What :func:`toolbox` displays (and :meth:`NotebookToolbox.stop` updates): the toolbox's frame."""

    def __init__(self, tb: NotebookToolbox) -> None:
        self.tb = tb

    def _repr_html_(self) -> str:
        return self.tb.frame_html()

    def __repr__(self) -> str:
        return repr(self.tb)


def _show(tb: NotebookToolbox) -> None:
    """Display ``tb``'s frame with an updatable display id when running in IPython (so :meth:`stop` can say so there)."""
    if "IPython" not in sys.modules:
        return
    from IPython import get_ipython  # already imported by the kernel: not a new dependency
    from IPython.display import display

    if get_ipython() is not None:
        tb._display = display(_Frame(tb), display_id=True)


def toolbox(
    model: Model | nn.Module | str = "default",
    *,
    origin: str | tuple[str, ...] | None = None,
    port: int = 0,
    height: int = 820,
    replace: bool = True,
    preprocessing: Preprocessing | None = None,
    **settings: Any,
) -> NotebookToolbox:
    """Start the live toolbox on ``model`` in a background thread and show it in the cell.

    Args:
        model: a ``Model``, an ``nn.Module`` (shared, not copied) or a spec string (see :func:`~deepvis.notebook.as_model`).
        origin: the notebook's origin as the browser shows it (``"http://localhost:8888"``), or several;
            None: :func:`notebook_origins`. Only these may frame the page.
        port: 127.0.0.1's port to listen on (0: a free one; fix it to forward it from a remote machine).
        height: the iframe's height in CSS pixels.
        replace: stop the toolbox this kernel started before (re-running the cell replaces it).
        preprocessing: for an ``nn.Module`` (see :func:`~deepvis.notebook.as_model`).
        settings: more :class:`~deepvis.server.ServerConfig` fields (``atlas=``, ``report=``, ``synthesis_steps=``, ...).

    Returns:
        The running :class:`NotebookToolbox` (``.url``, ``.stop()``).
    """
    m = as_model(model, preprocessing)
    origins = (origin,) if isinstance(origin, str) else tuple(origin) if origin is not None else notebook_origins()
    frame_ancestors(origins)  # a bad origin fails here, before anything starts
    if replace:
        old = _RUNNING.replace(None)
        if old is not None:
            old.stop()
    sock = listen("127.0.0.1", port, option="port")
    try:
        config = ServerConfig(model=m, host="127.0.0.1", port=sock.getsockname()[1], frame_origins=origins, **settings)
        tb = NotebookToolbox(m, config, sock, height)
    except BaseException:
        sock.close()
        raise
    tb._start()
    _RUNNING.replace(tb)
    _show(tb)
    return tb
