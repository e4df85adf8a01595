"""Backprop views: one view of a unit vs a bare forward+backward pass, measured side by side.

Default model, batch 1, 224 px, CPU (or --device cuda). The baseline is the plain PyTorch way to get
the same picture: parameters frozen, a full forward pass, the backward pass of one logit to the
input. Target: a view of a class logit in any mode costs at most 1.5x the baseline.
Also printed: a mid-layer unit (the forward pass stops at its layer), a batch of 8 views, and the
one-off cost of a layer's receptive fields (cached afterwards).
Each line gives wall-clock medians and, in brackets, medians of this process's CPU time (all its
threads), which other jobs on a shared machine disturb much less.
Run: python benchmarks/bench_backprop.py [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from deepvis.allocator import allocator_tuned, ensure_allocator_tuning

ensure_allocator_tuning()

from deepvis.backprop import backprop_view, backprop_views, layer_field  # noqa: E402
from deepvis.capture import frozen, layer_table  # noqa: E402
from deepvis.io import load_image, sample_path  # noqa: E402
from deepvis.models import load_model  # noqa: E402


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 3) -> dict[str, tuple[float, float]]:
    """Median (wall seconds, process CPU seconds) per call, measured in interleaved rounds."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in fns}


def _line(label: str, t: tuple[float, float], base: tuple[float, float] | None = None, note: str = "") -> str:
    text = f"{label:<42} {t[0] * 1e3:8.2f} ms [cpu {t[1] * 1e3:8.2f} ms]"
    if base is not None:
        text += f"   ratio {t[0] / base[0]:.2f} [cpu {t[1] / base[1]:.2f}] {note}"
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    model = load_model("default", device=args.device)
    x = model.preprocess(load_image(sample_path("coffee")))
    layer_table(model)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def bare():
        with frozen(model.module):
            xr = x.detach().clone().requires_grad_(True)
            model.module(xr)[0, 967].backward()
        sync()

    def view(mode, unit="logits:967", at=None):
        def fn():
            backprop_view(model, x, unit, mode, at=at)
            sync()

        return fn

    fns = {
        "bare": bare,
        "gradient": view("gradient"),
        "deconv": view("deconv"),
        "guided": view("guided"),
        "mid guided": view("guided", "blocks.3:5", "max"),
    }
    t = interleaved(fns, repeats=args.repeats)
    xb = x.expand(8, -1, -1, -1)

    def batch8():
        backprop_views(model, xb, "logits:967", "guided")
        sync()

    def bare8():
        with frozen(model.module):
            xr = xb.detach().clone().requires_grad_(True)
            model.module(xr)[:, 967].sum().backward()
        sync()

    tb = interleaved({"bare8": bare8, "batch8": batch8}, repeats=max(3, args.repeats // 5), warmup=1)
    start = time.perf_counter()
    geo = layer_field(model, "blocks.2")
    rf_s = time.perf_counter() - start
    start = time.perf_counter()
    layer_field(model, "blocks.2")
    cached_s = time.perf_counter() - start

    print(f"device: {model.device}, torch threads: {torch.get_num_threads()}, allocator tuned: {allocator_tuned()}")
    print(_line("bare forward+backward of one logit", t["bare"]))
    for k in ("gradient", "deconv", "guided"):
        print(_line(f"backprop view, logits:967, {k}", t[k], t["bare"], "(target <= 1.5)"))
    print(_line("backprop view, blocks.3:5 at max, guided", t["mid guided"], t["bare"], "(stops at blocks.3)"))
    print(_line("batch of 8 guided views (vs bare batch)", tb["batch8"], tb["bare8"]))
    print(
        f"receptive fields of blocks.2 ({geo.output_size[0]}x{geo.output_size[1]} positions): {rf_s:.2f} s once, {cached_s * 1e6:.0f} us cached"
    )


if __name__ == "__main__":
    main()
