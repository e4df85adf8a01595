"""Test helpers: hook checks, model snapshots and waiting for a condition."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import nn


def hooks_left(module: nn.Module) -> list[str]:
    """Names of submodules that still carry any hook."""
    left = []
    for name, m in module.named_modules():
        for attr in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if len(getattr(m, attr, {}) or {}):
                left.append(f"{name or '<root>'}.{attr}")
    return left


def snapshot(module: nn.Module) -> dict[str, object]:
    """What deepvis must leave unchanged: training flags, requires_grad flags, parameter values."""
    return {
        "training": [m.training for m in module.modules()],
        "requires_grad": [p.requires_grad for p in module.parameters()],
        "params": [p.detach().clone() for p in module.parameters()],
        "types": [type(m) for m in module.modules()],
    }


def assert_unchanged(module: nn.Module, before: dict[str, object]) -> None:
    after = snapshot(module)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["types"] == before["types"]
    for a, b in zip(after["params"], before["params"]):  # type: ignore[arg-type]
        assert torch.equal(a, b)
    assert hooks_left(module) == []


def wait_for(cond: Callable[[], object], timeout: float = 30.0) -> bool:
    """Poll ``cond()`` every 10 ms until it is truthy or ``timeout`` seconds have passed; its last answer, as a bool."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return bool(cond())
