"""The live toolbox end to end: the real page in headless Chromium with a fake 30 fps camera.

Starts ``deepvis serve`` (default model, CPU or ``--device cuda``) as its own process, opens the page in Debian's Chromium
(/usr/bin/chromium) with Chromium's fake camera, and measures, for the backprop view off and then on:

* frames/s: live grid results drawn by the page per second;
* latency: from the moment a camera frame appears in the page to the moment its result is drawn (p50, p95);
* backprop views/s (backprop on);
* camera frames/s presented by the fake device, and frames the server dropped as stale;
* CPU milliseconds per drawn frame, server and browser (every Chromium process of the run). The page is
  driven by a bare Chromium over DevTools (benchmarks/_cdp.py) unless ``--driver playwright``:
  Playwright's instrumentation of every WebSocket message costs the browser as much CPU again as the
  page's own work, which a user's browser does not spend;
* switches (backprop off): from a key press (the key event's time stamp in the page) to the new unit's
  map or the new layer's first result drawn, against one frame time (1 / frames/s); see switch_times;
* the bare forward: the same model's batch-1 forward pass alone (no_grad, the server's thread count
  and memory layout, its OpenMP policy), timed in a child process before the server starts and after
  it stops (the median of both), and the ratios against it:
  efficiency = frames/s x bare-forward seconds, and p95 latency in bare forwards.

Targets (ratios, so that they travel between machines): efficiency >= 0.5 with backprop off (or the
camera's rate), >= 0.3 with the backprop view on; p95 <= 5 bare forwards; browser CPU per drawn frame
<= 0.53 bare forwards (the issue's 10 ms, asked on a machine whose bare forward took 19 ms; the absolute
figure is printed too); a unit or layer switch (to the next layer) drawn within one frame time.

Run: python benchmarks/bench_live.py [--seconds 15] [--model default] [--device cuda] [--layer NAME] [--repeat N] [--dataset demo]
[--driver playwright]
(--repeat runs both conditions N times, alternating, and prints the median of each figure; --dataset measures
the page while the server mines that dataset in the background, `deepvis serve --dataset`.)
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # Chromium's settings, shared with the browser tests

from _cdp import bare_chromium
from chromium import browser_context, wait
from deepvis.allocator import allocator_env

#: frames per second of Chromium's fake camera
CAMERA_FPS = 30

#: the browser-CPU target as a ratio that travels between machines: the live-toolbox issue asked for at
#: most 10 ms of browser CPU per drawn frame on a machine where this bare forward took 19 ms, so at
#: most 10/19 bare forwards (the same machine runs both sides: a 2x slower one doubles both)
ISSUE_BARE_MS = 19.0
BROWSER_TARGET_FWD = 10.0 / ISSUE_BARE_MS


def start_server(model: str, extra_env: list[str], device: str = "cpu", dataset: str | None = None) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ)
    env.update(kv.split("=", 1) for kv in extra_env)
    mining = ["--dataset", dataset] if dataset else []  # mined in the background while the page is measured
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepvis", "serve", "--port", "0", "--model", model, "--device", device, *mining],
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


def cpu_by_process(match: str) -> dict[str, float]:
    """User + system CPU seconds of every process whose command line contains ``match`` (Linux /proc),
    summed by Chromium's process type (``renderer``, ``gpu-process``, ``utility:NetworkService``, ...;
    ``main`` for a process without one: Chromium's browser process, or the server)."""
    tick = os.sysconf("SC_CLK_TCK")
    total: dict[str, float] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                raw = f.read()
            if match.encode() not in raw:
                continue
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue  # the process ended meanwhile
        # (Chromium rewrites its children's command lines into one space-separated string)
        typ, sub = re.search(rb"--type=([\w-]+)", raw), re.search(rb"--utility-sub-type=([\w.]+)", raw)
        kind = typ.group(1).decode() if typ else "main"
        if sub:
            kind += ":" + sub.group(1).decode().rsplit(".", 1)[-1]
        total[kind] = total.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return total


