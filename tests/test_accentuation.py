"""Feature accentuation (issue 14, item 3): start from a real image, raise the unit, stay within the stated distance."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deepvis.capture import capture
from deepvis.cli import main
from deepvis.errors import DeepvisError
from deepvis.models import Model, Preprocessing
from deepvis.optimize import Settings, StepInfo, visualize
from deepvis.optimize.accentuate import DEFAULT_RADIUS, Accentuation, start_tensor
from deepvis.optimize.regularizers import StayClose
from helpers import assert_unchanged, snapshot


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.conv = nn.Conv2d(3, 4, 5, bias=False)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 3, 5, 5, generator=g) * 0.1)
        self.act = nn.ReLU()
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.act(self.conv(x)).mean((2, 3)))


def tiny_model() -> Model:
    return Model(Tiny(), Preprocessing((17, 17), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 1.0, 3), name="tiny")


def photo(seed: int = 0, size: int = 17) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(3, size, size, generator=g) * 160 + 40).round()


def test_stay_close_projects_into_the_rms_ball():
    x0 = torch.zeros(2, 3, 4, 4)
    x = torch.cat([torch.full((1, 3, 4, 4), 10.0), torch.full((1, 3, 4, 4), 2.0)])
    out = StayClose(x0, 5.0)(x, StepInfo(0, x))
    assert out[0].pow(2).mean().sqrt().item() == pytest.approx(5.0)  # projected onto the sphere
    assert torch.equal(out[1], x[1])  # inside: untouched
    with pytest.raises(ValueError):
        StayClose(x0, 0)


def test_accentuation_raises_the_unit_and_stays_within_the_stated_distance():
    model = tiny_model()
    before = snapshot(model.module)
    start = photo()
    radius = 6.0
    s = Settings(lr=2000.0, steps=30)  # steps large enough to leave the ball: the bound must hold
    (res,) = visualize(model, ["conv:2"], preset=s, size=17, start=start, accentuation=Accentuation(radius=radius, feature_weight=0.5))
    assert_unchanged(model.module, before)
    d = res.distance
    assert d is not None and d["radius"] == radius and d["feature_weight"] == 0.5 and d["feature_layer"] == "conv"
    x = res.image.double()
    rms = (x - start.double()).pow(2).mean().sqrt().item()
    assert rms <= radius + 1e-3 and d["pixel_rms"] == pytest.approx(rms, abs=1e-3)
    assert d["pixel_rms"] > 0.5 * radius  # it did move
    assert d["pixel_max"] == pytest.approx((x - start.double()).abs().max().item(), abs=1e-3)
    assert res.value > res.start_value
    # the start value is the unit on the start image itself
    xin = (start / 255.0 - 0.5) / 0.5
    centre = capture(model, xin[None], ["conv"])["conv"][0, 2, 6, 6].item()
    assert res.start_value == pytest.approx(centre, rel=1e-4, abs=1e-5)
    assert res.to_dict()["accentuation"] == d


def test_the_feature_anchor_keeps_features_closer():
    model = tiny_model()
    s = Settings(lr=300.0, steps=25)
    start = photo(2)
    far = visualize(model, ["conv:1"], preset=s, size=17, start=start, accentuation=Accentuation(radius=40, feature_weight=0.0))[0]
    near = visualize(model, ["conv:1"], preset=s, size=17, start=start, accentuation=Accentuation(radius=40, feature_weight=5.0))[0]
    assert far.distance["feature"] is not None and near.distance["feature"] < far.distance["feature"]  # stated either way
    feat = lambda r: capture(model, ((r.image / 255.0 - 0.5) / 0.5)[None], ["conv"])["conv"]
    ref = capture(model, ((start / 255.0 - 0.5) / 0.5)[None], ["conv"])["conv"]
    rel = lambda r: float((feat(r) - ref).norm() / ref.norm())
    assert rel(near) < rel(far)
    assert near.distance["feature"] == pytest.approx(rel(near), rel=1e-3)


def test_start_images_from_pillow_arrays_and_per_unit_tensors():
    im = Image.fromarray(np.full((40, 30, 3), 77, np.uint8))
    t = start_tensor(im, 3, 3, (17, 17))
    assert t.shape == (3, 3, 17, 17) and float(t.min()) == float(t.max()) == 77
    per = torch.stack([photo(i) for i in range(2)])
    assert torch.equal(start_tensor(per, 2, 3, (17, 17)), per)
    with pytest.raises(DeepvisError, match="2 start images for 3"):
        start_tensor(per, 3, 3, (17, 17))
    with pytest.raises(DeepvisError, match="C = 3"):
        start_tensor(torch.zeros(1, 17, 17), 1, 3, (17, 17))
    model = tiny_model()
    res = visualize(model, ["conv:0", "conv:3"], preset=Settings(lr=50.0, steps=3), size=17, start=per, batch_size=1)
    for r, s in zip(res, per):
        assert (r.image - s).pow(2).mean().sqrt() <= DEFAULT_RADIUS + 1e-3


def test_cli_from_image(tmp_path, capsys):
    out = tmp_path / "a"
    code = main(
        ["optimize", "--layer", "blocks.2", "--units", "1", "--from", "sample:coffee", "--distance", "8"]
        + ["--steps", "4", "--size", "48", "-o", str(out)]
    )
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert "RMS change" in stdout and "of 8 levels" in stdout
    rec = json.loads((out / "blocks.2-1.json").read_text())
    assert rec["start"] == "sample:coffee" and rec["accentuation"]["radius"] == 8.0
    assert rec["accentuation"]["pixel_rms"] <= 8.0 + 1e-3 and rec["value"] >= rec["start_value"]


def test_cli_distance_without_from_is_one_line_exit_2(capsys):
    code = main(["optimize", "--layer", "blocks.2", "--units", "1", "--distance", "8", "-o", "/tmp/never"])
    _, err = capsys.readouterr()
    assert code == 2 and err.strip().count("\n") == 0 and "need --from" in err
