"""CPU and CUDA give the same results (within float32 rounding, TF32 off). Skipped where there is no GPU.

Tolerances: relative to the largest magnitude of the CPU result; cuDNN and CPU kernels sum in other
orders, so bit equality is not expected across devices (it is within one device, in deterministic mode).
"""

from __future__ import annotations

import pytest
import torch

from deepvis.runtime import deterministic

pytestmark = pytest.mark.cuda

TOL = 1e-3


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


@pytest.fixture()
def pair(default_model):
    """The default model on the CPU and a copy on CUDA."""
    import copy

    gpu = copy.deepcopy(default_model).to("cuda")
    yield default_model, gpu
    del gpu
    torch.cuda.empty_cache()


def test_capture_matches(pair, sample_images):
    from deepvis.capture import capture

    cpu, gpu = pair
    x = cpu.preprocess(sample_images["coffee"])
    names = ["blocks.1", "blocks.3", "blocks.5", "logits"]
    with deterministic():
        a, b = capture(cpu, x, names), capture(gpu, x.cuda(), names)
    for n in names:
        assert b[n].device.type == "cuda"
        assert _rel(a[n], b[n]) < TOL, n


@pytest.mark.parametrize("mode", ["gradient", "deconv", "guided"])
def test_backprop_views_match(pair, sample_images, mode):
    from deepvis.backprop import backprop_view

    cpu, gpu = pair
    x = cpu.preprocess(sample_images["coffee"])
    with deterministic():
        a = backprop_view(cpu, x, "blocks.3:7@7,7", mode).grad
        b = backprop_view(gpu, x.cuda(), "blocks.3:7@7,7", mode).grad
    assert _rel(a, b) < TOL


def test_receptive_fields_match(pair):
    from deepvis.backprop import layer_field

    cpu, gpu = pair
    for layer in ("blocks.2", "blocks.4"):
        a, b = layer_field(cpu, layer, method="probe"), layer_field(gpu, layer, method="probe")
        assert (a.size, a.stride, a.offset) == (b.size, b.stride, b.offset), layer


def test_optimize_batched_equals_alone_and_repeats(pair):
    from deepvis.optimize import visualize

    _, gpu = pair
    units = ["blocks.3:1", "blocks.3:2", "logits:281"]
    with deterministic():
        together = [r.image for r in visualize(gpu, units, steps=6, size=64, batch_size=3)]
        again = [r.image for r in visualize(gpu, units, steps=6, size=64, batch_size=3)]
        alone = [r.image for r in visualize(gpu, units, steps=6, size=64, batch_size=1)]
    for t, a, s in zip(together, again, alone, strict=True):
        assert torch.equal(t, a)  # same device, deterministic mode: bit for bit
        assert float((t - s).abs().max()) <= 2.0  # of 255: batching changes only the summation order


def test_mining_top_k_matches(pair):
    from deepvis.capture import layer_table
    from deepvis.datasets import open_dataset
    from deepvis.stats import LayerStats, mine

    ds = open_dataset("demo")
    tops = []
    for model in pair:
        info = {i.name: i for i in layer_table(model)}["blocks.3"]
        states = {"blocks.3": LayerStats("blocks.3", info.units, 9, info.shape[1:], model.device)}
        with deterministic():
            for _ in mine(model, ds, states, range(2), 16, indices=range(32), workers=1):
                pass
        tops.append(states["blocks.3"])
    a, b = tops
    same = sum([s for _, s, _ in a.top(u)] == [s for _, s, _ in b.top(u)] for u in range(a.units))
    assert same >= 0.95 * a.units  # near-ties may swap across devices
    for u in range(a.units):
        for (va, _, _), (vb, _, _) in zip(a.top(u), b.top(u), strict=True):
            assert abs(va - vb) <= TOL * max(1.0, abs(va))