def cpu_seconds(match: str) -> float:
    """User + system CPU seconds of every process whose command line contains ``match`` (Linux /proc)."""
    return sum(cpu_by_process(match).values())


#: Chromium's process types, in the breakdown's words
PROCESS_NAMES = {
    "renderer": "page",
    "gpu-process": "compositing",
    "main": "browser",
    "utility:NetworkService": "network",
    "utility:VideoCaptureService": "camera",
}


#: the child that times the bare forward; prints milliseconds per forward (median)
BARE_FORWARD = """
import statistics, sys, time
import torch
from deepvis.models import load_model
from deepvis.runtime import synchronize
from deepvis.server.frames import choose_memory_format
if len(sys.argv) > 3:
    torch.set_num_threads(int(sys.argv[3]))
m = load_model(sys.argv[1], device=sys.argv[2])
fmt = choose_memory_format(m)
x = torch.zeros(1, *m.preprocessing.input_shape, device=m.device).contiguous(memory_format=fmt)
times = []
with torch.no_grad():
    for _ in range(5):
        m.module(x)
    for _ in range(40):
        synchronize(m.device)
        t = time.perf_counter()
        m.module(x)
        synchronize(m.device)
        times.append(time.perf_counter() - t)
print(1000 * statistics.median(times), torch.get_num_threads())
"""


def bare_forward(model: str, threads: int | None, device: str = "cpu") -> tuple[float, int]:
    """(milliseconds per batch-1 forward, threads) of ``model`` alone, in a child process set up as
    ``deepvis serve`` sets itself up (passive OpenMP waiting, the same memory-layout choice)."""
    env = allocator_env() or dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    cmd = [sys.executable, "-c", BARE_FORWARD, model, device] + ([str(threads)] if threads else [])
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout.split()
    return float(out[0]), int(out[1])


def measure(page, seconds: float, server_match: str, browser_match: str) -> dict[str, float]:
    """Sample the page's counters for ``seconds``; latencies are collected as they arrive."""
    read = "({f: window.deepvis.frames, b: window.deepvis.backprops, n: window.deepvis.latencyCount, c: window.deepvis.cameraFrames, d: window.deepvis.sessionDropped, s: window.deepvis.skipped, lat: window.deepvis.latencies.slice(-300), ms: window.deepvis.last.ms})"
    start = page.evaluate(read)
    cpu0 = (cpu_seconds(server_match), cpu_by_process(browser_match))
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
    cpu1 = (cpu_seconds(server_match), cpu_by_process(browser_match))
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
        "browser_cpu_ms": 1000 * (sum(cpu1[1].values()) - sum(cpu0[1].values())) / frames,
        **{f"browser_{PROCESS_NAMES.get(k, 'other')}_ms": 1000 * (cpu1[1][k] - cpu0[1].get(k, 0.0)) / frames for k in cpu1[1]},
    }


def camera_alone(page, seconds: float, browser_match: str) -> float:
    """Chromium's CPU milliseconds per second with the camera on and the page frozen (nothing sent,
    nothing drawn): what the camera costs the browser whatever the page does."""
    page.keyboard.press("f")  # freeze
    page.wait_for_timeout(1000)
    c0, t0 = cpu_seconds(browser_match), time.monotonic()
    page.wait_for_timeout(seconds * 1000)
    ms = 1000 * (cpu_seconds(browser_match) - c0) / (time.monotonic() - t0)
    page.keyboard.press("f")
    page.wait_for_timeout(1000)
    return ms


#: resolves, at the first animation frame where ``window.deepvis[probe][field]`` differs from ``before``,
#: to that moment (performance.now() milliseconds); polled in the page (its CSP forbids string eval)
CHANGED = """([probe, field, before]) => new Promise((resolve) => {
  const now = () => (window.deepvis[probe] || {})[field];
  const tick = () => (now() !== before ? resolve(performance.now()) : requestAnimationFrame(tick));
  tick();
})"""


#: what the page recorded of the last key press and what it drew since (its figures, state.js)
DRAWN = "({key: window.deepvis.lastKey, maps: window.deepvis.unitMaps, views: window.deepvis.viewChanges})"


