"""Top-k mining and statistics: brute-force equality, exact shard merges, ties, a planted detector."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image
from torch import nn

from deepvis.atlas import AtlasOptions, ExactSum, LayerStats, TopK, batch_indices, build_atlas, mine, num_batches, open_atlas
from deepvis.datasets import open_dataset
from deepvis.models import Model, Preprocessing

K = 5


def _brute(values: np.ndarray, k: int) -> list[int]:
    """Indices of the k largest values, ties to the smaller index (the documented order)."""
    return sorted(range(len(values)), key=lambda i: (-values[i], i))[:k]


def _fake_acts(n: int, units: int, hw: tuple[int, int], seed: int) -> torch.Tensor:
    """Activations with many exact ties (small integers, some negative) and some fractional values."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randint(-3, 6, (n, units, *hw), generator=g).float()
    a[::3] += torch.rand((len(range(0, n, 3)), units, *hw), generator=g) * 0.5
    return a


def _mine_batches(acts: torch.Tensor, batches: list[int], bs: int) -> LayerStats:
    n, units, h, w = acts.shape
    st_ = LayerStats("L", units, K, (h, w))
    for b in batches:
        idx = list(batch_indices(b, bs, n))
        st_.update(acts[idx], torch.tensor(idx))
        st_.done.add(b)
    return st_


def test_top_k_equals_brute_force_sort_with_positions():
    acts = _fake_acts(53, 4, (3, 5), seed=0)
    bs = 7
    state = _mine_batches(acts, list(range(num_batches(53, bs))), bs)
    peak = acts.flatten(2).max(2).values  # (N, U)
    for u in range(4):
        want = _brute(peak[:, u].numpy(), K)
        got = state.top(u)
        assert [s for _, s, _ in got] == want
        assert [v for v, _, _ in got] == [float(peak[i, u]) for i in want]
        for _v, s, (y, x) in got:  # the first maximum of the map in row-major order
            flat = acts[s, u].flatten()
            assert int(torch.nonzero(flat == flat.max())[0]) == y * 5 + x


def test_ties_go_to_the_smaller_index_and_first_position():
    acts = torch.zeros(12, 1, 2, 2)
    acts[:, :, 1, 0] = 1.0  # every map peaks at (1, 0); also ties at equal values across inputs
    acts[:, :, 1, 1] = 1.0
    top = _mine_batches(acts[[*range(6, 12), *range(6)]], [1, 0], 6).top(0)  # batches out of order
    # samples are positions in the permuted tensor; equal values → smallest sample index first
    assert [s for _, s, _ in top] == [0, 1, 2, 3, 4]
    assert all(pos == (1, 0) for _, _, pos in top)


def test_fewer_inputs_than_k_and_vector_layers():
    st_ = LayerStats("fc", 3, K, None)
    x = torch.tensor([[1.0, -2.0, 0.5], [3.0, -1.0, 0.5]])
    st_.update(x, torch.tensor([10, 11]))
    assert st_.top(0) == [(3.0, 11, None), (1.0, 10, None)]
    assert st_.top(2) == [(0.5, 10, None), (0.5, 11, None)]
    s = st_.unit_stats()
    assert s[1].dead and not s[0].dead and s[0].positions == 1
    assert s[0].mean == pytest.approx(2.0) and s[0].max == 3.0 and s[1].min == -2.0


def test_statistics_match_numpy():
    acts = _fake_acts(40, 3, (4, 4), seed=1)
    acts[:, 2] = -1.0  # a dead unit
    state = _mine_batches(acts, list(range(num_batches(40, 6))), 6)
    a = acts.double().numpy()
    for s in state.unit_stats():
        m = a[:, s.unit]
        assert s.images == 40 and s.positions == 16
        assert s.mean == pytest.approx(m.mean(), rel=1e-6)
        assert s.std == pytest.approx(m.std(), rel=1e-6)
        assert s.mean_max == pytest.approx(m.reshape(40, -1).max(1).mean(), rel=1e-6)
        assert s.max == pytest.approx(m.max()) and s.min == pytest.approx(m.min())
        assert s.active_images == int((m.reshape(40, -1).max(1) > 0).sum())
        assert s.active_positions == int((m > 0).sum())
        assert s.frac_positions_active == pytest.approx((m > 0).mean())
        assert s.zero_positions == int((m == 0).sum()) and s.frac_zero == pytest.approx((m == 0).mean())
    assert state.unit_stats()[2].dead and state.unit_stats()[2].frac_active == 0.0