@pytest.mark.parametrize(("mixed", "tol", "same_best"), [("fp16", 1e-2, 0.95), ("bf16", 5e-2, 0.85)])
def test_autocast_mining_finds_the_float32_top_k(pair, mixed, tol, same_best):
    # fp16 / bf16 autocast mining on CUDA vs float32 mining on CUDA: the best input of almost every
    # unit, values within the dtype's precision of the layer's largest, the states still float32
    from deepvis.capture import layer_table
    from deepvis.datasets import open_dataset
    from deepvis.stats import LayerStats, mine

    _cpu, gpu = pair
    ds = open_dataset("demo")
    info = {i.name: i for i in layer_table(gpu)}["blocks.3"]
    tops = {}
    for setting in (None, mixed):
        states = {"blocks.3": LayerStats("blocks.3", info.units, 9, info.shape[1:], gpu.device)}
        for _ in mine(gpu, ds, states, range(4), 16, indices=range(64), workers=1, autocast=setting):
            pass
        tops[setting] = states["blocks.3"]
    a, b = tops[None], tops[mixed]
    assert b.topk.values.dtype == torch.float32 and b.topk.values.device == gpu.device
    assert sum(a.top(u)[0][1] == b.top(u)[0][1] for u in range(a.units)) >= same_best * a.units
    scale = float(a.topk.values.abs().max())
    assert float((a.topk.values - b.topk.values).abs().max()) <= tol * scale
    assert not torch.equal(a.topk.values, b.topk.values)  # the forward pass did run in the lower precision


def test_live_frame_matches(pair, sample_images):
    from deepvis.server.frames import FrameProcessor
    from deepvis.server.protocol import ViewSettings

    cpu, gpu = pair
    settings = ViewSettings(layer="blocks.3")
    outs = []
    for model in pair:
        proc = FrameProcessor(model)
        outs.append(proc.process(proc.to_input(sample_images["coffee"]), settings))
    a, b = outs
    assert [p["index"] for p in a.header["predictions"][:3]] == [p["index"] for p in b.header["predictions"][:3]]
    assert a.header["layer"] == b.header["layer"] == "blocks.3"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_models_on_cuda(pair, sample_images, dtype):
    import copy

    from deepvis.capture import capture, layer_table
    from deepvis.optimize import visualize

    cpu, gpu = pair
    half = copy.deepcopy(gpu)
    half.module.to(dtype)
    assert [i.shape for i in layer_table(half)] == [i.shape for i in layer_table(cpu)]
    x = half.preprocess(sample_images["coffee"])
    assert x.dtype == dtype and x.device.type == "cuda"
    a, b = capture(cpu, cpu.preprocess(sample_images["coffee"]), ["blocks.3", "logits"]), capture(half, x, ["blocks.3", "logits"])
    assert _rel(a["blocks.3"], b["blocks.3"]) < 5e-2 and _rel(a["logits"], b["logits"]) < 5e-2
    r = visualize(half, ["blocks.3:1"], steps=4, size=64)[0]
    assert r.image.dtype == torch.float32 and r.trace[-1] >= r.trace[0]


def test_autocast_on_cuda(pair, sample_images):
    from deepvis.capture import capture

    cpu, gpu = pair
    x = cpu.preprocess(sample_images["coffee"])
    a = capture(cpu, x, ["blocks.3"])["blocks.3"]
    for mixed in ("fp16", "bf16"):
        b = capture(gpu, x.cuda(), ["blocks.3"], autocast=mixed)["blocks.3"]
        assert b.dtype != torch.float32 and _rel(a, b) < 5e-2, mixed


def test_server_replicas_share_cuda_storage(pair):
    from deepvis.server.engine import replica

    _, gpu = pair
    before = torch.cuda.memory_allocated()
    copies = [replica(gpu) for _ in range(3)]
    assert torch.cuda.memory_allocated() - before < 2**20  # no weights copied
    ptrs = [p.data_ptr() for p in gpu.module.parameters()]
    assert all([p.data_ptr() for p in c.module.parameters()] == ptrs for c in copies)


def test_batch_sizes_follow_free_memory(pair):
    from deepvis.optimize.loop import auto_micro_batch
    from deepvis.server.synthesis import synthesis_batch

    _, gpu = pair
    assert 1 <= auto_micro_batch(gpu.device, (224, 224), gpu) <= 256
    assert 1 <= synthesis_batch(gpu) <= 64
