"""Half-precision models (bfloat16, float16) and autocast, on the CPU: known answers against float32.

bfloat16 keeps 8 significant bits, so captured values agree with float32 within about 1% of the
layer's largest magnitude; the optimized image and its optimizer state stay float32 whatever the model.
"""

from __future__ import annotations

import copy
import sqlite3
from dataclasses import replace

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


# -- autocast in the statistics passes (atlas mining, the report's scan) and on the commands ----------
# A model whose answers are known: a 1x1 convolution with weights [I; -I] (no bias), so unit c < 3 is
# input channel c and unit 3 + c its negative. Every image is flat, channel c at a planted level (a
# permutation of 0, 20, ..., 220): unit c's top inputs are the images with the brightest channel c,
# unit 3 + c's the darkest, 20 levels (0.16 after normalization) apart, far above bfloat16's rounding.
PLANTED_SOURCE = """
from collections import OrderedDict

import torch
from torch import nn
from deepvis.models import Model, Preprocessing


def planted():
    conv = nn.Conv2d(3, 6, 1, bias=False)
    with torch.no_grad():
        eye = torch.eye(3).view(3, 3, 1, 1)
        conv.weight.copy_(torch.cat([eye, -eye]))
    pre = Preprocessing((16, 16), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0)
    return Model(nn.Sequential(OrderedDict(mix=conv)).eval(), pre, name="planted")
"""
PLANTED_N = 12


def _planted_levels() -> np.ndarray:
    """(images, 3) the planted level of each image's channels, 0-255."""
    rng = np.random.default_rng(3)
    return np.stack([rng.permutation(PLANTED_N) * 20 for _ in range(3)], 1)


def _planted(tmp_path):
    """(model spec, dataset folder, the expected top-3 image keys of each of the 6 units, best first)."""
    (tmp_path / "planted_model.py").write_text(PLANTED_SOURCE)
    data = tmp_path / "planted"
    data.mkdir()
    levels = _planted_levels()
    for i, lv in enumerate(levels):
        Image.fromarray(np.broadcast_to(lv.astype(np.uint8), (16, 16, 3)).copy()).save(data / f"im{i:02d}.png")
    expected = [[f"im{i:02d}.png" for i in np.argsort(-levels[:, c])[:3]] for c in range(3)]
    expected += [[f"im{i:02d}.png" for i in np.argsort(levels[:, c])[:3]] for c in range(3)]
    return f"{tmp_path / 'planted_model.py'}:planted", data, expected


def _tops(root) -> tuple[list[list[str]], list[list[float]], dict]:
    with open_atlas(root) as atlas:
        units = [atlas.unit("mix", u) for u in range(6)]
        return [[t.key for t in u.top] for u in units], [[t.value for t in u.top] for u in units], dict(atlas.meta)


def test_autocast_mining_finds_the_planted_top_images_in_float32(tmp_path):
    from deepvis.models import load_model

    spec, data, expected = _planted(tmp_path)
    model = load_model(spec, device="cpu")
    options = AtlasOptions(layers=("mix",), top=3, batch_size=5, views=False, synthesis=None, decode_threads=0)
    build_atlas(tmp_path / "fp32", model, str(data), options)
    build_atlas(tmp_path / "bf16", model, str(data), replace(options, autocast=torch.bfloat16))
    keys32, values32, meta32 = _tops(tmp_path / "fp32")
    keys16, values16, meta16 = _tops(tmp_path / "bf16")
    assert keys32 == expected and keys16 == expected
    assert meta32["autocast"] is None and meta16["autocast"] == "bf16"  # the dtype is recorded as its word
    v32, v16 = np.array(values32), np.array(values16)

    def norm(levels):
        return (np.array(levels) / 255 - 0.5) / 0.5

    known = np.array([norm([220, 200, 180])] * 3 + [-norm([0, 20, 40])] * 3)  # the brightest and the darkest levels
    assert np.allclose(v32, known, atol=1e-6)
    assert np.allclose(v16, known, atol=BF16_TOL) and not np.array_equal(v16, v32)  # the forward pass ran in bfloat16
    # the statistics add up in float32 / exact sums: the means are those of the bfloat16 values, not bfloat16 sums
    with open_atlas(tmp_path / "bf16") as atlas:
        means = [atlas.unit("mix", u).stats.mean for u in range(6)]
    flat = (_planted_levels() / 255 - 0.5) / 0.5
    want = np.concatenate([flat.mean(0), -flat.mean(0)])
    assert np.allclose(means, want, atol=BF16_TOL)


