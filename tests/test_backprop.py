"""Backprop views: exact outputs of the three modes on tiny models, the rules on every ReLU-like form,
cross-checks (plain autograd, Captum, a module-swapping reference), clear errors, hooks removed."""

from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deepvis.backprop import (
    NonlinearityError,
    PlainGradientWarning,
    backprop_image,
    backprop_view,
    backprop_views,
    filter_map,
    overlay,
    receptive_field,
)
from deepvis.capture import Unit
from deepvis.errors import DeepvisError, LayerError, UnitError
from deepvis.models import Model, Preprocessing
from helpers import assert_unchanged, hooks_left, snapshot


def mode_active() -> bool:
    return bool(torch._C._is_torch_function_mode_enabled())


def tiny(module: nn.Module, h: int, w: int) -> Model:
    """A one-channel model whose input is used as given (mean 0, std 1)."""
    return Model(module.eval(), Preprocessing((h, w), mean=(0.0,), std=(1.0,), channels=1))


# -- exact outputs: ReLU then a mix with weights of both signs --------------------------------------
class ReluThenMix(nn.Module):
    """relu over a 1x4 row, then ``mix`` = 1·a − 1·b − 1·c + 1·d."""

    def __init__(self) -> None:
        super().__init__()
        self.act = nn.ReLU()
        self.mix = nn.Conv2d(1, 1, (1, 4), bias=False)
        with torch.no_grad():
            self.mix.weight.copy_(torch.tensor([1.0, -1.0, -1.0, 1.0]).view(1, 1, 1, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mix(self.act(x))


X_ROW = torch.tensor([1.0, -1.0, 2.0, -2.0]).view(1, 1, 4)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("gradient", [1.0, 0.0, -1.0, 0.0]),  # w · [x > 0]
        ("deconv", [1.0, 0.0, 0.0, 1.0]),  # max(w, 0): the forward mask is ignored
        ("guided", [1.0, 0.0, 0.0, 0.0]),  # max(w, 0) · [x > 0]
    ],
)
def test_three_modes_exact_with_seed_one(mode, expected):
    r = backprop_view(tiny(ReluThenMix(), 1, 4), X_ROW, "mix:0", mode, seed="one")
    assert r.grad.flatten().tolist() == expected
    assert r.activation == pytest.approx(1.0 - 2.0)  # relu(x) = (1, 0, 2, 0)
    assert r.mode == mode and r.grad.shape == (1, 1, 4)


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("gradient", [-1.0, 0.0, 1.0, 0.0]),  # the seed is the activation, −1: −w · [x > 0]
        ("deconv", [0.0, 1.0, 1.0, 0.0]),  # max(−w, 0)
        ("guided", [0.0, 0.0, 1.0, 0.0]),  # max(−w, 0) · [x > 0]
    ],
)
def test_three_modes_exact_with_activation_seed(mode, expected):
    r = backprop_view(tiny(ReluThenMix(), 1, 4), X_ROW, "mix:0", mode)
    assert r.seed == "activation"
    assert r.grad.flatten().tolist() == expected


# -- every ReLU-like form, in place or not -----------------------------------------------------------
class Forms(nn.Module):
    """Row r of the input goes through form r; the output is multiplied by g = (1, −1, 1, −1) along x."""

    def __init__(self) -> None:
        super().__init__()
        self.relu6 = nn.ReLU6(inplace=True)
        self.leaky = nn.LeakyReLU(0.5)
        self.out = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0  # not a leaf, so that the in-place forms are legal
        rows = [
            F.relu(x[:, :, 0:1]),
            torch.relu(x[:, :, 1:2]),
            x[:, :, 2:3].clone().relu_(),
            self.relu6(x[:, :, 3:4].clone()),
            self.leaky(x[:, :, 4:5]),
            F.hardtanh(x[:, :, 5:6], 0.0, 2.0),
        ]
        g = torch.tensor([1.0, -1.0, 1.0, -1.0], device=x.device)
        return self.out(torch.cat(rows, 2) * g)


