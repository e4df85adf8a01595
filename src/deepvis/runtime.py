"""Run-time choices: the compute device.

No device is chosen at import time: every entry point takes ``device="auto"`` and resolves it when
called.
"""

from __future__ import annotations

import torch

from .errors import DeepvisError

__all__ = ["resolve_device"]


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
