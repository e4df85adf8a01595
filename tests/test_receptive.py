"""Receptive fields: analytic values for conv/pool stacks, gradient supports of real architectures,
a user's own (non-affine) module, caching, crops."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torch import nn

from deepvis.backprop import crop, crop_image, layer_field, receptive_field
from deepvis.capture import capture
from deepvis.errors import DeepvisError, LayerError, UnitError
from deepvis.models import Model, Preprocessing, load_model
from helpers import assert_unchanged, snapshot


# -- analytic stacks -----------------------------------------------------------------------------------
def _layer(spec: tuple) -> nn.Module:
    kind, k, s, p, d = spec
    if kind == "conv":
        return nn.Conv2d(2, 2, k, stride=s, padding=p, dilation=d)
    if kind == "max":
        return nn.MaxPool2d(k, stride=s, padding=p, dilation=d)
    return nn.AvgPool2d(k, stride=s, padding=p)


STACKS = {
    "plain convs": [("conv", 3, 1, 0, 1), ("conv", 3, 1, 0, 1), ("conv", 3, 1, 0, 1)],
    "padded, strided": [("conv", 5, 2, 2, 1), ("conv", 3, 1, 1, 1), ("conv", 3, 2, 1, 1)],
    "resnet stem": [("conv", 7, 2, 3, 1), ("max", 3, 2, 1, 1), ("conv", 3, 1, 1, 1)],
    "alexnet-like": [("conv", 11, 4, 2, 1), ("max", 3, 2, 0, 1), ("conv", 5, 1, 2, 1), ("avg", 2, 2, 0, 1)],
    "dilated": [("conv", 3, 1, 1, 1), ("conv", 3, 1, 2, 2), ("conv", 3, 1, 4, 4), ("max", 2, 2, 0, 1)],
    "dilated pool, 1x1 stride": [("max", 3, 1, 1, 2), ("conv", 1, 3, 0, 1), ("conv", 3, 1, 1, 1)],
}


def _analytic(stack: list[tuple]) -> list[tuple[int, int, int]]:
    """(size, stride, start offset) after each layer: the full field of i starts at stride·i + offset."""
    size, jump, offset, out = 1, 1, 0, []
    for _kind, k, s, p, d in stack:
        size += d * (k - 1) * jump
        offset -= p * jump
        jump *= s
        out.append((size, jump, offset))
    return out


def _true_spans(stack: list[tuple], n: int) -> list[list[tuple[int, int]]]:
    """(first, last) input index seen by each output index of each layer, by following every tap."""
    cover = [{j} for j in range(n)]
    out = []
    for _kind, k, s, p, d in stack:
        m = (len(cover) + 2 * p - d * (k - 1) - 1) // s + 1
        cover = [set().union(*(cover[j] for j in (i * s - p + t * d for t in range(k)) if 0 <= j < len(cover))) for i in range(m)]
        out.append([(min(c), max(c)) for c in cover])
    return out


@pytest.mark.parametrize("name", list(STACKS))
def test_conv_pool_stacks_match_the_analytic_fields(name):
    torch.manual_seed(0)
    stack = [("conv", 1, 1, 0, 1), *STACKS[name]]  # a first 1x1 conv takes the 3 input channels to 2
    layers: list[nn.Module] = []
    for spec in stack:
        layers += [_layer(spec), nn.ReLU()]
    layers[0] = nn.Conv2d(3, 2, 1)
    net = nn.Sequential(*layers).eval()
    n = 97
    m = Model(net, Preprocessing((n, n)))
    before = snapshot(net)
    spans = _true_spans(stack, n)
    for idx, (size, jump, offset) in enumerate(_analytic(stack)):
        geo = layer_field(m, str(2 * idx))
        h = geo.output_size[0]
        assert h == len(spans[idx])
        assert geo.size == (size, size), (idx, geo.size)
        if h > 1:
            assert geo.stride == (pytest.approx(jump), pytest.approx(jump))
        assert list(geo.rows.start) == [jump * i + offset for i in range(h)]
        assert geo.cols.start == geo.rows.start
        assert list(zip(geo.rows.lo, geo.rows.hi)) == spans[idx]
        for i in range(h):
            rf = geo.at((i, h - 1 - i))
            (t, b), (le, r) = spans[idx][i], spans[idx][h - 1 - i]
            assert rf.box == (t, le, b + 1, r + 1)
            assert rf.field == (
                jump * i + offset,
                jump * (h - 1 - i) + offset,
                jump * i + offset + size,
                jump * (h - 1 - i) + offset + size,
            )
    assert_unchanged(net, before)
    assert not torch._C._is_torch_function_mode_enabled()


# -- real architectures: the field is the bounding box of gradient supports --------------------------
def _support_box(model: Model, layer: str, pos: tuple[int, int], size: int) -> tuple[int, int, int, int]:
    """Bounding box of the plain input gradient of every channel at ``pos``, over 4 random inputs."""
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    a = capture(model, x, [layer], grad=True)[layer]
    seed = torch.zeros_like(a)
    seed[:, :, pos[0], pos[1]] = 1.0
    (g,) = torch.autograd.grad(a, x, seed)
    sup = (g != 0).any(0).any(0)
    rows, cols = torch.nonzero(sup.any(1)).flatten(), torch.nonzero(sup.any(0)).flatten()
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


NETS = {
    "alexnet": (lambda: torchvision.models.alexnet(), {"features.2": (19, 8), "features.5": (67, 16), "features.6": (99, 16)}),
    "googlenet": (
        lambda: torchvision.models.googlenet(init_weights=False, aux_logits=False),
        {"maxpool1": (11, 4), "inception3a": (43, 8), "inception4a": (107, 16)},
    ),
    "resnet18": (lambda: torchvision.models.resnet18(), {"maxpool": (11, 4), "layer1": (43, 4), "layer2": (99, 8)}),
}


@pytest.mark.parametrize("name", list(NETS))
def test_fields_match_gradient_support_on_torchvision_nets(name):
    torch.manual_seed(0)
    build, known = NETS[name]
    net = build().eval()
    size = 128
    m = Model(net, Preprocessing((size, size)))
    before = snapshot(net)
    for layer, (rf_size, stride) in known.items():
        geo = layer_field(m, layer)
        assert geo.size == (rf_size, rf_size) and geo.stride == (stride, stride), (layer, geo.size, geo.stride)
        h, w = geo.output_size
        for pos in [(0, 0), (h // 2, w // 2), (h - 1, w - 1), (0, w // 2 + 1)]:
            assert geo.at(pos).box == _support_box(m, layer, pos, size), (layer, pos)
    assert_unchanged(net, before)


def test_default_efficientnet_fields(default_model):
    m = default_model
    expected = {"bn1": (3, 2), "blocks.1": (19, 4), "blocks.2": (67, 8)}
    for layer, (rf_size, stride) in expected.items():
        geo = layer_field(m, layer)
        assert geo.size == (rf_size, rf_size) and geo.stride == (stride, stride)
    geo = layer_field(m, "blocks.2")
    for pos in [(0, 0), (14, 14), (27, 5)]:
        assert geo.at(pos).box == _support_box(m, "blocks.2", pos, 224)
    # TensorFlow "same" padding pads only the bottom/right here: the field of (0, 0) is rows 0-2, unclipped
    assert layer_field(m, "bn1").at((0, 0)).box == layer_field(m, "bn1").at((0, 0)).field == (0, 0, 3, 3)
    assert layer_field(m, "bn1").at((5, 5)).box == (10, 10, 13, 13)
    # the logits see the whole input
    logits = receptive_field(m, "logits:3")
    assert logits.box == logits.field == (0, 0, 224, 224) and logits.position is None


USER_MODEL = """
import torch
from torch import nn


class TinyUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.skip = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.mid = nn.Conv2d(4, 4, 3, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.fuse = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        low = torch.relu(self.mid(torch.relu(self.down(x))))
        return self.fuse(torch.cat([torch.relu(self.skip(x)), self.up(low)], 1))


def build():
    torch.manual_seed(0)
    return TinyUNet()
"""


def test_user_module_with_branches_and_upsampling(tmp_path):
    path = tmp_path / "unet.py"
    path.write_text(textwrap.dedent(USER_MODEL))
    m = load_model(f"{path}:build", device="cpu", input_size=32)
    geo = layer_field(m, "fuse")
    assert geo.output_size == (32, 32) and geo.size == (7, 7)
    for i in range(32):
        # the upsampled branch sees input rows 2·(i//2) − 3 … 2·(i//2) + 3; the skip branch i − 1 … i + 1
        lo, hi = max(0, 2 * (i // 2) - 3), min(31, 2 * (i // 2) + 3)
        assert geo.at((i, i)).box == (lo, lo, hi + 1, hi + 1)
    for pos in [(0, 0), (7, 8), (31, 30)]:
        assert geo.at(pos).box == _support_box(m, "fuse", pos, 32)


def test_fields_are_cached_per_layer_and_input_size(default_model):
    m = default_model
    first = layer_field(m, "blocks.1")
    assert layer_field(m, "blocks.1") is first
    other = layer_field(m, "blocks.1", (160, 160))
    assert other is not first and other.input_size == (160, 160) and other.output_size == (40, 40)
    assert other.size == first.size


def test_fields_are_recomputed_when_a_module_is_replaced():
    net = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.Conv2d(2, 2, 3)).eval()
    m = Model(net, Preprocessing((24, 24)))
    first = layer_field(m, "2")
    assert first.size == (5, 5) and layer_field(m, "2") is first
    net[2] = nn.Conv2d(2, 2, 5, stride=2)  # a stale cache would still say 5x5, stride 1
    geo = layer_field(m, "2")
    assert geo.size == (7, 7) and geo.stride == (2.0, 2.0) and geo.output_size == (9, 9)


class _HeadFor32(nn.Module):
    """Convs that run at any size, then a head that only fits a 32x32 input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 2, 3)
        self.head = nn.Linear(2 * 30 * 30, 4)

    def forward(self, x):
        return self.head(self.conv(x).flatten(1))


