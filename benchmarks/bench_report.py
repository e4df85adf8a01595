"""Cost of the report's streaming statistics beside the forward pass they ride on.

Times, side by side on the same batch of demo inputs with the default model (lite0, 224 px):
``capture`` — the forward pass capturing the default report layers; ``scan`` — the same pass plus
activity, locality, pooled features and thumbnails (what `deepvis report` does per batch).
Prints the median seconds of each and their ratio.

    python benchmarks/bench_report.py [--batch 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from _timing import interleaved
from deepvis.allocator import ensure_allocator_tuning

ensure_allocator_tuning()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    import torch

    from deepvis.analysis import default_layers, scan
    from deepvis.capture import capture
    from deepvis.datasets import iter_batches, open_dataset
    from deepvis.models import load_model

    torch.set_num_threads(min(2, torch.get_num_threads()))
    model = load_model("default", device=args.device)
    ds = open_dataset("demo")
    layers = default_layers(model)
    idx = list(range(0, len(ds), max(1, len(ds) // args.batch)))[: args.batch]
    batch = next(iter(iter_batches(ds, model, args.batch, indices=idx, workers=0)))
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def plain() -> None:
        capture(model, batch.x, layers, stop_early=False)
        sync()

    def full() -> None:
        scan(model, [batch], layers)
        sync()

    t = interleaved({"capture": plain, "scan": full}, repeats=args.repeats, warmup=1)
    print(f"device {model.device}, batch {args.batch}, layers {', '.join(layers)}")
    print(f"capture {t['capture'] * 1000:.0f} ms   scan {t['scan'] * 1000:.0f} ms   scan/capture {t['scan'] / t['capture']:.2f}x")


if __name__ == "__main__":
    main()