FORMS_X = torch.tensor(
    [
        [1.0, 1.0, -1.0, -1.0],  # F.relu
        [1.0, 1.0, -1.0, -1.0],  # torch.relu
        [1.0, 1.0, -1.0, -1.0],  # Tensor.relu_
        [3.0, 3.0, 7.0, -1.0],  # ReLU6(inplace): 7 is above the linear part
        [1.0, 1.0, -1.0, -1.0],  # LeakyReLU(0.5)
        [1.0, 1.0, 3.0, -1.0],  # hardtanh(0, 2): 3 is above the linear part
    ]
).view(1, 6, 4)

FORMS_EXPECTED = {
    "gradient": [
        [1, -1, 0, 0],
        [1, -1, 0, 0],
        [1, -1, 0, 0],
        [1, -1, 0, 0],
        [1, -1, 0.5, -0.5],
        [1, -1, 0, 0],
    ],
    # deconv: max(g, 0) everywhere, whatever the forward input was
    "deconv": [[1, 0, 1, 0]] * 6,
    # guided: max(g, 0) where the unit was in its linear part
    "guided": [[1, 0, 0, 0]] * 6,
}


@pytest.mark.parametrize("mode", ["gradient", "deconv", "guided"])
def test_rules_cover_every_relu_like_form(mode):
    m = tiny(Forms(), 6, 4)
    r = backprop_view(m, FORMS_X, "out:0", mode, seed="one")
    assert r.grad[0].tolist() == FORMS_EXPECTED[mode]
    assert hooks_left(m.module) == [] and not mode_active()


def test_inplace_relu_output_is_still_correct_forward():
    """The rules never change forward values (the in-place ReLU6 keeps its in-place contract)."""
    m = tiny(Forms(), 6, 4)
    with torch.no_grad():
        plain = m.module(FORMS_X[None])
    r = backprop_view(m, FORMS_X, "out:0@3,2", "guided", seed="one")
    assert r.activation == pytest.approx(float(plain[0, 0, 3, 2]))  # relu6(7) · 1 = 6
    assert r.activation == pytest.approx(6.0)


# -- cross-checks on real networks -----------------------------------------------------------------
def test_gradient_mode_is_the_plain_gradient(default_model, sample_images):
    m = default_model
    x = m.preprocess(sample_images["coffee"])
    r = backprop_view(m, x, "logits:967", "gradient", seed="one")
    xr = x.clone().requires_grad_(True)
    m.module(xr)[0, 967].backward()
    assert torch.allclose(r.grad, xr.grad[0], rtol=1e-4, atol=1e-6)
    assert r.activation > 5  # espresso is the top class of the coffee photo


class _GuidedReLU6(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(0, 6)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g.clamp(min=0) * ((x > 0) & (x < 6))


class _SwappedReLU6(nn.Module):
    def forward(self, x):
        return _GuidedReLU6.apply(x)


def test_guided_matches_a_module_swapping_reference(default_model, sample_images):
    """On the default model (ReLU6 inside timm's BatchNormAct2d, in place), guided backprop equals a
    reference built by swapping every ReLU6 of a copy for an out-of-place guided ReLU6."""
    m = default_model
    x = m.preprocess(sample_images["chelsea"])
    ref = copy.deepcopy(m.module).eval()
    for _name, mod in list(ref.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, nn.ReLU6):
                setattr(mod, child_name, _SwappedReLU6())
    xr = x.clone().requires_grad_(True)
    out = {}
    h = ref.get_submodule("blocks.4").register_forward_hook(lambda _m, _i, o: out.setdefault("a", o))
    try:
        ref(xr)
    finally:
        h.remove()
    a = out["a"]
    seed = torch.zeros_like(a)
    seed[0, 7] = a[0, 7].detach()
    (expected,) = torch.autograd.grad(a, xr, seed)
    r = backprop_view(m, x, "blocks.4:7", "guided")
    assert torch.allclose(r.grad, expected[0], rtol=1e-4, atol=1e-5 * float(expected.abs().max()))
    assert float(r.grad.abs().sum()) > 0


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 5, 3)

    def forward(self, x):
        return self.conv3(self.relu2(self.conv2(self.pool(self.relu1(self.conv1(x))))))


