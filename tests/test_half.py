"""Half-precision models (bfloat16, float16) and autocast, on the CPU: known answers against float32.

bfloat16 keeps 8 significant bits, so captured values agree with float32 within about 1% of the
layer's largest magnitude; the optimized image and its optimizer state stay float32 whatever the model.
"""

from __future__ import annotations

import copy
import sqlite3

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deepvis.atlas import AtlasOptions, build_atlas, open_atlas
from deepvis.atlas.store import AtlasError
from deepvis.capture import Unit, capture, layer_table
from deepvis.errors import DeepvisError
from deepvis.models.model import Model
from deepvis.models.preprocessing import Preprocessing
from deepvis.optimize import Settings, visualize
from deepvis.server.frames import FrameProcessor
from deepvis.server.protocol import ViewSettings

#: agreement of a bfloat16 result with float32, relative to the float32 result's largest magnitude
BF16_TOL = 2e-2
FP16_TOL = 2e-3


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    ).eval()


def _model(dtype: torch.dtype = torch.float32) -> Model:
    return Model(copy.deepcopy(_net()).to(dtype), Preprocessing(input_size=(32, 32)), name="tiny", class_names=[f"c{i}" for i in range(10)])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_models_pass_the_layer_probe_with_the_same_table(dtype):
    full, half = layer_table(_model()), layer_table(_model(dtype))
    assert [(i.name, i.shape, i.layout.kind) for i in half] == [(i.name, i.shape, i.layout.kind) for i in full]


@pytest.mark.parametrize(("dtype", "tol"), [(torch.bfloat16, BF16_TOL), (torch.float16, FP16_TOL)])
def test_half_capture_is_close_to_float32(dtype, tol):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    names = ["2", "5", "logits"]
    full = capture(_model(), x, names)
    half = capture(_model(dtype), x, names)  # a float32 input is cast to the model's dtype
    for n in names:
        assert half[n].dtype == dtype
        assert _rel(full[n], half[n]) < tol, n


def test_preprocess_makes_inputs_in_the_model_dtype():
    im = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    full, half = _model(), _model(torch.bfloat16)
    assert half.dtype == torch.bfloat16 and full.dtype == torch.float32
    xh, xf = half.preprocess(im), full.preprocess(im)
    assert xh.dtype == torch.bfloat16 and xf.dtype == torch.float32
    assert torch.equal(xh, xf.to(torch.bfloat16))  # normalized in float32, then cast


def test_autocast_capture_on_the_cpu():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    model = _model()
    full = capture(model, x, ["5", "logits"])
    mixed = capture(model, x, ["5", "logits"], autocast="bf16")
    assert mixed["5"].dtype == torch.bfloat16 and full["5"].dtype == torch.float32
    assert _rel(full["5"], mixed["5"]) < BF16_TOL and _rel(full["logits"], mixed["logits"]) < BF16_TOL
    assert all(p.dtype == torch.float32 for p in model.module.parameters())  # weights untouched
    assert not torch.is_autocast_enabled("cpu")  # only for the forward pass
    with pytest.raises(DeepvisError, match="unknown autocast"):
        capture(model, x, ["5"], autocast="fp8")