def test_probe_batch_falls_back_only_when_the_network_fails_past_the_layer(monkeypatch):
    from deepvis.backprop import receptive
    from deepvis.errors import ModelError

    m = Model(_HeadFor32().eval(), Preprocessing((32, 32)))
    geo = layer_field(m, "conv", (20, 20))  # the head fails at 20x20; the conv's field does not need it
    assert geo.size == (3, 3) and geo.output_size == (18, 18)
    assert receptive._probe_batch(m, "conv", (3, 20, 20)) == receptive._PROBE_FALLBACK_BATCH

    def broken(*_a, **_k):
        raise ModelError("not a size problem")

    monkeypatch.setattr(receptive, "layer_table", broken)
    with pytest.raises(ModelError, match="not a size problem"):  # any other error is not turned into a batch size
        layer_field(m, "conv", (24, 24), method="probe")  # the graph path (the default here) runs no probe


def test_bad_layers_and_positions(default_model):
    with pytest.raises(LayerError, match="did you mean"):
        layer_field(default_model, "blocks.33")
    with pytest.raises(UnitError, match="outside the 28x28"):
        receptive_field(default_model, "blocks.2:0@28,0")


# -- crops -----------------------------------------------------------------------------------------------
def test_crops_are_padded_to_the_full_field():
    net = nn.Sequential(nn.Conv2d(3, 2, 5, stride=2, padding=2), nn.ReLU(), nn.Conv2d(2, 2, 5, stride=2, padding=2)).eval()
    m = Model(net, Preprocessing((20, 20)))
    rf = receptive_field(m, "2:0@0,4")
    assert rf.size == (13, 13) and rf.field == (-6, 10, 7, 23) and rf.box == (0, 10, 7, 20) and rf.clipped
    image = np.arange(400, dtype=np.int32).reshape(20, 20)
    c = crop(image, rf, fill=-1)
    assert c.shape == (13, 13)
    assert (c[:6] == -1).all() and (c[:, 10:] == -1).all()
    assert (c[6:, :10] == image[0:7, 10:20]).all()
    t = torch.arange(1200, dtype=torch.float32).view(3, 20, 20)
    ct = crop(t, rf, fill=0.5)
    assert ct.shape == (3, 13, 13) and torch.equal(ct[:, 6:, :10], t[:, 0:7, 10:20]) and float(ct[0, 0, 0]) == 0.5
    rgb = Image.fromarray(np.full((20, 20, 3), 200, np.uint8))
    ci = crop_image(rgb, rf, fill=(0, 0, 255))
    assert ci.size == (13, 13) and ci.getpixel((0, 0)) == (0, 0, 255) and ci.getpixel((0, 12)) == (200, 200, 200)
    inside = receptive_field(m, "2:0@2,2")
    assert not inside.clipped and crop(image, inside).shape == (13, 13)
    with pytest.raises(DeepvisError, match="20x20"):
        crop(np.zeros((10, 10)), rf)


def test_crops_of_fields_larger_than_the_input_are_input_sized_and_centred():
    # four k=3 s=2 convs: a 31-px field at stride 16 on a 20-px input, larger than the input
    layers: list[nn.Module] = []
    for i in range(4):
        layers += [nn.Conv2d(3 if i == 0 else 2, 2, 3, stride=2, padding=1), nn.ReLU()]
    m = Model(nn.Sequential(*layers).eval(), Preprocessing((20, 20)))
    rf = receptive_field(m, "6:0@0,1")
    assert rf.size == (31, 31) and rf.field == (-15, 1, 16, 32) and rf.clipped
    image = np.arange(400, dtype=np.int32).reshape(20, 20)
    c = crop(image, rf, fill=-1)
    # the window: 20 px centred on the field's centre (0.5 and 16.5) -> rows [-10, 10), columns [6, 26)
    assert c.shape == (20, 20)
    assert (c[:10] == -1).all() and (c[:, 14:] == -1).all()
    assert (c[10:, :14] == image[0:10, 6:20]).all()


