"""deepvis.optimize pieces with exact expected values: regularizers, objectives, parameterizations,
transforms and presets. (The loop and the command line: test_optimize_loop.py, test_optimize_cli.py.)"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from deepvis.errors import DeepvisError
from deepvis.optimize import (
    PRESETS,
    BatchObjective,
    ClipRange,
    ClipSmallContribution,
    ClipSmallNorm,
    GaussianBlur,
    ImageParam,
    L2Decay,
    RandomAffine,
    Settings,
    StepInfo,
    channel,
    class_logit,
    custom,
    gaussian_blur_symmetric,
    get_preset,
    neuron,
    row_percentile,
)


def info(step: int = 0, grad: torch.Tensor | None = None) -> StepInfo:
    return StepInfo(step, grad if grad is not None else torch.zeros(1))


# -- regularizers ------------------------------------------------------------------------------------
def test_decay_multiplies_by_one_minus_theta():
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    assert torch.equal(L2Decay(0.3)(x, info()), x * 0.7)
    assert torch.equal(L2Decay(0.0)(x, info()), x)
    with pytest.raises(ValueError):
        L2Decay(1.0)


def test_blur_matches_scipy_and_mirrors_edges():
    from scipy.ndimage import gaussian_filter

    x = torch.randn(2, 3, 9, 13, dtype=torch.float64)
    for sigma in (0.5, 1.0, 2.3, 5.0):  # 5.0: the kernel is wider than the image
        got = gaussian_blur_symmetric(x, sigma).numpy()
        want = np.stack([[gaussian_filter(x[n, c].numpy(), sigma, mode="reflect") for c in range(3)] for n in range(2)])
        np.testing.assert_allclose(got, want, atol=1e-6)
    flat = torch.full((1, 3, 6, 6), 7.0)
    assert torch.allclose(gaussian_blur_symmetric(flat, 1.0), flat)


def test_blur_happens_exactly_every_kth_step():
    reg = GaussianBlur(1.0, every=4)
    x = torch.randn(1, 3, 8, 8)
    applied = [t for t in range(13) if not torch.equal(reg(x, info(t)), x)]
    assert applied == [0, 4, 8, 12]
    assert [t for t in range(13) if reg.due(t)] == [0, 4, 8, 12]
    assert not any(GaussianBlur(1.0, every=0).due(t) for t in range(5))
    assert not any(GaussianBlur(0.0, every=4).due(t) for t in range(5))


def test_row_percentile_is_numpys_linear_percentile():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(4, 37))
    for pct in (0, 7.5, 20, 50, 90, 99.9, 100):
        got = row_percentile(torch.from_numpy(v), pct).numpy()
        np.testing.assert_allclose(got, np.percentile(v, pct, axis=1), rtol=0, atol=1e-12)


def test_small_norm_clipping_zeroes_the_right_pixels_per_element():
    # element 0: pixel norms 1..16 (each pixel along one channel); element 1: the same pattern x100 and reversed
    norms = torch.arange(1, 17, dtype=torch.float64).view(4, 4)
    x = torch.zeros(2, 3, 4, 4, dtype=torch.float64)
    x[0, 1] = norms
    x[1, 2] = -100 * norms.flip(0).flip(1)
    out = ClipSmallNorm(50)(x, info())
    kept0 = out[0].norm(dim=0) > 0
    kept1 = out[1].norm(dim=0) > 0
    assert kept0.sum() == 8 and kept1.sum() == 8  # exactly half of 16 pixels in each element
    assert torch.equal(kept0, norms > 8)  # the eight smallest norms are gone
    assert torch.equal(kept1, norms.flip(0).flip(1) > 8)
    assert torch.equal(out[0][:, kept0], x[0][:, kept0])  # kept pixels untouched, all channels
    out20 = ClipSmallNorm(20)(x, info())
    # numpy: percentile(1..16, 20) = 4.0, so norms 1, 2, 3 (strictly below) are zeroed
    assert int((out20[0].norm(dim=0) == 0).sum()) == 3
    assert torch.equal(ClipSmallNorm(0)(x, info()), x)


def test_contribution_clipping_uses_x_times_grad_summed_over_channels():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    g = torch.randn(2, 3, 10, 10, dtype=torch.float64)
    out = ClipSmallContribution(90)(x, info(0, g))
    contrib = (x * g).sum(1).abs()
    for n in range(2):
        thr = np.percentile(contrib[n].numpy(), 90)
        keep = contrib[n] >= thr
        assert int(keep.sum()) == 10  # 90% of 100 pixels zeroed
        assert torch.equal(out[n], x[n] * keep)
    # the contribution is not the norm: a large pixel with an orthogonal gradient is dropped
    x1 = torch.zeros(1, 3, 1, 4, dtype=torch.float64)
    g1 = torch.zeros_like(x1)
    x1[0, :, 0, 0] = torch.tensor([50.0, 0, 0])
    g1[0, :, 0, 0] = torch.tensor([0.0, 1, 0])  # contribution 0 despite norm 50
    x1[0, 0, 0, 1:] = torch.tensor([1.0, 2.0, 3.0])
    g1[0, 0, 0, 1:] = 1.0  # contributions 1, 2, 3
    out1 = ClipSmallContribution(50)(x1, info(0, g1))
    assert out1[0, 0, 0].tolist() == [0.0, 0.0, 2.0, 3.0]  # percentile 50 of (0, 1, 2, 3) is 1.5
    # the sign inside the channel sum matters: opposite contributions cancel
    x2 = torch.tensor([[[[1.0, 4.0]], [[1.0, 0.0]]]])
    g2 = torch.tensor([[[[1.0, 1.0]], [[-1.0, 0.0]]]])  # pixel 0: 1 - 1 = 0; pixel 1: 4
    assert ClipSmallContribution(50)(x2, info(0, g2))[0, :, 0, 0].tolist() == [0.0, 0.0]


def test_clip_range_per_channel():
    x = torch.tensor([[[[-300.0, 0.0, 300.0]], [[-1.0, 50.0, 200.0]]]])
    out = ClipRange(torch.tensor([-127.5, -10.0]), torch.tensor([127.5, 100.0]))(x)
    assert out.tolist() == [[[[-127.5, 0.0, 127.5]], [[-1.0, 50.0, 100.0]]]]


# -- objectives --------------------------------------------------------------------------------------
def test_objectives_compose_and_name_themselves():
    obj = neuron("blocks.3", 7) - 0.5 * channel("blocks.3", 9)
    assert obj.name == "neuron(blocks.3:7@center) - 0.5*channel(blocks.3:9)"
    assert (2 * neuron("a", 1, (0, 2))).name == "2*neuron(a:1@0,2)"
    assert (-channel("a", 1)).name == "-channel(a:1)"
    assert (channel("a", 1) / 4).name == "0.25*channel(a:1)"
    assert sum([channel("a", 0), channel("a", 1)]).name == "channel(a:0) + channel(a:1)"
    assert class_logit(281, "tabby").name == "class(281 tabby)"
    assert obj.layers == ("blocks.3",)
    a = torch.arange(2 * 10 * 5 * 5, dtype=torch.float64).view(2, 10, 5, 5)
    acts = {"blocks.3": a}
    want = a[:, 7, 2, 2] - 0.5 * a[:, 9].mean((1, 2))
    assert torch.allclose(obj(acts), want)
    assert torch.equal(neuron("blocks.3", 7, (1, 3))(acts), a[:, 7, 1, 3])
    logits = torch.randn(3, 5)
    assert torch.equal(class_logit(2)({"logits": logits}), logits[:, 2])
    assert torch.equal(channel("logits", 2)({"logits": logits}), logits[:, 2])


def test_batch_objective_gives_each_element_its_own_objective():
    torch.manual_seed(0)
    acts = {"a": torch.randn(4, 6, 5, 5, requires_grad=True), "b": torch.randn(4, 3)}
    objs = [neuron("a", 1), channel("a", 2) - neuron("b", 0), neuron("a", 5, (0, 4)), 3 * channel("b", 2)]
    got = BatchObjective(objs)(acts)
    want = torch.stack([o(acts)[i] for i, o in enumerate(objs)])
    assert torch.allclose(got, want)
    (g,) = torch.autograd.grad(got.sum(), acts["a"])
    assert g[0, 1, 2, 2] == 1 and g[0].abs().sum() == 1  # element 0: only its neuron
    assert torch.allclose(g[1, 2], torch.full((5, 5), 1 / 25))
    assert g[3].abs().sum() == 0
    # a nonlinear objective takes the per-objective path and gives the same values
    sq = custom(lambda acts: acts["a"][:, 0].pow(2).flatten(1).sum(1), ["a"], "energy(a:0)")
    mixed = [sq, objs[0], sq, objs[2]]
    got2 = BatchObjective(mixed)(acts)
    want2 = torch.stack([o(acts)[i] for i, o in enumerate(mixed)])
    assert torch.allclose(got2, want2)
    assert BatchObjective(mixed).layers == ("a",)


# -- parameterizations and transforms ----------------------------------------------------------------
@pytest.mark.parametrize("fourier,decorrelate", [(False, False), (True, False), (False, True), (True, True)])
@pytest.mark.parametrize("size", [(16, 16), (15, 20)])
def test_parameterizations_are_exactly_invertible(fourier, decorrelate, size):
    torch.manual_seed(0)
    param = ImageParam(fourier=fourier, decorrelate=decorrelate)
    x = torch.randn(2, 3, *size, dtype=torch.float64) * 30
    p = param.from_image(x)
    assert torch.allclose(param.to_image(p, size), x, atol=1e-9)
    assert param.identity == (not fourier and not decorrelate)
    if fourier:  # a gradient step in the spectrum favours low frequencies
        g = torch.zeros_like(p)
        g[..., 0, 1, 0] = 1.0  # lowest non-zero frequency
        lo = param.to_image(g, size).norm()
        g2 = torch.zeros_like(p)
        g2[..., size[0] // 2, size[1] // 4, 0] = 1.0  # a high frequency
        assert lo > 3 * param.to_image(g2, size).norm()


def test_random_affine_is_exact_for_integer_jitter_and_per_element():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float32).view(2, 1, 6, 6) + 1
    warp = RandomAffine(jitter=2)
    params = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, -2.0, 1.0, 0.0]], dtype=torch.float64)
    out = warp(x, params)
    want0 = torch.zeros(6, 6)
    want0[:, 1:] = x[0, 0, :, :-1]  # content moved 1 px right, the mean (0) fills in
    want1 = torch.zeros(6, 6)
    want1[:-2, :] = x[1, 0, 2:, :]  # content moved 2 px up
    assert torch.allclose(out[0, 0], want0, atol=1e-4) and torch.allclose(out[1, 0], want1, atol=1e-4)
    assert RandomAffine()(x, params) is x  # inactive: the identity
    g1 = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    g2 = [torch.Generator().manual_seed(s) for s in (3, 1)]
    full = RandomAffine(jitter=8, scale=(0.9, 1.1), rotate=10).sample(g1)
    sub = RandomAffine(jitter=8, scale=(0.9, 1.1), rotate=10).sample(g2)
    assert torch.equal(full[2], sub[0]) and torch.equal(full[0], sub[1])  # each element its own stream
    assert full[:, :2].abs().max() <= 8 and torch.all(full[:, :2] == full[:, :2].round())
    assert torch.all((full[:, 2] >= 0.9) & (full[:, 2] <= 1.1)) and full[:, 3].abs().max() <= np.radians(10)


def test_rotation_by_90_degrees_moves_pixels_where_expected():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 0, 2] = 1.0  # top middle
    out = RandomAffine(rotate=90)(x, torch.tensor([[0.0, 0.0, 1.0, np.pi / 2]], dtype=torch.float64))
    assert out[0, 0].argmax().item() in (2 * 5 + 4, 2 * 5 + 0)  # lands at the middle of a side
    assert torch.allclose(out.sum(), torch.tensor(1.0), atol=1e-5)


# -- presets -----------------------------------------------------------------------------------------
def test_presets_are_the_papers_table_1():
    rows = {
        "1": (0, 0.5, 4, 50, 0, "progress", 100, 2, 500),
        "2": (0.3, 0, 0, 20, 0, "constant", 100, 2, 750),
        "3": (0.0001, 1.0, 4, 0, 0, "constant", 100, 2, 1000),
        "4": (0, 0.5, 4, 0, 90, "progress", 1e8, 2, 1000),
    }
    for name, row in rows.items():
        p = get_preset(name)
        got = (p.decay, p.blur_width, p.blur_every, p.norm_pct, p.contrib_pct, p.lr_policy, p.lr, p.desired_prog, p.steps)
        assert got == row
        assert not p.beyond_paper
    assert get_preset(3) is PRESETS["3"]
    assert get_preset("robust").beyond_paper
    # the JSON record says it too (derived, for readers of stored images)
    assert get_preset("robust").to_dict()["beyond_paper"] is True and get_preset("1").to_dict()["beyond_paper"] is False
    with pytest.raises(DeepvisError, match="unknown preset"):
        get_preset("7")


def test_settings_overrides_and_validation():
    s = get_preset("1").replace(decay=0.01, steps=10, blur_width=None)
    assert (s.decay, s.steps, s.blur_width, s.name) == (0.01, 10, 0.5, "1+custom")
    assert get_preset("1").replace(steps=10).name == "1"
    assert s.to_dict()["decay"] == 0.01
    for bad in ({"decay": 1.5}, {"norm_pct": 120}, {"lr_policy": "cosine"}, {"steps": 0}, {"scale": (1.2, 0.8)}, {"optimizer": "lbfgs"}):
        with pytest.raises(DeepvisError):
            get_preset("3").replace(**bad)
    with pytest.raises(DeepvisError, match="unknown optimization setting"):
        get_preset("3").replace(blur=2)
    assert isinstance(s, Settings)