def _linear_model(dtype: torch.dtype) -> Model:
    """value = sum over channels of the input at the unit's pixel (a 1x1 convolution of ones); inputs
    normalized with mean 0.5 and std 0.5, so a pixel's gradient is 2/255 (the pixel scale)."""
    conv = nn.Conv2d(3, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    pre = Preprocessing(input_size=(8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), crop_pct=1.0)
    return Model(nn.Sequential(conv).to(dtype), pre, name="linear")


def test_a_step_that_bfloat16_would_swallow_still_moves_the_float32_image():
    # each step moves the unit's pixel by lr * 2/255 = 0.001 of a level; the image lives as levels from
    # the mean image (127.5), where the start noise puts the pixel more than half a level away: there
    # bfloat16's spacing is at least 1/256, so a bfloat16 image would swallow every step
    lr, steps = 0.1275, 120
    step = lr * 2 / 255
    settings = Settings(lr=lr, steps=steps)
    unit = [Unit("0", 0, (4, 4))]
    results = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        model = _linear_model(dtype)
        start = visualize(model, unit, preset=settings.replace(steps=1), progress=lambda *_: None)[0].image
        r = visualize(model, unit, preset=settings, progress=lambda *_: None)[0]
        assert r.image.dtype == torch.float32 and start.dtype == torch.float32
        results[name] = (start, r)
    start, r = results["bf16"]
    centre = start[:, 4, 4] - 127.5  # the optimized values: levels from the mean
    assert bool((centre.abs() > 0.5).all()), centre
    swallowed = centre.to(torch.bfloat16) + torch.tensor(step, dtype=torch.bfloat16)
    assert torch.equal(swallowed, centre.to(torch.bfloat16))  # what a bfloat16 image would do
    assert r.best_step > 0 and r.trace[-1] > r.trace[0]  # the value rose: the image moved
    moved = r.image - start
    assert torch.allclose(moved[:, 4, 4], torch.full((3,), r.best_step * step), rtol=1e-2)
    moved[:, 4, 4] = 0
    assert float(moved.abs().max()) == 0.0  # nothing else has a gradient
    fp32_start, fp32 = results["fp32"]
    assert torch.equal(fp32_start, start)  # float32 and bfloat16 models start alike
    assert torch.allclose(fp32.image[:, 4, 4] - start[:, 4, 4], torch.full((3,), fp32.best_step * step), rtol=1e-2)


@pytest.mark.parametrize("autocast", [None, "bf16"])
def test_the_live_frame_works_with_bfloat16(autocast):
    full = FrameProcessor(_model())
    half = FrameProcessor(_model(torch.bfloat16) if autocast is None else _model(), autocast=autocast)
    im = Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    x = full.to_input(im)
    assert half.to_input(im).dtype == half.model.dtype
    s = ViewSettings(layer="4", unit=3)
    a, b = full.process(x, s), half.process(half.to_input(im), s)
    ga, gb = (np.frombuffer(o.blobs["grid"], np.uint8).astype(int) for o in (a, b))
    assert np.abs(ga - gb).max() <= 8  # bfloat16's 1% of the layer's range is ~3 of 255 levels
    assert a.header["unit_stats"]["max"] == pytest.approx(b.header["unit_stats"]["max"], rel=BF16_TOL, abs=1e-2)
    assert len(b.header["predictions"]) == 5


def _dataset(root, n: int = 8) -> None:
    rng = np.random.default_rng(0)
    for k in range(n):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(root / f"im{k}.png")


def test_mining_a_bfloat16_model_finds_the_float32_top_images(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _dataset(data)
    options = AtlasOptions(layers=("5",), top=3, batch_size=4, views=False, synthesis=None, decode_threads=0)
    tops = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        build_atlas(tmp_path / name, _model(dtype), str(data), options)
        with open_atlas(tmp_path / name) as atlas:
            tops[name] = [[t.key for t in atlas.unit("5", u).top] for u in range(16)]
            values = [atlas.unit("5", u).top[0].value for u in range(16)]
            assert atlas.meta["device"] == "cpu"
            tops[name + "_values"] = values
    same = sum(a[0] == b[0] for a, b in zip(tops["fp32"], tops["bf16"]))
    assert same >= 14  # the best image of almost every unit (near-ties may swap in bfloat16)
    assert np.allclose(tops["fp32_values"], tops["bf16_values"], rtol=BF16_TOL, atol=1e-2)


def test_resuming_an_atlas_on_another_device_type_is_refused_or_allowed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _dataset(data, 4)
    options = AtlasOptions(layers=("5",), top=2, batch_size=2, views=False, synthesis=None, decode_threads=0)
    build_atlas(tmp_path / "a", _model(), str(data), options)
    with sqlite3.connect(tmp_path / "a" / "index.sqlite") as c:  # fake an atlas started on a GPU
        c.execute("UPDATE meta SET value = ? WHERE key = 'device'", ('"cuda"',))
    with pytest.raises(AtlasError, match="was built on cuda, this run is on cpu"):
        build_atlas(tmp_path / "a", _model(), str(data), options)
    build_atlas(tmp_path / "a", _model(), str(data), options, allow_other_device=True)
    with open_atlas(tmp_path / "a") as atlas:
        assert atlas.meta["device"] == "cuda"  # the device it was started on stays recorded
