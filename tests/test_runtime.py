"""Run-time settings: device synchronization and the deterministic mode, applied and restored."""

from __future__ import annotations

import os

import pytest
import torch

from deepvis.runtime import deterministic, resolve_device, synchronize


def test_synchronize_waits_on_cuda_only(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: calls.append(device))
    synchronize(torch.device("cpu"))
    assert calls == []
    synchronize(torch.device("cuda", 1))  # a device object can name CUDA without a GPU present
    assert calls == [torch.device("cuda", 1)]


def _settings():
    b = torch.backends
    return (
        b.cudnn.deterministic,
        b.cudnn.benchmark,
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        b.cuda.matmul.fp32_precision,
        b.cudnn.conv.fp32_precision,
        os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
    )


def test_deterministic_applies_and_restores_every_setting(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    torch.backends.cudnn.benchmark = True  # a user's own choice, to be restored
    try:
        before = _settings()
        with deterministic():
            inside = _settings()
        assert _settings() == before
        assert inside[:4] == (True, False, True, True)
        assert inside[4] == inside[5] == "ieee"  # no TF32 in matmuls or convolutions
        assert inside[6] == ":4096:8"
        with pytest.raises(RuntimeError, match="boom"), deterministic():
            raise RuntimeError("boom")
        assert _settings() == before
        with deterministic(False):
            assert _settings() == before
    finally:
        torch.backends.cudnn.benchmark = False


def test_deterministic_keeps_a_users_cublas_setting(monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
    with deterministic():
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"


def test_resolve_device_errors_are_one_line():
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(Exception, match="unknown device 'gpu7'"):
        resolve_device("gpu7")