def test_exact_sum_is_order_independent():
    vals = [torch.tensor([1e-7 * (i + 1), 1234.5678 + i, -3.25 * i], dtype=torch.float64) for i in range(50)]
    a, b = ExactSum(3), ExactSum(3)
    for v in vals:
        a.add(v)
    parts = [ExactSum(3) for _ in range(3)]
    order = list(range(50))
    random.Random(0).shuffle(order)
    for j, i in enumerate(order):
        parts[j % 3].add(vals[i])
    for p in parts[::-1]:
        b.merge(p)
    assert np.array_equal(a.value(), b.value())
    assert a.value() == pytest.approx(torch.stack(vals).sum(0).numpy(), abs=1e-9)


ACTS = _fake_acts(61, 3, (2, 3), seed=2)
BS = 4
NB = num_batches(61, BS)
ONE_PASS = _mine_batches(ACTS, list(range(NB)), BS)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=NB, max_size=NB), st.randoms(use_true_random=False))
def test_merging_shards_equals_one_pass(assignment, rnd):
    shards: dict[int, list[int]] = {}
    for b, s in enumerate(assignment):
        shards.setdefault(s, []).append(b)
    parts = []
    for bs_ in shards.values():
        rnd.shuffle(bs_)  # the order of batches inside a shard does not matter either
        parts.append(_mine_batches(ACTS, bs_, BS))
    rnd.shuffle(parts)
    merged = LayerStats("L", 3, K, (2, 3))
    for p in parts:
        merged.merge(p)
    assert merged.equal(ONE_PASS)
    # and a round trip through a checkpoint changes nothing
    assert LayerStats.from_bytes("L", merged.to_bytes()).equal(ONE_PASS)


def test_merging_overlapping_states_is_refused():
    a = _mine_batches(ACTS, [0, 1], BS)
    with pytest.raises(ValueError, match="batch 1"):
        a.merge(_mine_batches(ACTS, [1, 2], BS))


def test_topk_merge_shape_mismatch():
    with pytest.raises(ValueError):
        TopK(3, 2).merge(TopK(3, 4))


# -- a planted detector ---------------------------------------------------------------------------------


class Stripes(nn.Module):
    """conv: unit 0 a vertical-edge filter (Sobel-x), unit 1 a horizontal one; then ReLU and a 2x2 pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, bias=False)
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
        with torch.no_grad():
            self.conv.weight[0, 0] = sobel
            self.conv.weight[1, 0] = sobel.T
        self.act = nn.ReLU()
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.conv(x)))


def stripes_model() -> Model:
    pre = Preprocessing((32, 32), mean=(0.5,), std=(0.5,), interpolation="nearest", crop_pct=1.0, channels=1)
    return Model(Stripes(), pre, name="stripes")


def stripe_dataset(root, n_each: int = 6):
    """n_each vertical-stripe, horizontal-stripe and flat-noise images; returns the set of keys per kind."""
    rng = np.random.default_rng(0)
    kinds = {"vertical": [], "horizontal": [], "noise": []}
    for k in range(n_each):
        period = 4 + k % 3
        v = np.tile(((np.arange(32) // (period // 2)) % 2 * 200 + 20).astype(np.uint8), (32, 1))
        for kind, arr in (("vertical", v), ("horizontal", v.T.copy()), ("noise", (rng.random((32, 32)) * 40 + 100).astype(np.uint8))):
            name = f"{kind}_{k}.png"
            Image.fromarray(arr, "L").save(root / name)
            kinds[kind].append(name)
    return kinds


def test_planted_detector_finds_the_striped_images(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    kinds = stripe_dataset(data)
    model = stripes_model()
    build_atlas(tmp_path / "atlas", model, str(data), AtlasOptions(layers=("pool",), top=6, batch_size=5, views=False, synthesis=None))
    with open_atlas(tmp_path / "atlas") as atlas:
        vertical = atlas.unit("pool", 0)
        horizontal = atlas.unit("pool", 1)
        assert sorted(t.key for t in vertical.top) == sorted(kinds["vertical"])
        assert sorted(t.key for t in horizontal.top) == sorted(kinds["horizontal"])
        assert vertical.stats.max == vertical.top[0].value and vertical.stats.images == 18
        assert vertical.top[0].position is not None and horizontal.top[0].label is None
        assert atlas.integrity_check() == "ok"


def test_mine_directly_with_a_model(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    stripe_dataset(data, 2)
    ds = open_dataset(data)
    model = stripes_model()
    states = {"conv": LayerStats("conv", 2, 3, (30, 30)), "pool": LayerStats("pool", 2, 3, (15, 15))}
    steps = list(mine(model, ds, states, range(num_batches(len(ds), 4)), 4, workers=0))
    assert [s.batch for s in steps] == [0, 1] and sum(s.images for s in steps) == 6
    # the pooled peak equals the conv peak (max-pooling keeps the maximum)
    assert [v for v, _, _ in states["conv"].top(0)] == [v for v, _, _ in states["pool"].top(0)]