def test_the_scan_takes_autocast_and_keeps_float32_states(tmp_path):
    from deepvis.analysis.scan import scan_dataset
    from deepvis.datasets import open_dataset
    from deepvis.models import load_model
    from deepvis.stats import LocalEngine

    spec, data, expected = _planted(tmp_path)
    model = load_model(spec, device="cpu")
    ds = open_dataset(str(data))
    results = {}
    for mixed in (None, "bf16"):
        with LocalEngine(model, ds, decode_threads=0) as eng:
            results[mixed] = scan_dataset(model, ds, range(len(ds)), ["mix"], eng, batch_size=5, top_k=3, thumbnails=False, autocast=mixed)
    a, b = results[None], results["bf16"]
    keys = [[ds.samples[int(s)].key for s in row] for row in b.activity["mix"].top_samples]
    assert keys == expected
    assert np.array_equal(a.activity["mix"].top_samples, b.activity["mix"].top_samples)
    assert b.features["mix"].dtype == np.float32 and b.activity["mix"].top_values.dtype == a.activity["mix"].top_values.dtype
    assert np.allclose(a.features["mix"], b.features["mix"], atol=BF16_TOL) and not np.array_equal(a.features["mix"], b.features["mix"])
    with pytest.raises(DeepvisError, match="unknown autocast"):
        scan_dataset(model, ds, range(2), ["mix"], LocalEngine(model, ds, decode_threads=0), autocast="fp8")


