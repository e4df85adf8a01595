"""Calibration (issue 14, item 1): a unit whose scale is multiplied by a known factor gets the same image
when the presets are calibrated and another one when they are literal; calibration costs one forward
pass without backward per batch; the record says what was measured and what ran."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepvis.models import Model, Preprocessing
from deepvis.optimize import REFERENCE, Settings, get_preset, resolve_targets, visualize
from deepvis.optimize.calibrate import PHOTOS, photo_values
from helpers import hooks_left

SIZE = 20
UNITS = ["out:0", "out:1", "logits:2"]


class _Gain(nn.Module):
    """A conv whose output is multiplied by ``gain``."""

    def __init__(self, conv: nn.Module, gain: float) -> None:
        super().__init__()
        self.conv, self.gain = conv, gain

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) * self.gain


class ScaledNet(nn.Module):
    """A small nonlinear network (conv, ReLU, conv ``out``, mean, linear) whose units are multiplied by
    ``gain``: the layer ``out`` and the logits are ``gain`` times larger in value and gradient, the
    same network at another activation scale."""

    def __init__(self, gain: float) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.conv = nn.Conv2d(3, 6, 5)
        self.out = _Gain(nn.Conv2d(6, 3, 3), gain)
        self.head = nn.Linear(3, 4)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
            self.head.bias.mul_(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.out(torch.relu(self.conv(x))).mean((2, 3)))


def model(gain: float) -> Model:
    prep = Preprocessing((SIZE, SIZE), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "bilinear", 1.0, 3)
    return Model(ScaledNet(gain), prep, name=f"scaled{gain:g}")


def _run(gain: float, preset: str, **kw):
    return visualize(model(gain), UNITS, preset=preset, steps=kw.pop("steps", 25), size=SIZE, **kw)


@pytest.mark.parametrize("preset", ["1", "2", "3", "4", "none"])
def test_calibrated_presets_give_the_same_image_at_any_unit_scale(preset):
    one, ten = _run(1.0, preset), _run(10.0, preset)
    same = []
    for a, b in zip(one, ten):
        assert b.value == pytest.approx(10 * a.value, rel=1e-3, abs=1e-3)
        d = (a.image - b.image).abs()
        same.append(float(d.mean()))
        assert d.mean() < 0.02 and d.max() < 1.0  # up to float rounding (a percentile clip may flip a pixel)
        assert b.calibration["lr_factor"] == pytest.approx(a.calibration["lr_factor"] / 10, rel=1e-4)
        assert b.calibration["prog_factor"] == pytest.approx(a.calibration["prog_factor"] * 10, rel=1e-4)
    # literal Table 1 values: the same θ on a 10x larger unit take other steps, hence another image
    lit1, lit10 = _run(1.0, preset, calibrate=False), _run(10.0, preset, calibrate=False)
    moved = [float((a.image - b.image).abs().mean()) for a, b in zip(lit1, lit10)]
    assert max(moved) > 0.1 and max(moved) > 20 * max(same), (moved, same)
    assert all(r.calibration is None and r.settings.name == preset and not r.settings.calibrate for r in lit1)


def test_calibration_costs_one_forward_without_backward_per_batch():
    def forwards(calibrate: bool) -> list[bool]:
        m = model(1.0)
        visualize(m, UNITS, preset="1", steps=1, size=SIZE, calibrate=calibrate)  # warm-up: the layer table
        calls: list[bool] = []
        h = m.module.conv.register_forward_hook(lambda _m, _i, _o: calls.append(torch.is_grad_enabled()))
        try:
            visualize(m, UNITS, preset="1", steps=6, size=SIZE, calibrate=calibrate)
        finally:
            h.remove()
        assert hooks_left(m.module) == []
        return calls

    on, off = forwards(True), forwards(False)
    assert len(off) == 6 and all(off)  # one forward (with its backward) per step, the batch together
    assert len(on) == len(off) + 1 and on.count(False) == 1  # + the photos' forward, without backward


def test_the_record_says_what_was_measured_and_what_ran():
    m = model(1.0)
    (r,) = visualize(m, ["out:0"], preset="1", steps=3, size=SIZE)
    c = r.to_dict()["calibration"]
    s = get_preset("1")
    assert r.settings.name == "1" and r.settings.calibrate and r.to_dict()["settings"]["calibrate"] is True
    assert c["lr"] == pytest.approx(s.lr * REFERENCE.grad_norm / c["grad_norm"], rel=1e-6)
    assert c["desired_prog"] == pytest.approx(s.desired_prog * c["grad_norm"] / REFERENCE.grad_norm, rel=1e-6)
    assert c["reference_grad_norm"] == REFERENCE.grad_norm == pytest.approx((2 / 100) ** 0.5)
    # the photos' figures: the same objective read on the photos directly
    values = photo_values(m, resolve_targets(m, ["out:0"], size=SIZE), (SIZE, SIZE))
    assert values.shape == (1, len(PHOTOS))  # every photo ships with scikit-image / scikit-learn / matplotlib
    assert float(values[0].std()) == pytest.approx(c["act_scale"], rel=1e-5)
    assert float(values[0].max()) == pytest.approx(c["photo_max"], rel=1e-5)


def test_adam_and_hand_made_settings_are_not_calibrated():
    m = model(1.0)
    (r,) = visualize(m, ["out:0"], preset="robust", steps=2, size=SIZE)
    assert r.calibration is None
    (h,) = visualize(m, ["out:0"], preset=Settings(lr=10.0, steps=2), size=SIZE)
    assert h.calibration is None and not h.settings.calibrate
    (c,) = visualize(m, ["out:0"], preset=Settings(lr=10.0, steps=2, calibrate=True), size=SIZE)
    assert c.calibration is not None and c.settings.name == "custom"
    assert get_preset("3").replace(calibrate=False).name == "3"


def test_a_dead_unit_keeps_the_literal_values():
    m = model(1.0)
    with torch.no_grad():
        m.module.out.conv.weight[1] = 0
        m.module.out.conv.bias[1] = 0
    (r,) = visualize(m, ["out:1"], preset="1", steps=3, size=SIZE)
    assert r.dead and r.calibration["lr_factor"] == 1.0 and r.calibration["prog_factor"] == 1.0


def test_cli_calibrate_on_and_off(tmp_path, capsys):
    import json

    from deepvis.cli import main

    base = ["optimize", "--layer", "blocks.1", "--units", "0", "--preset", "3", "--steps", "2", "--size", "32", "--json"]
    records = {}
    for flag in ("on", "off"):
        out = tmp_path / flag
        assert main([*base, "--calibrate", flag, "-o", str(out)]) == 0
        summary = json.loads(capsys.readouterr().out)
        assert summary["settings"]["name"] == "3" and summary["settings"]["calibrate"] is (flag == "on")
        records[flag] = json.loads((out / "blocks.1-0.json").read_text())
    c = records["on"]["calibration"]
    assert c["lr"] == pytest.approx(100 * c["lr_factor"]) and "calibration" not in records["off"]
