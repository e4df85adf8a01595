"""A bare Chromium driven over the DevTools protocol, for measuring what the page itself costs.

Playwright attaches to every page it drives and enables DevTools' network domain, which reports every
WebSocket message to it: on the live page (a 150 KB frame up and a result down, 20-30 times a
second) that instrumentation cost the browser about 150 ms of CPU per second, as much as the page's
own drawing (docs/server.md). A user's browser has no such attachment. This driver starts the same
Chromium (the binary, flags and window of ``tests/chromium.py``, plus the timer and renderer flags
Playwright adds, so that neither side is throttled differently) and speaks the protocol directly,
using only ``Runtime.evaluate`` (no domain is enabled, so the browser sends nothing unasked),
``Input.dispatchKeyEvent`` / ``Input.dispatchMouseEvent`` and ``Page.navigate``.

:class:`BarePage` has the few page methods ``bench_live`` uses, with Playwright's meanings:
``evaluate``, ``click``, ``keyboard.press`` and ``wait_for_timeout``.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from websockets.sync.client import ClientConnection, connect

from chromium import CHROMIUM, VIEWPORT, chromium_flags

__all__ = ["BarePage", "bare_chromium", "UNTHROTTLED"]

#: the flags of Playwright's launch that change how a page is scheduled (the rest only silence
#: background traffic, which chromium_flags already does)
UNTHROTTLED = [
    "--disable-background-timer-throttling",
    "--disable-backgrounding-occluded-windows",
    "--disable-renderer-backgrounding",
    "--disable-ipc-flooding-protection",
    "--disable-hang-monitor",
    "--disable-field-trial-config",
    "--disable-extensions",
    "--disable-breakpad",
    "--disable-dev-shm-usage",
    "--force-color-profile=srgb",
    "--hide-scrollbars",
    "--mute-audio",
]


class _Keyboard:
    def __init__(self, page: BarePage) -> None:
        self._page = page

    def press(self, key: str) -> None:
        """A key press (down, then up) of one printable character, as a user's keyboard sends it."""
        if len(key) != 1:
            raise ValueError(f"only single characters are sent, not {key!r}")
        code = f"Key{key.upper()}" if key.isalpha() else f"Digit{key}" if key.isdigit() else ""
        common = {"key": key, "code": code, "windowsVirtualKeyCode": ord(key.upper())}
        self._page.send("Input.dispatchKeyEvent", type="keyDown", text=key, **common)
        self._page.send("Input.dispatchKeyEvent", type="keyUp", **common)


class BarePage:
    """One page of a bare Chromium, over its DevTools WebSocket (see the module docstring)."""

    def __init__(self, ws: ClientConnection) -> None:
        self._ws, self._id = ws, 0
        self.keyboard = _Keyboard(self)

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (an error reply raises RuntimeError)."""
        self._id += 1
        self._ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            reply = json.loads(self._ws.recv())
            if reply.get("id") == self._id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply["result"]

    def evaluate(self, expression: str, arg: Any = None) -> Any:
        """The value of a JavaScript expression in the page (promises awaited); with ``arg``, the
        expression is a function called with it (JSON), as Playwright's ``page.evaluate(fn, arg)``."""
        if arg is not None:
            expression = f"({expression})({json.dumps(arg)})"
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise RuntimeError(f"page error: {details.get('exception', {}).get('description') or details.get('text')}")
        return result["result"].get("value")

    def goto(self, url: str, timeout: float = 30.0) -> None:
        """Open ``url`` and return once its document has loaded."""
        self.send("Page.navigate", url=url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(RuntimeError):  # the old document's context is gone mid-navigation
                if self.evaluate("location.href !== 'about:blank' && document.readyState === 'complete'"):
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{url} did not load within {timeout:.0f} s")

    def click(self, selector: str) -> None:
        """A left click at the middle of the element ``selector`` selects (as a user's mouse sends it)."""
        box = self.evaluate(
            "(s) => { const r = document.querySelector(s).getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; }",
            selector,
        )
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def wait_for_timeout(self, ms: float) -> None:
        time.sleep(ms / 1000)


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout: float = 30.0) -> int:
    """The port Chromium chose (``--remote-debugging-port=0``), from the file it writes into its profile."""
    deadline = time.monotonic() + timeout
    marker = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"Chromium ({CHROMIUM}) exited with status {proc.returncode} at start")
        with contextlib.suppress(FileNotFoundError, ValueError, IndexError):
            return int(marker.read_text().split()[0])
        time.sleep(0.05)
    raise RuntimeError("Chromium did not open its DevTools port")


@contextlib.contextmanager
def bare_chromium(profile: str | Path, *, camera_fps: int | None = None) -> Iterator[BarePage]:
    """A bare headless Chromium (own profile folder, fake camera at ``camera_fps``) and its one page,
    laid out at :data:`VIEWPORT` like Playwright's pages; the browser is stopped after the block."""
    profile = Path(profile)
    cmd = [CHROMIUM, *chromium_flags(camera_fps), *UNTHROTTLED, f"--user-data-dir={profile}", "--remote-debugging-port=0"]
    size = f"--window-size={VIEWPORT['width']},{VIEWPORT['height']}"
    proc = subprocess.Popen([*cmd, size, "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = _devtools_port(profile, proc)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            target = next(t for t in json.load(r) if t["type"] == "page")
        with connect(target["webSocketDebuggerUrl"], max_size=None) as ws:
            page = BarePage(ws)
            page.send(
                "Emulation.setDeviceMetricsOverride", width=VIEWPORT["width"], height=VIEWPORT["height"], deviceScaleFactor=1, mobile=False
            )
            page.send("Emulation.setFocusEmulationEnabled", enabled=True)  # the page has the keyboard's focus, as under Playwright
            yield page
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
