"""How the browser tests and the live benchmark start Chromium: one place for the binary, flags and window.

Used by ``tests/test_browser.py`` (on the pytest path) and ``benchmarks/bench_live.py`` (which adds
this folder to its path). Debian's Chromium, headless, with Chromium's fake camera and no prompt for it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = ["CHROMIUM", "VIEWPORT", "chromium_flags", "launch", "browser_context", "watch_problems", "wait"]

#: Debian's Chromium (``apt-get install chromium``); the browser tests are skipped without it
CHROMIUM = "/usr/bin/chromium"
#: the window the page is laid out in (CSS pixels)
VIEWPORT = {"width": 1400, "height": 900}


def chromium_flags(camera_fps: int | None = None) -> list[str]:
    """Chromium's command-line flags: headless, no sandbox (containers), no background traffic, and a
    fake camera granted without a prompt, presenting ``camera_fps`` frames per second (None: its default)."""
    camera = "--use-fake-device-for-media-stream" + (f"=fps={camera_fps}" if camera_fps else "")
    return [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        camera,
        "--use-fake-ui-for-media-stream",
    ]


def launch(playwright: Any, profile: str | Path, *, camera_fps: int | None = None) -> Any:
    """A Chromium browser context (Playwright's ``BrowserContext``) with its own profile folder."""
    return playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=chromium_flags(camera_fps), viewport=VIEWPORT
    )


def wait(page: Any, expr: str, timeout: float = 60.0) -> Any:
    """Poll a JavaScript expression in a Playwright page until it is truthy (CSP-safe) and return it; on
    timeout an AssertionError with the page's probe state (``window.deepvis``, when the page has one)."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expr)
        if value:
            return value
        if time.monotonic() > deadline:
            state = page.evaluate(
                "window.deepvis ? JSON.stringify({...window.deepvis, latencies: undefined, last: undefined, lastGrid: undefined}) : 'no probe'"
            )
            raise AssertionError(f"timed out waiting for {expr}; page state: {state}")
        page.wait_for_timeout(50)


@contextlib.contextmanager
def browser_context(profile: str | Path, *, camera_fps: int | None = None) -> Iterator[Any]:
    """A Chromium context (:func:`launch`) for the duration of the block, with Playwright started and
    stopped around it (imported here: the benchmark imports this module before it needs Playwright)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        ctx = launch(p, profile, camera_fps=camera_fps)
        try:
            yield ctx
        finally:
            ctx.close()


def watch_problems(page: Any) -> list[str]:
    """The list that collects ``page``'s script errors and console errors from now on (a test asserts it empty)."""
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
    return problems
