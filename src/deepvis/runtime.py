"""Run-time choices: the compute device, deterministic kernels, autocast and batch sizes.

No device is chosen at import time: every entry point takes ``device="auto"`` and resolves it when
called. Nothing here changes PyTorch's global settings except inside :func:`deterministic`, which
restores them on exit.

Determinism, per device: on the CPU every deepvis result is reproducible with a seed as it is. On
CUDA it is not by default: cuDNN picks algorithms by timing (``benchmark``), some kernels (e.g.
``grid_sample``'s backward) add with atomics in any order, and float32 matmuls and convolutions may
run in TF32. Inside ``deterministic()`` cuDNN is deterministic and does not benchmark, TF32 is off
for matmuls and convolutions, and PyTorch's deterministic algorithms are on with ``warn_only=True``
(an op that has no deterministic form warns instead of failing). Repeated runs on the same GPU,
driver and PyTorch then agree bit for bit; CPU and CUDA results still differ within float32
rounding.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

import torch

from .errors import DeepvisError

_T = TypeVar("_T")

__all__ = [
    "resolve_device",
    "synchronize",
    "deterministic",
    "Autocast",
    "AUTOCAST_DTYPES",
    "autocast_dtype",
    "autocast_name",
    "autocast",
    "free_memory",
    "item_bytes",
    "choose_batch_size",
    "halve_on_oom",
    "oom_note",
]

#: the ``autocast=`` words (and ``--autocast`` choices) and the dtypes they run the forward pass in
AUTOCAST_DTYPES: dict[str, torch.dtype] = {"bf16": torch.bfloat16, "fp16": torch.float16}
#: an autocast setting: None (off), a word of :data:`AUTOCAST_DTYPES`, or ``torch.bfloat16`` / ``torch.float16``
Autocast = None | str | torch.dtype


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """Turn ``"auto"`` (CUDA when available, else CPU), ``"cpu"``, ``"cuda"``, ``"cuda:1"`` into a device."""
    if device is None or (isinstance(device, str) and device == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise DeepvisError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DeepvisError(f"device {device!r} asked for but CUDA is not available here: use --device cpu")
    return dev


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` to finish (CUDA kernels run asynchronously), so that a
    ``time.perf_counter()`` taken next measures the work and not only its launch. A no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _precision_switches() -> list[object]:
    """The backends objects that carry an ``fp32_precision`` switch in this PyTorch (TF32 or IEEE)."""
    b = torch.backends
    found: list[object] = []
    for obj in (b.cuda.matmul, b.cudnn, getattr(b.cudnn, "conv", None), getattr(b.cudnn, "rnn", None)):
        if obj is not None and hasattr(obj, "fp32_precision"):
            found.append(obj)
    return found


@contextlib.contextmanager
def deterministic(enabled: bool = True) -> Iterator[None]:
    """Run the block with deterministic GPU kernels (see the module's notes); every setting it
    changes is restored on exit, also on an exception. ``enabled=False`` changes nothing.

    Sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` when unset (cuBLAS reads it when its first handle is
    made, so it takes effect when the block is the process's first CUDA work).
    """
    if not enabled:
        yield
        return
    cudnn = torch.backends.cudnn
    saved_flags = (cudnn.deterministic, cudnn.benchmark)
    saved_algos = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    switches = _precision_switches()
    saved_precision = [getattr(obj, "fp32_precision") for obj in switches]  # noqa: B009 - checked with hasattr above
    saved_env = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    try:
        cudnn.deterministic, cudnn.benchmark = True, False
        for obj in switches:
            setattr(obj, "fp32_precision", "ieee")  # noqa: B010 - the attribute exists on these objects only
        torch.use_deterministic_algorithms(True, warn_only=True)
        if saved_env is None:
            os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        yield
    finally:
        cudnn.deterministic, cudnn.benchmark = saved_flags
        for obj, value in zip(switches, saved_precision, strict=True):
            setattr(obj, "fp32_precision", value)  # noqa: B010
        torch.use_deterministic_algorithms(saved_algos[0], warn_only=saved_algos[1])
        if saved_env is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def autocast_dtype(value: Autocast) -> torch.dtype | None:
    """The dtype of an autocast setting (None: off); a one-line :class:`DeepvisError` for anything else."""
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value not in AUTOCAST_DTYPES.values():
            raise DeepvisError(f"autocast to {value} is not supported: use torch.bfloat16 or torch.float16")
        return value
    found = AUTOCAST_DTYPES.get(str(value).lower())
    if found is None:
        raise DeepvisError(f"unknown autocast {value!r}: use {' or '.join(AUTOCAST_DTYPES)}")
    return found


def autocast_name(value: Autocast) -> str | None:
    """The word of an autocast setting (``"bf16"``, ``"fp16"``; None: off), as records and options keep
    it (an atlas's metadata, a report's settings); a one-line :class:`DeepvisError` for a bad setting."""
    dtype = autocast_dtype(value)
    if dtype is None:
        return None
    return next(word for word, d in AUTOCAST_DTYPES.items() if d == dtype)


@contextlib.contextmanager
def autocast(device: torch.device, value: Autocast) -> Iterator[None]:
    """Run the block under ``torch.autocast`` on ``device``'s type in ``value``'s dtype (see
    :func:`autocast_dtype`); None changes nothing. Autocast is per thread: enter it in the thread that
    runs the forward pass. Weights stay in their dtype; matmuls and convolutions compute in the lower one."""
    dtype = autocast_dtype(value)
    if dtype is None:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield


def free_memory(device: torch.device) -> int | None:
    """Bytes free on ``device`` now (CUDA: what the driver reports free plus what PyTorch's caching
    allocator holds unused), or None for devices whose memory deepvis does not budget (the CPU)."""
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))


def item_bytes(shapes: Iterable[tuple[int, ...]], element_size: int = 4, *, backward: bool = False) -> int:
    """A rough peak memory of one item, in bytes: the activations it keeps (one per shape, without
    the batch axis) of ``element_size`` bytes each, doubled when a backward pass runs (their
    gradients). An estimate for :func:`choose_batch_size`; :func:`halve_on_oom` covers its errors."""
    total = sum(math.prod(s) for s in shapes) * element_size
    return max(1, total * (2 if backward else 1))


def choose_batch_size(
    device: torch.device,
    bytes_per_item: int | Callable[[], int],
    *,
    cpu_batch: int,
    upper: int = 256,
    headroom: float = 0.75,
    free_bytes: int | None = None,
) -> int:
    """How many items to put in one batch on ``device``.

    On the CPU: ``cpu_batch`` (small batches keep the CPU's caches warm and its progress visible).
    On a GPU: as many items of ``bytes_per_item`` (the peak memory one item costs; a callable is
    called only then, e.g. :func:`deepvis.capture.layers.activation_bytes`) as fit in ``headroom`` of
    the free memory (``free_bytes``, default :func:`free_memory`), at least 1 and at most ``upper``.
    Pair it with :func:`halve_on_oom`, since the estimate can be off.
    """
    free = free_memory(device) if free_bytes is None else free_bytes
    if free is None:
        return max(1, cpu_batch)
    per_item = bytes_per_item() if callable(bytes_per_item) else bytes_per_item
    return int(max(1, min(upper, int(free * headroom) // max(1, per_item))))


def halve_on_oom(run: Callable[[int], _T], batch: int, *, what: str, on_smaller: Callable[[int, int], None] | None = None) -> _T:
    """``run(batch)``, retried with half the batch each time the device runs out of memory; a
    one-line :class:`DeepvisError` (naming ``what``) when even one item does not fit.
    ``on_smaller(asked, used)`` is called once when a smaller batch than asked succeeded (e.g.
    :func:`oom_note`), so that the caller can say so or keep the smaller size."""
    asked = batch
    while True:
        try:
            out = run(batch)
        except torch.OutOfMemoryError as exc:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if batch <= 1:
                raise DeepvisError(
                    f"{what} does not fit in the device's memory even one at a time: use a smaller input size or --device cpu"
                ) from exc
            batch = max(1, batch // 2)
        else:
            if batch < asked and on_smaller is not None:
                on_smaller(asked, batch)
            return out


def oom_note(what: str) -> Callable[[int, int], None]:
    """An ``on_smaller`` for :func:`halve_on_oom` that writes one line on stderr: ``what`` did not fit
    ``asked`` at a time and runs ``used`` at a time from now on."""

    def note(asked: int, used: int) -> None:
        print(f"deepvis: note: {what} did not fit in the device's memory {asked} at a time: running {used} at a time", file=sys.stderr)

    return note
