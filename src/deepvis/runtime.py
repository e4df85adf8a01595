"""Run-time choices: the compute device and deterministic kernels.

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
import os
from collections.abc import Iterator

import torch

from .errors import DeepvisError

__all__ = ["resolve_device", "synchronize", "deterministic"]


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
