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


def test_batch_size_from_a_memory_budget():
    from deepvis.runtime import choose_batch_size

    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert choose_batch_size(cpu, 10**6, cpu_batch=8) == 8  # the CPU keeps its micro-batches
    gib = 2**30
    assert choose_batch_size(gpu, 100 * 2**20, cpu_batch=8, free_bytes=4 * gib) == 30  # 0.75 x 4 GiB / 100 MiB
    assert choose_batch_size(gpu, 2**20, cpu_batch=8, free_bytes=80 * gib, upper=256) == 256
    assert choose_batch_size(gpu, 8 * gib, cpu_batch=8, free_bytes=4 * gib) == 1


def test_halve_on_oom_retries_smaller_then_says_so():
    from deepvis.errors import DeepvisError
    from deepvis.runtime import halve_on_oom

    tried = []

    def run(batch):
        tried.append(batch)
        if batch > 5:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return batch

    assert halve_on_oom(run, 32, what="the optimize batch") == 4 and tried == [32, 16, 8, 4]

    def never(batch):
        raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(DeepvisError, match="the optimize batch does not fit"):
        halve_on_oom(never, 4, what="the optimize batch")