@pytest.mark.parametrize("mode", ["deconv", "guided"])
def test_agrees_with_captum_on_relu_modules(mode):
    from captum.attr import NeuronDeconvolution, NeuronGuidedBackprop

    torch.manual_seed(0)
    net = SmallCNN().eval()
    m = Model(net, Preprocessing((12, 12)))
    x = torch.randn(1, 3, 12, 12)
    cls = NeuronGuidedBackprop if mode == "guided" else NeuronDeconvolution
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = cls(net, net.conv3).attribute(x.clone(), neuron_selector=(2, 1, 3))
    r = backprop_view(m, x, "conv3:2@1,3", mode, seed="one")
    assert torch.allclose(r.grad, expected[0], atol=1e-6)
    assert float(r.grad.abs().sum()) > 0


def test_position_view_lies_inside_the_receptive_field(default_model, sample_images):
    m = default_model
    x = m.preprocess(sample_images["coffee"])
    r = backprop_view(m, x, "blocks.2:3@3,25", "gradient")
    rf = receptive_field(m, r.unit)
    support = torch.nonzero(r.grad.abs().sum(0))
    top, left, bottom, right = rf.box
    assert support.numel() > 0
    assert int(support[:, 0].min()) >= top and int(support[:, 0].max()) < bottom
    assert int(support[:, 1].min()) >= left and int(support[:, 1].max()) < right
    # the support reaches (almost) the field's edges: the field is not larger than needed
    assert int(support[:, 0].max()) >= bottom - 4 and int(support[:, 1].min()) <= left + 3


# -- positions, batches ------------------------------------------------------------------------------
def test_at_max_uses_the_peak_and_positions_localize(default_model, sample_images):
    m = default_model
    x = m.preprocess(sample_images["chelsea"])
    whole = backprop_view(m, x, "blocks.3:11", "guided")
    peak = backprop_view(m, x, "blocks.3:11", "guided", at="max")
    assert peak.unit.position == whole.argmax
    assert peak.activation == pytest.approx(whole.activation)  # whole-map activation is the map's maximum
    given = backprop_view(m, x, f"blocks.3:11@{whole.argmax[0]},{whole.argmax[1]}", "guided")
    assert torch.equal(given.grad, peak.grad)
    tup = backprop_view(m, x, "blocks.3:11", "guided", at=whole.argmax)
    assert torch.equal(tup.grad, peak.grad)
    assert float(peak.grad.abs().sum()) < float(whole.grad.abs().sum())


def test_batched_views_equal_single_views(default_model, sample_images):
    m = default_model
    x = m.preprocess([sample_images["coffee"], sample_images["rocket"]])
    batch = backprop_views(m, x, "blocks.3:4", "deconv", at="max")
    for i in range(2):
        single = backprop_view(m, x[i], "blocks.3:4", "deconv", at="max")
        assert single.unit == batch[i].unit
        assert torch.allclose(single.grad, batch[i].grad, rtol=1e-4, atol=1e-5 * float(single.grad.abs().max()))
    # several units (on different layers) of one input in one pass
    units = [Unit("blocks.2", 1, (5, 5)), Unit("logits", 967)]
    many = backprop_views(m, x[:1], units, "guided")
    assert [r.unit for r in many] == units
    for u, r in zip(units, many):
        assert torch.allclose(r.grad, backprop_view(m, x[0], u, "guided").grad, rtol=1e-4, atol=1e-5 * float(r.grad.abs().max()))


# -- nonlinearities without rules ---------------------------------------------------------------------
class SiluNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.SiLU()
        self.head = nn.Conv2d(4, 2, 3)

    def forward(self, x):
        return self.head(torch.sigmoid(self.act(self.conv(x))))