# -- exact fields from the graph, also larger than the input ------------------------------------------
def _k3s2(depth: int) -> nn.Module:
    chans = [3] + [2] * depth
    return nn.Sequential(*(nn.Sequential(nn.Conv2d(a, b, 3, stride=2, padding=1), nn.ReLU()) for a, b in zip(chans, chans[1:])))


@pytest.mark.parametrize("depth", [3, 5, 6])
def test_deep_k3_s2_stacks_by_formula_also_past_the_input(depth):
    net = _k3s2(depth).eval()
    n = 40
    m = Model(net, Preprocessing((n, n)))
    before = snapshot(net)
    geo = layer_field(m, str(depth - 1))
    size, stride = 2 ** (depth + 1) - 1, 2**depth  # 1 + sum 2·2^i; each conv adds 2 taps of the current jump
    assert geo.source == "graph" and geo.whole_image is None
    assert geo.size == (size, size) and geo.stride == (stride, stride) and geo.offset == (1 - stride, 1 - stride)
    h = geo.output_size[0]
    for i in range(h):
        rf = geo.at((i, i))
        top = stride * i + 1 - stride
        assert rf.field == (top, top, top + size, top + size)
        assert rf.box == (max(top, 0), max(top, 0), min(top + size, n), min(top + size, n))
        assert rf.clipped == (top < 0 or top + size > n)
    assert geo.at((h - 1, 0)).clipped
    assert_unchanged(net, before)
    assert all(not mod._forward_hooks and not mod._forward_pre_hooks for mod in net.modules())
    assert not torch._C._is_torch_function_mode_enabled()


def test_graph_and_probe_agree_and_a_larger_canvas_shows_the_full_probe_field():
    net = _k3s2(5).eval()
    m = Model(net, Preprocessing((40, 40)))
    small = layer_field(m, "4", method="graph")  # 63 px on a 40-px input
    big = layer_field(m, "4", (160, 160), method="probe")  # the probe sees the whole field on a 160-px canvas
    assert small.size == big.size == (63, 63) and small.stride == big.stride == (32, 32)
    assert layer_field(m, "4", (160, 160), method="graph").rows == big.rows
    r18 = Model(torchvision.models.resnet18().eval(), Preprocessing((64, 64)))
    for layer in ("maxpool", "layer1", "layer2"):
        graph, probe = layer_field(r18, layer, method="graph"), layer_field(r18, layer, method="probe")
        assert graph.source == "graph" and probe.source == "probe"
        assert [graph.rows.lo, graph.rows.hi, graph.cols.lo, graph.cols.hi] == [probe.rows.lo, probe.rows.hi, probe.cols.lo, probe.cols.hi]
        wide = layer_field(r18, layer, (224, 224), method="probe")
        assert graph.size == wide.size and graph.stride == wide.stride, layer  # layer2: 99 px > 64 px


DEEP = {
    # (constructor, layer, position, size, stride, clipped) for a 224-px input: fields larger than the input
    "resnet50 layer3": (torchvision.models.resnet50, "layer3", (3, 3), 267, 16, True),
    "resnet50 layer4": (torchvision.models.resnet50, "layer4", (3, 3), 427, 32, True),
    "alexnet features.12": (torchvision.models.alexnet, "features.12", (3, 3), 195, 32, True),
}


@pytest.fixture(scope="module")
def torchvision_nets():
    torch.manual_seed(0)
    return {"resnet50": torchvision.models.resnet50().eval(), "alexnet": torchvision.models.alexnet().eval()}


@pytest.mark.parametrize("name", list(DEEP))
def test_deep_torchvision_layers_whose_fields_exceed_the_input(name, torchvision_nets):
    build, layer, pos, size, stride, clipped = DEEP[name]
    net = torchvision_nets[build.__name__]
    before = snapshot(net)
    m = Model(net, Preprocessing((224, 224)))
    geo = layer_field(m, layer)
    assert geo.source == "graph" and geo.size == (size, size) and geo.stride == (stride, stride)
    rf = geo.at(pos)
    assert rf.size == (size, size) and rf.clipped is clipped
    top, left, bottom, right = rf.field
    assert rf.box == (max(top, 0), max(left, 0), min(bottom, 224), min(right, 224))
    assert_unchanged(net, before)


