"""The glibc allocator effect on batched CPU backward passes, and what deepvis does about it.

Runs the same workload (default model truncated at blocks.3, 224 px, forward + backward to the input)
in child processes with glibc's default malloc and with the tunables that the `deepvis` command sets
for itself (deepvis.allocator.ALLOCATOR_TUNABLES), side by side, and prints the ratio.
With ``--device cuda`` the same workload runs on the GPU, where the host allocator is out of the hot path
(the ratio shows how much of the CPU effect remains there). Run: python benchmarks/bench_allocator.py [--batch 32] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, statistics, time, torch
from deepvis.models import load_model
from deepvis.capture import capture, frozen
from deepvis.runtime import synchronize
model = load_model("default", device={device!r})
x0 = torch.randn({batch}, 3, 224, 224, device=model.device)
times = []
with frozen(model.module):
    for i in range({steps}):
        x = x0.clone().requires_grad_(True)
        synchronize(model.device)
        t = time.perf_counter()
        a = capture(model, x, ["blocks.3"], grad=True)["blocks.3"]
        a[:, :, 7, 7].sum().backward()
        synchronize(model.device)
        times.append(time.perf_counter() - t)
print(json.dumps(statistics.median(times[2:])))
"""


def run(env_extra: dict[str, str] | None, batch: int, steps: int, device: str = "cpu") -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "LD_PRELOAD")}
    env.update(env_extra or {})
    out = subprocess.run(
        [sys.executable, "-c", CHILD.format(batch=batch, steps=steps, device=device)], env=env, capture_output=True, text=True, check=True
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    from deepvis.allocator import ALLOCATOR_TUNABLES

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    plain, tuned = [], []
    for _ in range(args.rounds):  # interleave the two settings
        plain.append(run(None, args.batch, args.steps, args.device))
        tuned.append(run({"GLIBC_TUNABLES": ALLOCATOR_TUNABLES}, args.batch, args.steps, args.device))
    p, t = min(plain), min(tuned)
    print(f"device {args.device}, batch {args.batch}, forward+backward to the input through blocks.3 of the default model")
    print(f"glibc malloc defaults:      {p * 1e3:8.1f} ms/step")
    print(f"deepvis allocator tunables: {t * 1e3:8.1f} ms/step")
    print(f"speed-up: {p / t:.2f}x  (the deepvis command sets these itself; Python API users: see docs/performance.md)")


if __name__ == "__main__":
    main()