def _first(entries: list[dict], after: float, **match) -> float:
    """The time of the first entry at or after ``after`` whose fields equal ``match``."""
    times = [e["at"] for e in entries if e["at"] >= after and all(e[k] == v for k, v in match.items())]
    if not times:
        raise RuntimeError(f"the page recorded no drawing of {match} after the key press")
    return min(times)


def switch_times(page, repeats: int = 5) -> dict[str, float]:
    """Median milliseconds from a key press to the new view drawn, on the live camera: ``l`` -> the next
    unit's map (the page's preview from its grid: ``unit_switch_ms``; the server's exact map:
    ``unit_exact_ms``), ``o`` / ``u`` -> the first result of the new layer (``layer_switch_ms``).

    Measured in the page: from the key event's time stamp (when the browser received the key) to the
    moment the page has drawn the new view into its canvas (it is on screen with the next display
    frame). ``*_polled``: the same switches timed from the benchmark's side, from just before
    the driver sends the key to the moment a poll in the page sees the change (what this benchmark
    printed before; it adds the driver's delivery of the key and the poll's own wait for the page)."""
    out: dict[str, list[float]] = {k: [] for k in ("unit_switch_ms", "unit_exact_ms", "layer_switch_ms")}
    polled: dict[str, list[float]] = {k: [] for k in out}
    for i in range(repeats):
        before = page.evaluate("window.deepvis.last.unit")
        t0 = page.evaluate("performance.now()")
        page.keyboard.press("l")
        polled["unit_switch_ms"].append(page.evaluate(CHANGED, ["unitMap", "unit", before]) - t0)
        polled["unit_exact_ms"].append(page.evaluate(CHANGED, ["last", "unit", before]) - t0)
        d = page.evaluate(DRAWN)
        unit = page.evaluate("window.deepvis.last.unit")
        out["unit_switch_ms"].append(_first(d["maps"], d["key"]["at"], unit=unit) - d["key"]["at"])
        out["unit_exact_ms"].append(_first(d["maps"], d["key"]["at"], unit=unit, exact=True) - d["key"]["at"])
        page.wait_for_timeout(200)
        before = page.evaluate("window.deepvis.last.layer")
        t0 = page.evaluate("performance.now()")
        page.keyboard.press("o" if i % 2 == 0 else "u")
        polled["layer_switch_ms"].append(page.evaluate(CHANGED, ["last", "layer", before]) - t0)
        d = page.evaluate(DRAWN)
        layer = page.evaluate("window.deepvis.last.layer")
        out["layer_switch_ms"].append(_first(d["views"], d["key"]["at"], layer=layer) - d["key"]["at"])
        page.wait_for_timeout(200)
    return {**{k: statistics.median(v) for k, v in out.items()}, **{f"{k}_polled": statistics.median(v) for k, v in polled.items()}}


@contextlib.contextmanager
def _browser(driver: str, profile: str) -> Iterator[Any]:
    """The page the run drives: a bare Chromium over DevTools (``bare``: what a user's browser spends)
    or Playwright's (``playwright``: plus Playwright's instrumentation of the page, see _cdp.py)."""
    if driver == "bare":
        with bare_chromium(profile, camera_fps=CAMERA_FPS) as page:
            yield page
        return
    with browser_context(profile, camera_fps=CAMERA_FPS) as ctx:
        yield ctx.new_page()