def test_silu_model_in_deconv_mode_says_which_modules_are_plain():
    m = Model(SiluNet().eval(), Preprocessing((8, 8)))
    before = snapshot(m.module)
    x = torch.randn(3, 8, 8)
    with pytest.raises(NonlinearityError) as err:
        backprop_view(m, x, "head:0", "deconv")
    msg = str(err.value)
    assert "\n" not in msg and "deconvnet" in msg and "act (SiLU: silu)" in msg and "sigmoid" in msg and "plain gradient" in msg
    assert_unchanged(m.module, before)
    assert not mode_active()
    with pytest.warns(PlainGradientWarning, match="act"):
        r = backprop_view(m, x, "head:0", "guided", strict=False)
    assert any("act (SiLU" in p for p in r.plain)
    plain = backprop_view(m, x, "head:0", "gradient")  # gradient mode needs no rule
    assert plain.plain == () and float(plain.grad.abs().sum()) > 0
    assert_unchanged(m.module, before)


# -- the user's model stays as it was ----------------------------------------------------------------
class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.act = nn.ReLU(inplace=True)
        self.boom = nn.Identity()

    def forward(self, x):
        y = self.act(self.conv(x))
        if x.shape[-1] == 9:
            raise RuntimeError("boom")
        return self.boom(y * 2.0)


def test_model_unchanged_after_success_and_failure():
    torch.manual_seed(0)
    net = SmallCNN()
    net.train()  # the user's flags: training, parameters requiring gradients
    m = Model(net, Preprocessing((12, 12)))
    before = snapshot(net)
    for mode in ("gradient", "deconv", "guided"):
        backprop_view(m, torch.randn(3, 12, 12), "conv3:1", mode)
        assert_unchanged(net, before)
        assert not mode_active()
    with pytest.raises(UnitError):
        backprop_view(m, torch.randn(3, 12, 12), "conv3:99", "guided")
    assert_unchanged(net, before)
    boom = Exploding()
    bm = Model(boom, Preprocessing((8, 8)))
    before = snapshot(boom)
    # the forward pass fails midway, inside the rules (at a size the model was not set up for: said so)
    with pytest.raises(DeepvisError, match=r"fails on an input of 9x9 px \(RuntimeError: boom\); it was set up for 8x8"):
        backprop_view(bm, torch.randn(3, 9, 9), "boom:0", "guided")
    assert_unchanged(boom, before)
    assert not mode_active()


def test_bad_requests_are_one_line_errors(default_model, sample_images):
    m = default_model
    x = m.preprocess(sample_images["coffee"])
    cases = [
        (lambda: backprop_view(m, x, "blocks.3:5", "lrp"), DeepvisError, "unknown backprop mode"),
        (lambda: backprop_view(m, x, "blocks.3:5", seed="two"), DeepvisError, "unknown seed"),
        (lambda: backprop_view(m, x, "blockz.3:5"), LayerError, "did you mean"),
        (lambda: backprop_view(m, x, "blocks.3:500"), UnitError, "80 units"),
        (lambda: backprop_view(m, x, "blocks.3:5@20,1"), UnitError, "outside the 14x14"),
        (lambda: backprop_view(m, x, "blocks.3:5@2,1", at="max"), UnitError, "not both"),
        (lambda: backprop_view(m, x, "logits:5@2,1"), UnitError, "no spatial map"),
        (lambda: backprop_view(m, torch.cat([x, x]), "blocks.3:5"), DeepvisError, "backprop_views"),
        (lambda: backprop_views(m, torch.cat([x, x, x]), ["blocks.3:1", "blocks.3:2"]), UnitError, "2 units for 3 inputs"),
    ]
    before = snapshot(m.module)
    for fn, cls, text in cases:
        with pytest.raises(cls, match=text) as err:
            fn()
        assert "\n" not in str(err.value)
    assert_unchanged(m.module, before)


