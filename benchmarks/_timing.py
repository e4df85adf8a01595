"""Side-by-side timing helpers for the benchmarks (interleaved runs, medians)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def interleaved(
    fns: dict[str, Callable[[], object]], *, repeats: int = 30, warmup: int = 3, sync: Callable[[], object] | None = None
) -> dict[str, float]:
    """Median seconds per call of each function, measured in interleaved rounds so that machine
    noise hits all of them alike. ``sync`` (e.g. ``torch.cuda.synchronize``) runs before each clock
    reading, so asynchronous GPU work is timed and not only its launch."""
    wait = sync or (lambda: None)
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            wait()
            t = time.perf_counter()
            fn()
            wait()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}
