"""Planted answers for the analysis measures: activity (dead units, sparsity), locality, sensitivity, probes, clusters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from deepvis.analysis import (
    LocalityAccumulator,
    cluster_features,
    layer_activity,
    map_locality,
    measure_sensitivity,
    probe_accuracy,
    scan,
)
from deepvis.datasets import Batch
from deepvis.errors import DeepvisError
from deepvis.models import Model, Preprocessing
from deepvis.stats import LayerStats
from helpers import assert_unchanged, snapshot

# -- activity ---------------------------------------------------------------------------------------


class Planted(nn.Module):
    """A 1x1 conv with three units: 0 copies the input, 1 is dead (weight 0, bias -1), 2 negates; then ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.tensor([1.0, 0.0, -1.0]).view(3, 1, 1, 1))
            self.conv.bias.copy_(torch.tensor([0.0, -1.0, 0.0]))
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.relu(self.conv(x)))))


def _gray_model(module: nn.Module, size: int = 4) -> Model:
    return Model(module, Preprocessing((size, size), (0.5,), (0.5,), crop_pct=1.0, channels=1), name="planted")


def _checkerboards(amplitudes: list[float], size: int = 4) -> torch.Tensor:
    """(N, 1, size, size): ±a checkerboards, so exactly half of every map is positive."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((yy + xx) % 2 * 2 - 1).float()
    return torch.stack([a * board for a in amplitudes]).unsqueeze(1)


def test_planted_dead_unit_and_known_sparsity_are_detected_exactly():
    model = _gray_model(Planted())
    model.module.train()  # deepvis must not leave it changed
    before = snapshot(model.module)
    amps = [1.0, 3.0, 0.5, 2.0, 0.25]
    x = _checkerboards(amps)
    batches = [Batch([10, 11, 12], x[:3], []), Batch([13, 14], x[3:], [(15, "unreadable")])]
    res = scan(model, batches, ["relu", "conv"], top_k=2, thumbnails=False)
    assert_unchanged(model.module, before)
    assert res.samples == [10, 11, 12, 13, 14] and res.skipped == [(15, "unreadable")]
    relu = res.activity["relu"]
    assert relu.dead_units == [1]
    assert relu.sparsity.tolist() == [0.5, 1.0, 0.5]  # exactly half of each live map is zero
    assert relu.frac_zero.tolist() == [0.5, 1.0, 0.5]
    assert relu.layer_sparsity == pytest.approx(2 / 3)
    assert relu.frac_inputs_active.tolist() == [1.0, 0.0, 1.0]
    assert relu.mean[0] == pytest.approx(np.mean(amps) / 2) and relu.mean[1] == 0
    assert relu.max.tolist() == [3.0, 0.0, 3.0]
    # top inputs by map maximum, across the two batches, best first
    assert [t.sample for t in relu.top_inputs(0)] == [11, 13] and [t.value for t in relu.top_inputs(0)] == [3.0, 2.0]
    assert relu.top_inputs(0)[0].position == (0, 1)  # first positive cell of the board in row-major order
    assert relu.most_active("mean", 2) == [0, 2] or relu.most_active("mean", 2) == [2, 0]
    # the conv layer (before the ReLU) has negative values: unit 1 is -1 everywhere, so never active
    conv = res.activity["conv"]
    assert conv.dead_units == [1] and conv.sparsity.tolist() == [0.5, 1.0, 0.5] and conv.frac_zero.tolist() == [0.0, 0.0, 0.0]
    assert conv.min.tolist() == [-3.0, -1.0, -3.0]
    # pooled features for the probes: the spatial mean per unit
    assert res.features["relu"].shape == (5, 3)
    assert res.features["relu"][:, 0] == pytest.approx(np.array(amps) / 2)


def test_activity_stream_equals_one_pass():
    g = torch.Generator().manual_seed(0)
    acts = torch.randn(12, 5, 3, 3, generator=g)
    one = LayerStats("l", 5, 3, (3, 3))
    one.update(acts, torch.arange(12))
    parts = LayerStats("l", 5, 3, (3, 3))
    for lo in range(0, 12, 5):
        parts.update(acts[lo : lo + 5], torch.arange(lo, min(12, lo + 5)))
    a, b = layer_activity(one, (5, 3, 3)), layer_activity(parts, (5, 3, 3))
    for name in ("mean", "mean_max", "max", "min", "sparsity", "frac_inputs_active"):
        assert np.allclose(getattr(a, name), getattr(b, name)), name
    assert (a.top_samples == b.top_samples).all()
    assert a.mean == pytest.approx(acts.mean((0, 2, 3)).numpy(), abs=1e-6)
    assert a.sparsity == pytest.approx((acts <= 0).float().mean((0, 2, 3)).numpy())


# -- locality ---------------------------------------------------------------------------------------


def _map(size: int = 7) -> torch.Tensor:
    return torch.zeros(size, size)


def test_locality_of_point_blob_and_uniform_maps():
    point = _map()
    point[3, 3] = 5.0
    corner = _map()
    corner[0, 0] = 1.0
    uniform = torch.ones(7, 7)
    plus = _map()  # the peak and its four neighbours: all mass within r = 0.15 * 7 = 1.05 of the peak
    plus[3, 3] = 2.0
    plus[2, 3] = plus[4, 3] = plus[3, 2] = plus[3, 4] = 1.0
    square = _map()  # a 3x3 block with a brighter centre: the diagonal corners lie outside r
    square[2:5, 2:5] = 1.0
    square[3, 3] = 2.0
    res = map_locality(torch.stack([point, corner, uniform, plus, square]))
    base = 5 / 49  # the peak and its four neighbours, of 49 positions
    expected = [1.0, 1.0, 0.0, 1.0, (6 / 10 - base) / (1 - base)]
    assert res.locality.tolist() == pytest.approx(expected, abs=1e-6)
    h_plus = -(2 / 6 * math.log(2 / 6) + 4 * (1 / 6) * math.log(1 / 6))
    h_square = -(2 / 10 * math.log(2 / 10) + 8 * (1 / 10) * math.log(1 / 10))
    assert res.entropy_locality.tolist() == pytest.approx([1.0, 1.0, 0.0, 1 - h_plus / math.log(49), 1 - h_square / math.log(49)], abs=1e-6)
    assert res.peak_y.tolist()[:2] == [3, 0] and res.peak_x.tolist()[:2] == [3, 0]


def test_locality_of_k_equal_positions_and_edge_cases():
    m = torch.zeros(4, 10, 10)
    m[0, 0, :4] = 1.0  # four equal positions in a row
    m[1] = -torch.ones(10, 10)  # no positive mass: no locality
    m[2] = torch.ones(10, 10)
    m[2, 5, 5] = -3.0  # negative values are ignored (positive part only)
    m[3, 9, 9] = 1.0
    res = map_locality(m, radius=0.1)  # r = 1 position
    assert res.entropy_locality[0].item() == pytest.approx(1 - math.log(4) / math.log(100))
    # peak (0,0), its neighbourhood {(0,0),(0,1),(1,0)} holds 2 of 4 units of mass; baseline 3/100
    assert res.locality[0].item() == pytest.approx((0.5 - 0.03) / (1 - 0.03))
    assert math.isnan(res.locality[1].item()) and math.isnan(res.entropy_locality[1].item())
    assert not res.valid[1] and res.valid[0]
    assert res.entropy_locality[3].item() == pytest.approx(1.0)
    assert map_locality(torch.ones(3, 1, 1)).locality.isnan().all()  # a 1x1 map has no locality


def test_locality_accumulator_weights_inputs_by_peak():
    acc = LocalityAccumulator("l", 2, (7, 7))
    maps = torch.zeros(2, 2, 7, 7)
    maps[0, 0, 3, 3] = 3.0  # unit 0, input 0: a point (locality 1), peak 3
    maps[1, 0] = 1.0  # unit 0, input 1: uniform (locality 0), peak 1
    acc.update(maps[:1])
    acc.update(maps[1:])
    res = acc.result()
    assert res.locality[0] == pytest.approx(3 / 4)
    assert math.isnan(res.locality[1]) and res.inputs.tolist() == [2, 0]
    assert res.most_local(5, min_inputs=1) == [0]


# -- sensitivity ------------------------------------------------------------------------------------


class Affine(nn.Module):
    def __init__(self, gain: float, bias: float) -> None:
        super().__init__()
        self.gain, self.bias = gain, bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.gain * x + self.bias


class Head(nn.Module):
    """logits = [mean(a) - centre + margin, 0]: class 0 wins by ``margin`` at the clean input."""

    def __init__(self, centre: float, margin: float) -> None:
        super().__init__()
        self.centre, self.margin = centre, margin

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        z = a.mean((1, 2, 3)) - self.centre + self.margin
        return torch.stack([z, torch.zeros_like(z)], 1)


class Gains(nn.Module):
    """a1 = x + 1, a2 = 4·a1 + 2 (= 4x + 6): at x = 0 a pixel step s changes a1 by s/1 and a2 by 4s/6 relative."""

    def __init__(self, margin: float) -> None:
        super().__init__()
        self.l1 = Affine(1.0, 1.0)
        self.l2 = Affine(4.0, 2.0)
        self.head = Head(6.0, margin)
        self.w = nn.Parameter(torch.ones(1))  # gives the module a device and something to freeze

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.l2(self.l1(x * self.w)))


def test_sensitivity_gives_the_known_layer_ratios_and_flips():
    step = 2 / 255  # one pixel step in model units with std 0.5
    margin = 4 * step * 3  # the adversarial step lowers mean(a2) by 4·ε·step: flips once ε > 3
    model = Model(Gains(margin), Preprocessing((8, 8), (0.5,) * 3, (0.5,) * 3, crop_pct=1.0), name="gains")
    before = snapshot(model.module)
    x = torch.zeros(4, 3, 8, 8)  # mid-gray: far from the clipping bounds
    eps = [1.0, 2.0, 4.0, 8.0]
    res = measure_sensitivity(model, x, ["l2", "l1"], eps, samples=[0, 1, 2, 3])
    assert_unchanged(model.module, before)
    assert res.layers == ["l1", "l2", "logits"]
    for kind in ("random", "adversarial"):
        mean = res.mean_change(kind)
        assert mean[:, 0] == pytest.approx([e * step / 1 for e in eps], rel=1e-4)  # ‖Δa1‖/‖a1‖ = ε·s / 1
        assert mean[:, 1] == pytest.approx([4 * e * step / 6 for e in eps], rel=1e-4)  # 4·ε·s / 6
        assert (np.diff(res.change[kind], axis=0) >= 0).all()  # larger ε never gives a smaller change
    # the adversarial step moves the logit by exactly 4·ε·s against the predicted class
    assert res.mean_change("adversarial")[:, 2] == pytest.approx([e / 3 for e in eps], rel=1e-4)
    assert res.flip_rate("adversarial").tolist() == [0.0, 0.0, 1.0, 1.0]
    assert res.flip_rate("random").tolist() == [0.0, 0.0, 0.0, 0.0]  # random signs average out
    # results do not depend on how inputs are batched
    again = measure_sensitivity(model, x[:2], ["l1", "l2"], eps, samples=[0, 1]).merge(
        measure_sensitivity(model, x[2:], ["l1", "l2"], eps, samples=[2, 3])
    )
    assert np.allclose(again.change["random"], res.change["random"]) and np.allclose(again.change["adversarial"], res.change["adversarial"])
    with pytest.raises(DeepvisError):
        measure_sensitivity(model, x, ["l1"], [0.0])


def test_sensitivity_clips_to_valid_pixels():
    model = Model(Gains(1.0), Preprocessing((8, 8), (0.5,) * 3, (0.5,) * 3, crop_pct=1.0), name="gains")
    x = torch.ones(1, 3, 8, 8)  # white: every upward step is clipped away
    res = measure_sensitivity(model, x, ["l1"], [4.0], kinds=("random",), seed=3)
    signs = torch.randint(0, 2, (3, 8, 8), generator=torch.Generator().manual_seed(3 * 1_000_003)).float() * 2 - 1
    kept = (signs < 0).float()  # only downward steps survive the clipping
    expected = (4 * 2 / 255) * kept.sum().sqrt() / math.sqrt(3 * 8 * 8 * 4)  # ‖Δa1‖ / ‖a1‖ with a1 = 2 everywhere
    assert res.change["random"][0, 0, 0] == pytest.approx(expected.item(), rel=1e-4)


# -- probes and clusters ----------------------------------------------------------------------------


def _blobs(n_per: int = 40, k: int = 4, d: int = 16, spread: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d)) * 4
    y = np.repeat(np.arange(k), n_per)
    X = centres[y] + rng.normal(size=(len(y), d)) * spread
    return X, y


def test_probe_near_perfect_on_separable_data_and_chance_on_shuffled_labels():
    X, y = _blobs()
    good = probe_accuracy(X, y, folds=5)
    assert good.accuracy >= 0.97 and good.folds == 5 and good.classes == 4 and good.chance == pytest.approx(0.25)
    shuffled = np.random.default_rng(1).permutation(y)
    bad = probe_accuracy(X, shuffled, folds=5)
    assert bad.accuracy < 0.25 + 0.15
    assert abs(bad.accuracy - bad.chance) < 0.15


def test_probe_handles_rare_classes_and_missing_labels():
    X, y = _blobs(n_per=3, k=3)
    y = y.copy()
    y[0] = 7  # a class with a single example: left out
    y[3] = -1  # unlabelled: left out
    res = probe_accuracy(X, y, folds=5)
    assert res.folds == 2 and res.dropped == 1 and res.examples == 7 and res.skipped is None
    one_class = probe_accuracy(X[:3], np.zeros(3, int))
    assert one_class.skipped and math.isnan(one_class.accuracy)


def test_clusters_recover_separated_groups():
    X, y = _blobs(n_per=10, k=3, d=8, spread=0.1)
    samples = list(range(100, 130))
    res = cluster_features("l", X, samples, k=3, representatives=4, labels=y, embedding="pca")
    assert res.ari == pytest.approx(1.0) and res.purity == pytest.approx(1.0)
    assert sorted(res.sizes) == [10, 10, 10] and res.coords.shape == (30, 2) and res.method == "pca"
    row = {s: i for i, s in enumerate(samples)}
    for c, reps in enumerate(res.representatives):
        assert len(reps) == 4 and all(res.assignment[row[s]] == c for s in reps)
    assert sum(res.explained_variance) > 0.9
