"""Atlas mining throughput vs bare batched inference on the same images. Target: ratio >= 0.85.

Both sides read the same images of the ``demo`` dataset with the same loader (decoding in background
threads), in the same batches, on the same device:

* **bare**: ``model.module(x)`` under ``torch.inference_mode()`` — the whole network, no hooks;
* **mining**: :func:`deepvis.atlas.mine` — capture of the atlas layers (the forward pass stops after
  the deepest), top-k and statistics for every unit of every layer.

Two figures are printed: end to end (decoding included, what a user sees; whole runs alternate) and
compute only (the batches decoded once beforehand and each batch run bare then mined, back to back, so
that load from other processes hits both alike). The layer sets are the last
conv layer (``conv_head``: nearly the whole network runs, so early stopping saves almost nothing)
and three layers spread over the network. Runs alternate bare/mining and the medians are compared.

Run: python benchmarks/bench_atlas.py [--device cuda] [--batch-size 64] [--images 256] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from deepvis.allocator import allocator_tuned, ensure_allocator_tuning

ensure_allocator_tuning()

from deepvis.capture import capture, get_layer  # noqa: E402
from deepvis.datasets import iter_batches, open_dataset  # noqa: E402
from deepvis.models import load_model  # noqa: E402
from deepvis.stats import LayerStats, batch_indices, mine, num_batches  # noqa: E402

LAYER_SETS = {"conv_head": ("conv_head",), "3 layers": ("blocks.2", "blocks.4", "conv_head")}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--images", type=int, default=192, help="images per run (from the demo dataset)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-threads", type=int, default=2)
    args = ap.parse_args()

    model = load_model("default", device=args.device)
    device = model.device
    ds = open_dataset("demo")
    n = min(args.images, len(ds))
    bs = args.batch_size
    indices = range(n)
    batches = list(range(num_batches(n, bs)))

    def infos(layers):
        return {name: get_layer(model, name) for name in layers}

    def bare_stream() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for b in iter_batches(ds, model, bs, indices=indices, workers=args.decode_threads):
                model.module(b.x)
        _sync(device)
        return n / (time.perf_counter() - t)

    def mine_stream(layers) -> float:
        states = {k: LayerStats(k, i.units, 9, tuple(i.shape[1:]) if i.spatial else None, device) for k, i in infos(layers).items()}
        t = time.perf_counter()
        # mine() reads the first n samples in batches of bs: restrict the dataset view to them
        sub = type(ds)(ds.samples[:n], ds.classes, ds.spec, ds.views[:n] if ds.views else None)
        for _ in mine(model, sub, states, batches, bs, workers=args.decode_threads):
            pass
        _sync(device)
        return n / (time.perf_counter() - t)

    pre = [b.x for b in iter_batches(ds, model, bs, indices=indices, workers=args.decode_threads)]

    def compute_pair(layers) -> tuple[float, float]:
        """Bare and mining seconds per image on the pre-decoded batches, interleaved batch by batch
        (each batch runs bare, then mined) so that machine noise hits both alike."""
        states = {k: LayerStats(k, i.units, 9, tuple(i.shape[1:]) if i.spatial else None, device) for k, i in infos(layers).items()}
        names = list(layers)
        tb = tm = 0.0
        for b, x in zip(batches, pre):
            t = time.perf_counter()
            with torch.inference_mode():
                model.module(x)
            _sync(device)
            t1 = time.perf_counter()
            acts = capture(model, x, names)
            ids = torch.tensor(list(batch_indices(b, bs, n)))
            for k in names:
                states[k].update(acts[k], ids)
            _sync(device)
            tb += t1 - t
            tm += time.perf_counter() - t1
        return n / tb, n / tm

    print(
        f"deepvis atlas mining benchmark: default model, {n} demo images, batch {bs}, device {device}, "
        f"{torch.get_num_threads()} threads, allocator tuned: {allocator_tuned()}"
    )
    # warm up every path once (kernel selection, caches)
    bare_stream()
    for layers in LAYER_SETS.values():
        mine_stream(layers), compute_pair(layers)
    for label, layers in LAYER_SETS.items():
        rb, rm = [], []
        for _ in range(args.repeats):
            rb.append(bare_stream())
            rm.append(mine_stream(layers))
        b_, m_ = statistics.median(rb), statistics.median(rm)
        print(f"  {label:<10} end to end    bare {b_:8.1f} img/s   mining {m_:8.1f} img/s   ratio {m_ / b_:.3f}   (target >= 0.85)")
        pairs = [compute_pair(layers) for _ in range(args.repeats)]
        b_, m_ = statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)
        ratio = statistics.median(p[1] / p[0] for p in pairs)
        print(f"  {label:<10} compute only  bare {b_:8.1f} img/s   mining {m_:8.1f} img/s   ratio {ratio:.3f}   (target >= 0.85)")


if __name__ == "__main__":
    main()