def run_once(args: argparse.Namespace) -> tuple[str, dict[str, dict[str, float]]]:
    """One run of the server and the page: both conditions measured, in order (off, then on)."""
    proc, url = start_server(args.model, args.server_env, args.device, args.dataset)
    url += "&test=1"  # the page's probe: window.deepvis, its live figures
    profile = tempfile.mkdtemp(prefix="deepvis-bench-")
    if args.layer:
        url += f"&layer={args.layer}"
    if args.inflight:
        url += f"&inflight={args.inflight}"
    results: dict[str, dict[str, float]] = {}
    try:
        with _browser(args.driver, profile) as page:
            page.goto(url)
            wait(page, "window.deepvis && window.deepvis.ready")
            page.click("#src-camera")
            wait(page, "window.deepvis.liveFrames > 10")
            layer = page.evaluate("window.deepvis.last.layer")
            page.wait_for_timeout(args.warmup * 1000)
            results[OFF] = measure(page, args.seconds, "deepvis\0serve", profile)
            results[OFF].update(switch_times(page))
            results[OFF]["camera_alone_ms_per_s"] = camera_alone(page, min(args.seconds, 5.0), profile)
            page.keyboard.press("b")  # the gradient view of the selected unit
            wait(page, "window.deepvis.backprops > 5")
            page.wait_for_timeout(args.warmup * 1000)
            results[ON] = measure(page, args.seconds, "deepvis\0serve", profile)
    finally:
        proc.terminate()
        proc.wait(30)
    return layer, results