def test_alexnet_feature12_field_is_195_px_and_clipped(torchvision_nets):
    m = Model(torchvision_nets["alexnet"], Preprocessing((224, 224)))
    rf = receptive_field(m, "features.12:0@3,3")
    assert rf.field == (30, 30, 225, 225) and rf.box == (30, 30, 224, 224) and rf.clipped
    assert rf.to_dict()["clipped"] is True


# -- the whole image, with the reason -------------------------------------------------------------------
class _Hybrid(nn.Module):
    """A conv stem, one attention block over its positions, back to a map, then a conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 4, stride=4)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.after = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        a = self.stem(x)
        n, c, h, w = a.shape
        t = a.flatten(2).transpose(1, 2)
        t = t + self.attn(t, t, t, need_weights=False)[0]
        return self.after(t.transpose(1, 2).reshape(n, c, h, w))


class _SelfAttention(nn.Module):
    """Hand-written attention (softmax of q·kᵀ), as in many user models."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, t):
        q, k, v = self.qkv(t).chunk(3, dim=-1)
        return torch.softmax(q @ k.transpose(1, 2), dim=-1) @ v


class _HandHybrid(_Hybrid):
    def __init__(self) -> None:
        super().__init__()
        self.attn = _SelfAttention()  # type: ignore[assignment]  # a different attention module

    def forward(self, x):
        a = self.stem(x)
        n, c, h, w = a.shape
        t = self.attn(a.flatten(2).transpose(1, 2))
        return self.after(t.transpose(1, 2).reshape(n, c, h, w))


class _Squeeze(nn.Module):
    """A conv, then x · sigmoid(mean(x)) (squeeze-excitation) and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = nn.Identity()
        self.fc = nn.Linear(4 * 30 * 30, 5)

    def forward(self, x):
        a = self.conv(x)
        g = self.gate(a * torch.sigmoid(a.mean((2, 3), keepdim=True)))
        return self.fc(g.flatten(1))


@pytest.mark.parametrize("cls", [_Hybrid, _HandHybrid])
def test_after_attention_the_field_is_the_whole_image(cls):
    torch.manual_seed(0)
    net = cls().eval()
    before = snapshot(net)
    m = Model(net, Preprocessing((32, 32)))
    stem = layer_field(m, "stem")
    assert stem.size == (4, 4) and stem.stride == (4, 4) and stem.whole_image is None
    geo = layer_field(m, "after")
    assert geo.whole_image is not None and "attention" in geo.whole_image and "attn" in geo.whole_image
    assert geo.output_size == (8, 8) and geo.size == (32, 32)
    assert geo.at((0, 0)).box == geo.at((7, 7)).box == (0, 0, 32, 32) and not geo.at((0, 0)).clipped
    assert geo.at((2, 5)).box == _support_box(m, "after", (2, 5), 32)  # the gradient agrees
    assert_unchanged(net, before)


def test_global_pooling_and_fully_connected_layers_see_the_whole_image():
    net = _Squeeze().eval()
    m = Model(net, Preprocessing((32, 32)))
    assert layer_field(m, "conv").size == (3, 3)
    gate = layer_field(m, "gate")
    assert gate.whole_image is not None and "global pooling" in gate.whole_image
    fc = layer_field(m, "fc")
    assert fc.whole_image is not None and fc.at(None).box == (0, 0, 32, 32)
    with pytest.raises(DeepvisError, match="cannot be composed"):
        layer_field(load_model_unet(), "fuse", method="graph")  # upsampling: the probe's work


def load_model_unet() -> Model:
    ns: dict = {}
    exec(textwrap.dedent(USER_MODEL), ns)
    return Model(ns["build"]().eval(), Preprocessing((32, 32)))


def test_vit_token_layers_see_the_whole_image_after_the_first_attention_block():
    torch.manual_seed(0)
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32).eval()
    m = Model(vit, Preprocessing((32, 32)))
    patches = layer_field(m, "conv_proj")
    assert patches.size == (8, 8) and patches.stride == (8, 8) and patches.whole_image is None
    for layer in ("encoder.layers.encoder_layer_0", "encoder.layers.encoder_layer_1.mlp"):
        geo = layer_field(m, layer)
        reason = geo.whole_image or ""
        assert reason.startswith("attention") and "encoder.layers.encoder_layer_0.self_attention" in reason, (layer, reason)
        assert geo.at(None).box == (0, 0, 32, 32)
