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


def test_a_batch_size_estimate_is_made_only_when_a_device_budget_exists():
    from deepvis.runtime import choose_batch_size, item_bytes

    assert item_bytes([(8, 4, 4), (16,)], 4) == (128 + 16) * 4
    assert item_bytes([(8, 4, 4)], 2, backward=True) == 128 * 2 * 2

    def estimate():
        raise AssertionError("not on the CPU")

    assert choose_batch_size(torch.device("cpu"), estimate, cpu_batch=8) == 8
    assert choose_batch_size(torch.device("cuda"), lambda: 2**20, cpu_batch=8, free_bytes=2**24) == 12


def test_autocast_settings():
    from deepvis.errors import DeepvisError
    from deepvis.runtime import autocast, autocast_dtype

    assert autocast_dtype(None) is None and autocast_dtype("BF16") == torch.bfloat16 and autocast_dtype(torch.float16) == torch.float16
    with pytest.raises(DeepvisError, match="unknown autocast 'fp8': use bf16 or fp16"):
        autocast_dtype("fp8")
    with pytest.raises(DeepvisError, match="not supported"):
        autocast_dtype(torch.float64)
    with autocast(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with autocast(torch.device("cpu"), None):
        assert not torch.is_autocast_enabled("cpu")


def test_the_deterministic_option_wraps_the_whole_command():
    import argparse

    from deepvis.cli.common import add_model_options, run_command

    p = argparse.ArgumentParser()
    add_model_options(p)
    seen = []
    p.set_defaults(func=lambda args: seen.append(torch.backends.cudnn.deterministic) or 0)
    before = _settings()
    assert run_command(p.parse_args(["--deterministic"])) == 0
    assert _settings() == before
    run_command(p.parse_args([]))
    assert seen == [True, before[0]]


def _tiny_model():
    from torch import nn

    from deepvis.models.model import Model
    from deepvis.models.preprocessing import Preprocessing

    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 32 * 32, 4)
    )
    return Model(net.eval(), Preprocessing(input_size=(32, 32)))


def test_batch_sizes_follow_a_faked_device_budget(monkeypatch):
    import deepvis.runtime
    from deepvis.backprop.receptive import _probe_batch
    from deepvis.capture.layers import activation_bytes
    from deepvis.optimize.loop import auto_micro_batch
    from deepvis.server.synthesis import synthesis_batch

    model = _tiny_model()
    cpu = torch.device("cpu")
    # the CPU values as they were: no budget
    assert auto_micro_batch(cpu, (32, 32), model) == 32 and auto_micro_batch(cpu, (448, 448), model) == 8
    assert synthesis_batch(model) == 8
    assert _probe_batch(model, "2", (3, 32, 32)) == 64
    per_item = activation_bytes(model, (3, 32, 32), backward=True)
    assert per_item == 2 * 4 * (3 * 32 * 32 + 4 * 8 * 32 * 32 + 8 * 32 * 32 + 4)  # input, 4 maps, the flattened map, the logits (once)
    for budget in (per_item * 4, per_item * 40):
        monkeypatch.setattr(deepvis.runtime, "free_memory", lambda device, budget=budget: budget)
        want = int(budget * 0.75) // per_item
        assert auto_micro_batch(cpu, (32, 32), model) == want
        assert synthesis_batch(model) == want
        assert 1 <= _probe_batch(model, "2", (3, 32, 32)) <= 256
    monkeypatch.setattr(deepvis.runtime, "free_memory", lambda device: 10**15)
    assert auto_micro_batch(cpu, (32, 32), model) == 256 and synthesis_batch(model) == 64


def test_halve_on_oom_tells_the_size_it_settled_on(capsys):
    from deepvis.runtime import halve_on_oom, oom_note

    told = []
    assert halve_on_oom(lambda b: b, 8, what="x", on_smaller=lambda a, u: told.append((a, u))) == 8 and told == []
    assert halve_on_oom(lambda b: b if b <= 3 else _oom(), 12, what="x", on_smaller=lambda a, u: told.append((a, u))) == 3
    assert told == [(12, 3)]
    halve_on_oom(lambda b: b if b <= 2 else _oom(), 8, what="the batch", on_smaller=oom_note("the batch"))
    assert capsys.readouterr().err == "deepvis: note: the batch did not fit in the device's memory 8 at a time: running 2 at a time\n"


def _oom():
    raise torch.OutOfMemoryError("CUDA out of memory (faked)")


def test_the_optimize_loop_retries_a_batch_that_runs_out_of_memory_in_halves(monkeypatch, capsys):
    # a fake device that holds a forward and backward pass over at most 2 images: the loop settles on
    # 2 per pass, says so once, and its results are those of a run with micro batches of 2 (bit for
    # bit) and of the unsplit run (batched equals alone: within float rounding)
    import copy

    from torch import nn

    import deepvis.optimize.loop as loop
    from deepvis.models.model import Model
    from deepvis.models.preprocessing import Preprocessing
    from deepvis.optimize import visualize

    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()).eval()
    model = Model(copy.deepcopy(net), Preprocessing(input_size=(32, 32)), name="tiny")
    units = [f"3:{u}" for u in range(5)]
    kw = dict(preset="1", steps=4, size=32, seed=3)
    unsplit = visualize(model, units, batch_size=5, micro_batch=8, **kw)
    by_two = visualize(model, units, batch_size=5, micro_batch=2, **kw)
    passes = []
    real = loop.capture

    def small_device(m, x, *a, **k):
        passes.append(x.shape[0])
        if x.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (faked)")
        return real(m, x, *a, **k)

    monkeypatch.setattr(loop, "capture", small_device)
    capsys.readouterr()
    fitted = visualize(model, units, batch_size=5, micro_batch=8, **kw)
    err = capsys.readouterr().err
    assert passes[:4] == [5, 2, 2, 1] and max(passes[4:]) <= 2  # 5 fails, then 2+2+1 per step from then on
    assert err.count("did not fit in the device's memory") == 1 and "5 at a time: running 2 at a time" in err
    for a, b, c in zip(fitted, by_two, unsplit, strict=True):
        assert torch.equal(a.image, b.image) and a.trace == b.trace
        assert torch.allclose(a.image, c.image, atol=1e-3) and a.best_step == c.best_step