OFF, ON = "backprop off", "backprop on (gradient)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=15.0, help="measuring time per condition (default: %(default)s)")
    ap.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (default: %(default)s)")
    ap.add_argument("--repeat", type=int, default=1, help="runs of both conditions; figures are medians (default: %(default)s)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu", help="the server's and the bare forward's device (default: %(default)s)")
    ap.add_argument("--layer", help="layer to show (default: the page's default layer)")
    ap.add_argument(
        "--driver",
        choices=("bare", "playwright"),
        default="bare",
        help="how the page is driven: a bare Chromium over DevTools (what a user's browser spends; default) or Playwright "
        "(adds Playwright's instrumentation of every WebSocket message to the browser's CPU)",
    )
    ap.add_argument("--inflight", type=int, help="frames the page keeps on their way (default: the page's)")
    ap.add_argument("--threads", type=int, help="the server's --threads (default: PyTorch's choice); the bare forward uses the same")
    ap.add_argument(
        "--dataset", help="the server's --dataset (e.g. demo): the page is measured while the dataset is mined in the background"
    )
    ap.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the server process")
    args = ap.parse_args()
    if args.threads:
        args.server_env.append(f"OMP_NUM_THREADS={args.threads}")

    bare: list[float] = []
    runs: list[dict[str, dict[str, float]]] = []
    threads = 0
    layer = "?"
    for _ in range(max(1, args.repeat)):
        ms, threads = bare_forward(args.model, args.threads, args.device)
        bare.append(ms)
        layer, results = run_once(args)
        runs.append(results)
    ms, threads = bare_forward(args.model, args.threads, args.device)
    bare.append(ms)
    bare_ms = statistics.median(bare)

    def med(cond: str, key: str) -> float:
        missing = 0.0 if key.startswith("browser_") else float("nan")  # a process type absent from a run used no CPU
        vals = [v for r in runs if math.isfinite(v := r[cond].get(key, missing))]
        return statistics.median(vals) if vals else float("nan")

    print(
        f"deepvis serve, model {args.model}, layer {layer}, fake camera {CAMERA_FPS} fps, {args.seconds:.0f} s per condition, "
        f"{f'mining --dataset {args.dataset}, ' if args.dataset else ''}"
        f"{len(runs)} run(s) (medians), page driven by {'a bare Chromium over DevTools' if args.driver == 'bare' else 'Playwright'}"
    )
    print(f"bare forward (batch 1, {threads} threads, no_grad): {bare_ms:.1f} ms (runs: {', '.join(f'{b:.1f}' for b in bare)})")
    print(
        f"{'condition':<24}{'frames/s':>9}{'effic.':>7}{'p50 ms':>8}{'p95 ms':>8}{'p95/fwd':>8}{'bp/s':>6}{'cam/s':>7}{'srv ms':>8}"
        f"{'dropped':>8}{'skipped':>8}{'cpu ms/frame srv + browser':>28}"
    )
    for cond in (OFF, ON):
        fps, p95 = med(cond, "fps"), med(cond, "p95")
        print(
            f"{cond:<24}{fps:>9.1f}{fps * bare_ms / 1000:>7.2f}{med(cond, 'p50'):>8.0f}{p95:>8.0f}{p95 / bare_ms:>8.1f}"
            f"{med(cond, 'backprop_fps'):>6.1f}{med(cond, 'camera_fps'):>7.1f}{med(cond, 'server_ms'):>8.1f}{med(cond, 'dropped'):>8.0f}"
            f"{med(cond, 'skipped'):>8.0f}{med(cond, 'server_cpu_ms'):>16.1f} + {med(cond, 'browser_cpu_ms'):.1f}"
        )
    off_frame_ms = 1000 / max(1e-6, med(OFF, "fps"))
    print(
        f"switch (backprop off, key press -> drawn, median): unit {med(OFF, 'unit_switch_ms'):.0f} ms (the page's preview; "
        f"the server's exact map {med(OFF, 'unit_exact_ms'):.0f} ms), layer {med(OFF, 'layer_switch_ms'):.0f} ms "
        f"(one frame time: {off_frame_ms:.0f} ms)"
    )
    print(
        f"  the same timed from the driver's side (key sent -> a poll in the page sees it): unit {med(OFF, 'unit_switch_ms_polled'):.0f} / "
        f"exact {med(OFF, 'unit_exact_ms_polled'):.0f} ms, layer {med(OFF, 'layer_switch_ms_polled'):.0f} ms"
    )
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (other processes on the machine slow both sides)")
    off_fps, on_fps = med(OFF, "fps"), med(ON, "fps")
    off_ok = off_fps * bare_ms / 1000 >= 0.5 or off_fps >= 0.95 * med(OFF, "camera_fps")
    print(f"target backprop off: efficiency >= 0.5 (or every camera frame) -> {'met' if off_ok else 'NOT met'}")
    print(f"target backprop on:  efficiency >= 0.3 -> {'met' if on_fps * bare_ms / 1000 >= 0.3 else 'NOT met'}")
    worst = max(med(OFF, "p95"), med(ON, "p95")) / bare_ms
    print(f"target p95 <= 5 bare forwards -> {'met' if worst <= 5 else 'NOT met'} (worst {worst:.1f})")
    slowest = max(med(OFF, "unit_exact_ms"), med(OFF, "layer_switch_ms"))
    print(
        f"target unit and layer switch drawn within one frame time ({off_frame_ms:.0f} ms) -> "
        f"{'met' if slowest <= off_frame_ms else 'NOT met'} (slowest: {slowest:.0f} ms, the server's exact map or the layer)"
    )
    for cond in (OFF, ON):
        parts = " + ".join(f"{name} {med(cond, f'browser_{name}_ms'):.1f}" for name in (*PROCESS_NAMES.values(), "other"))
        print(f"browser CPU ms per drawn frame, {cond}: {med(cond, 'browser_cpu_ms'):.1f} = {parts}")
    cam = med(OFF, "camera_alone_ms_per_s")
    print(
        f"the camera alone (page frozen, same run): {cam:.0f} ms of browser CPU per second, "
        f"{cam / max(1e-6, med(OFF, 'fps')):.1f} ms per drawn frame at the live rate"
    )
    cpu = max(med(OFF, "browser_cpu_ms"), med(ON, "browser_cpu_ms"))
    print(
        f"browser CPU <= 10 ms per drawn frame (as the issue wrote it, on its machine) -> {'met' if cpu <= 10 else 'NOT met'} (worst {cpu:.1f} ms)"
    )
    in_fwd = cpu / bare_ms
    print(
        f"target browser CPU <= {BROWSER_TARGET_FWD:.2f} bare forwards per drawn frame (10 ms beside the issue's {ISSUE_BARE_MS:.0f} ms "
        f"bare forward) -> {'met' if in_fwd <= BROWSER_TARGET_FWD else 'NOT met'} (worst {in_fwd:.2f}: {cpu:.1f} ms beside {bare_ms:.1f} ms)"
    )


if __name__ == "__main__":
    main()