def test_a_resume_with_another_autocast_is_refused_or_allowed(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    _dataset(data, 4)
    options = AtlasOptions(layers=("5",), top=2, batch_size=2, views=False, synthesis=None, decode_threads=0, autocast="bf16")
    build_atlas(tmp_path / "a", _model(), str(data), options)
    build_atlas(tmp_path / "a", _model(), str(data), options)  # the same setting resumes
    with pytest.raises(AtlasError, match="was mined with autocast bf16, this run with off") as exc:
        build_atlas(tmp_path / "a", _model(), str(data), replace(options, autocast=None))
    assert "\n" not in str(exc.value)
    build_atlas(tmp_path / "a", _model(), str(data), replace(options, autocast=None), allow_other_autocast=True)
    with open_atlas(tmp_path / "a") as atlas:
        assert atlas.meta["autocast"] == "bf16"  # the setting it was mined with stays recorded
    # an atlas from before autocast was recorded was mined without it
    build_atlas(tmp_path / "b", _model(), str(data), replace(options, autocast=None))
    with sqlite3.connect(tmp_path / "b" / "index.sqlite") as c:
        c.execute("DELETE FROM meta WHERE key = 'autocast'")
    build_atlas(tmp_path / "b", _model(), str(data), replace(options, autocast=None))
    with pytest.raises(AtlasError, match="was mined with autocast off, this run with fp16"):
        build_atlas(tmp_path / "b", _model(), str(data), replace(options, autocast="fp16"))
    with pytest.raises(DeepvisError, match="unknown autocast 'half'"):
        AtlasOptions(layers=("5",), autocast="half")


def test_the_autocast_option_reaches_the_library(tmp_path, monkeypatch, capsys):
    import json

    import deepvis.activations
    from deepvis.cli import build_parser, main
    from deepvis.cli.common import AUTOCAST_CHOICES
    from deepvis.runtime import AUTOCAST_DTYPES

    assert tuple(AUTOCAST_DTYPES) == AUTOCAST_CHOICES
    spec, data, expected = _planted(tmp_path)
    # atlas: mined under bf16, recorded, the planted answers found; a resume without it is refused in one line
    out = tmp_path / "atlas"
    base = ["atlas", str(data), "--model", spec, "--layers", "mix", "-k", "3", "--batch-size", "5", "--decode-threads", "0"]
    assert main([*base, "-o", str(out), "--no-views", "--no-synthesis", "--autocast", "bf16"]) == 0
    keys, values, meta = _tops(out)
    assert meta["autocast"] == "bf16" and keys == expected
    capsys.readouterr()
    assert main([*base, "-o", str(out), "--no-synthesis"]) == 2
    err = capsys.readouterr().err.strip()
    assert "mined with autocast bf16, this run with off" in err and "--allow-other-autocast" in err and "\n" not in err
    assert main([*base, "-o", str(out), "--no-synthesis", "--allow-other-autocast"]) == 0
    # report: the scan runs under it and the settings record it
    rep = tmp_path / "report.html"
    args = ["report", str(data), "--model", spec, "--layers", "mix", "-o", str(rep), "--epsilons", "0", "--clusters", "2"]
    assert main([*args, "--no-progress", "--decode-threads", "0", "--autocast", "bf16"]) == 0
    settings = json.loads(rep.with_suffix(".json").read_text())["settings"]
    assert settings["autocast"] == "bf16"
    # activations: capture gets the setting
    seen = []
    real = deepvis.activations.capture

    def spy(*a, **kw):
        seen.append(kw.get("autocast"))
        return real(*a, **kw)

    monkeypatch.setattr(deepvis.activations, "capture", spy)
    png = tmp_path / "grid.png"
    image = str(data / "im00.png")
    assert main(["activations", image, "--model", spec, "--layer", "mix", "-o", str(png), "-k", "0", "--autocast", "bf16"]) == 0
    assert seen == ["bf16"] and png.stat().st_size > 0
    # serve: the option lands in the server's config; bad words are refused by argparse
    p = build_parser()
    assert p.parse_args(["serve", "--autocast", "fp16"]).autocast == "fp16"
    assert p.parse_args(["serve"]).autocast is None
    with pytest.raises(SystemExit):
        p.parse_args(["atlas", "x", "--layers", "a", "-o", "y", "--autocast", "fp8"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        p.parse_args(["report", "--help"])
    assert "on the CPU bf16 is the useful one" in " ".join(capsys.readouterr().out.split())


def test_the_server_runs_its_frames_under_the_configured_autocast():
    from deepvis.server import ServerConfig, create_app

    app = create_app(ServerConfig(model=_model(), autocast="bf16", backprop=False, synthesis=False))
    try:
        assert app.state.toolbox.engine.processor.autocast == "bf16"
    finally:
        app.state.toolbox.close()


def test_a_ray_worker_mines_under_the_plans_autocast(tmp_path):
    # the plan carries the setting to Ray's workers: a worker (called here without Ray) gives the
    # local engine's bfloat16 states, bit for bit, and they differ from float32 ones
    from deepvis.atlas.mining import MiningPlan
    from deepvis.datasets import open_dataset
    from deepvis.models import load_model
    from deepvis.stats import LayerStats, LocalEngine
    from deepvis.stats.engines import _batch_samples, _Worker

    spec, data, _expected = _planted(tmp_path)
    model = load_model(spec, device="cpu")
    ds = open_dataset(str(data))
    jobs = _batch_samples(range(3), 5, range(len(ds)))
    got = {}
    for mixed in (None, "bf16"):
        plan = MiningPlan({"mix": (6, (16, 16))}, 3, 5, mixed)
        parts, images, _skipped = _Worker(model, ds, 0, 0).mine(plan, ["mix"], jobs)
        assert images == PLANTED_N
        remote = LayerStats.from_bytes("mix", parts["mix"])
        local = plan.empty_states()
        for _ in LocalEngine(model, ds, decode_threads=0).mine(plan, local, range(3)):
            pass
        assert torch.equal(remote.topk.values, local["mix"].topk.values)
        got[mixed] = remote.topk.values
    assert not torch.equal(got[None], got["bf16"]) and torch.allclose(got[None], got["bf16"], atol=BF16_TOL)
