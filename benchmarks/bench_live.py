"""The live toolbox end to end: the real page in headless Chromium with a fake 30 fps camera.

Starts ``deepvis serve`` (default model, CPU) as its own process, opens the page in Debian's Chromium
(/usr/bin/chromium) with Chromium's fake camera, and measures, for the backprop view off and then on:

* frames/s: live grid results drawn by the page per second;
* latency: from the moment a camera frame appears in the page to the moment its result is drawn (p50, p95);
* backprop views/s (backprop on);
* camera frames/s presented by the fake device, and frames the server dropped as stale.

Targets on a 2-core CPU with the default model: >= 20 frames/s and p95 <= 100 ms with backprop off;
>= 10 frames/s with the backprop view on.

Run: python benchmarks/bench_live.py [--seconds 15] [--model default] [--layer NAME]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--use-fake-device-for-media-stream=fps=30",
    "--use-fake-ui-for-media-stream",
]


def wait(page, expr: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = page.evaluate(expr)
        if v:
            return v
        page.wait_for_timeout(50)
    raise RuntimeError(f"timed out waiting for {expr}")


def start_server(model: str, extra_env: list[str]) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in extra_env)
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepvis", "serve", "--port", "0", "--model", model, "--device", "cpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    line = proc.stdout.readline() if proc.stdout else ""
    if "token=" not in line:
        proc.kill()
        raise RuntimeError(f"deepvis serve did not start: {line!r}")
    return proc, line.split("open ", 1)[1].strip()


def cpu_seconds(match: str) -> float:
    """User + system CPU seconds of every process whose command line contains ``match`` (Linux /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if match.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # the process ended meanwhile
    return total


def measure(page, seconds: float, server_match: str, browser_match: str) -> dict[str, float]:
    """Sample the page's counters for ``seconds``; latencies are collected as they arrive."""
    read = "({f: window.deepvis.frames, b: window.deepvis.backprops, n: window.deepvis.latencyCount, c: window.deepvis.cameraFrames, d: window.deepvis.sessionDropped, s: window.deepvis.skipped, lat: window.deepvis.latencies.slice(-300), ms: window.deepvis.last.ms})"
    start = page.evaluate(read)
    cpu0 = (cpu_seconds(server_match), cpu_seconds(browser_match))
    t0 = time.monotonic()
    lat: list[float] = []
    server_ms: list[float] = []
    seen = start["n"]
    while time.monotonic() - t0 < seconds:
        page.wait_for_timeout(500)
        now = page.evaluate(read)
        new = now["n"] - seen
        if new > 0:
            lat += now["lat"][-min(new, len(now["lat"])) :]
        seen = now["n"]
        server_ms.append(now["ms"])
    end = page.evaluate(read)
    dt = time.monotonic() - t0
    cpu1 = (cpu_seconds(server_match), cpu_seconds(browser_match))
    frames = max(1, end["f"] - start["f"])
    lat.sort()
    return {
        "fps": (end["f"] - start["f"]) / dt,
        "backprop_fps": (end["b"] - start["b"]) / dt,
        "camera_fps": (end["c"] - start["c"]) / dt,
        "p50": statistics.median(lat) if lat else float("nan"),
        "p95": lat[min(len(lat) - 1, int(0.95 * len(lat)))] if lat else float("nan"),
        "server_ms": statistics.median(server_ms) if server_ms else float("nan"),
        "dropped": end["d"] - start["d"],
        "skipped": end["s"] - start["s"],
        "samples": len(lat),
        "server_cpu_ms": 1000 * (cpu1[0] - cpu0[0]) / frames,
        "browser_cpu_ms": 1000 * (cpu1[1] - cpu0[1]) / frames,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="measuring time per condition (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (default: %(default)s)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--layer", help="layer to show (default: the page's default layer)")
    ap.add_argument("--inflight", type=int, help="frames the page keeps on their way (default: the page's, 1)")
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the server process")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    proc, url = start_server(args.model, args.server_env)
    profile = tempfile.mkdtemp(prefix="deepvis-bench-")
    if args.layer:
        url += f"&layer={args.layer}"
    if args.inflight:
        url += f"&inflight={args.inflight}"
    results: dict[str, dict[str, float]] = {}
    try:
        with sync_playwright() as p:
            ctx = p.chromium.launch_persistent_context(
                profile, executable_path=CHROMIUM, headless=True, args=FLAGS, viewport={"width": 1400, "height": 900}
            )
            page = ctx.new_page()
            page.goto(url)
            wait(page, "window.deepvis && window.deepvis.ready")
            page.click("#src-camera")
            wait(page, "window.deepvis.liveFrames > 10")
            layer = page.evaluate("window.deepvis.last.layer")
            page.wait_for_timeout(args.warmup * 1000)
            results["backprop off"] = measure(page, args.seconds, "deepvis\0serve", profile)
            page.keyboard.press("b")  # the gradient view of the selected unit
            wait(page, "window.deepvis.backprops > 5")
            page.wait_for_timeout(args.warmup * 1000)
            results["backprop on (gradient)"] = measure(page, args.seconds, "deepvis\0serve", profile)
            ctx.close()
    finally:
        proc.terminate()
        proc.wait(30)

    print(f"deepvis serve, model {args.model}, layer {layer}, fake camera 30 fps, {args.seconds:.0f} s per condition")
    print(
        f"{'condition':<24}{'frames/s':>9}{'p50 ms':>8}{'p95 ms':>8}{'bp/s':>6}{'cam/s':>7}{'srv ms':>8}{'dropped':>8}{'skipped':>8}{'cpu ms/frame srv+browser':>26}"
    )
    for name, r in results.items():
        print(
            f"{name:<24}{r['fps']:>9.1f}{r['p50']:>8.0f}{r['p95']:>8.0f}{r['backprop_fps']:>6.1f}{r['camera_fps']:>7.1f}"
            f"{r['server_ms']:>8.1f}{r['dropped']:>8.0f}{r['skipped']:>8.0f}{r['server_cpu_ms']:>14.1f} + {r['browser_cpu_ms']:.1f}"
        )
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (other processes on the machine slow both sides)")
    off, on = results["backprop off"], results["backprop on (gradient)"]
    print(f"target backprop off: >= 20 frames/s and p95 <= 100 ms -> {'met' if off['fps'] >= 20 and off['p95'] <= 100 else 'NOT met'}")
    print(f"target backprop on:  >= 10 frames/s -> {'met' if on['fps'] >= 10 else 'NOT met'} (backprop views {on['backprop_fps']:.1f}/s)")


if __name__ == "__main__":
    main()