# -- display filters ---------------------------------------------------------------------------------
def test_filters_exact_values():
    g = torch.zeros(3, 2, 2)
    g[:, 0, 0] = torch.tensor([1.0, 1.0, 2.0])  # sum 4, norm sqrt(6)
    g[:, 1, 1] = torch.tensor([-2.0, 0.0, 0.0])  # sum -2, norm 2
    raw = backprop_image(g, "raw")
    assert raw[0, 0].tolist() == [0, 255, 0]  # positive: green
    assert raw[1, 1].tolist() == [128, 0, 0]  # negative, half the largest magnitude: red
    assert raw[0, 1].tolist() == [0, 0, 0]
    norm = filter_map(g, "norm")
    assert norm[0, 0] == pytest.approx(1.0) and norm[1, 1] == pytest.approx(2 / 6**0.5)
    gray = filter_map(g, "gray")
    assert gray[0, 0] == pytest.approx(1.0) and gray[1, 1] == pytest.approx(-0.5) and gray[0, 1] == 0
    assert backprop_image(g, "gray")[0, 1].tolist() == [128, 128, 128]  # zero is mid-gray
    rgb = backprop_image(g, "rgb")
    assert rgb[1, 1].tolist() == [0, 128, 128]
    sat = filter_map(g, "norm", percentile=50)
    assert sat.max() == 1.0 and (sat >= 0).all()


def test_normblur_spreads_and_overlay_blends():
    g = torch.zeros(3, 33, 33)
    g[0, 16, 16] = 1.0
    blur = filter_map(g, "normblur", blur_sigma=3.0)
    assert blur[16, 16] == pytest.approx(1.0)
    assert 0 < blur[16, 19] < 1 and blur[16, 19] == pytest.approx(np.exp(-9 / 18), rel=1e-4)
    assert blur[16, 13] == pytest.approx(blur[16, 19])
    view = backprop_image(g, "norm")
    image = np.full((33, 33, 3), 100, np.uint8)
    out = overlay(image, view, alpha=0.25)
    assert out[16, 16].tolist() == [139, 139, 139]  # 0.75·100 + 0.25·255 = 138.75
    assert out[0, 0].tolist() == [75, 75, 75]
    with pytest.raises(DeepvisError):
        overlay(np.zeros((10, 10, 3), np.uint8), view)


def test_dead_unit_gives_an_empty_view():
    net = ReluThenMix()
    m = tiny(net, 1, 4)
    r = backprop_view(m, -X_ROW.abs(), "mix:0", "guided")  # every ReLU is off: activation 0
    assert r.activation == 0.0 and float(r.grad.abs().sum()) == 0.0
    assert backprop_image(r, "norm").max() == 0


def test_a_unit_that_is_off_on_an_input_is_marked_negligible():
    """A channel whose weights are 1e-9 of the others': its view is drawn at full contrast like any
    view, so the result says how weak it is (the live page writes it beside the view)."""
    from deepvis.server.protocol import ViewSettings
    from deepvis.server.unitviews import unit_view

    torch.manual_seed(0)
    conv = nn.Conv2d(1, 2, 3, padding=1)
    with torch.no_grad():
        conv.weight[1] *= 1e-9
        conv.bias.zero_()
    model = tiny(nn.Sequential(conv), 8, 8)
    x = torch.rand(1, 1, 8, 8)
    strong, weak = backprop_views(model, x, [Unit("0", 0), Unit("0", 1)], "gradient")
    assert strong.relative == pytest.approx(1.0) and not strong.negligible
    assert 1e-11 < weak.relative < 1e-8 and weak.negligible and weak.to_dict()["relative"] == weak.relative
    assert float(weak.grad.abs().max()) > 0  # the gradient is there, a billion times smaller
    header, _ = unit_view(model, x, ViewSettings(layer="0", unit=1, backprop="gradient"))
    assert header["weak"].startswith("unit ≈ 0 here (") and header["weak"].endswith(" of the layer's largest |value|)")
    assert unit_view(model, x, ViewSettings(layer="0", unit=0, backprop="gradient"))[0]["weak"] is None
