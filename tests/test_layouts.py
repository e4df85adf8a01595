"""Layouts: channels-last maps, ViT tokens with prefix tokens, declared layouts and the unit addresses on them."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from torch import nn

from deepvis.capture import Unit, capture, check_unit, get_layer, layer_table, parse_unit, prefix_key
from deepvis.errors import LayerError, UnitError
from deepvis.models import Model, Preprocessing
from helpers import assert_unchanged, hooks_left, snapshot


def _wrap(module: nn.Module, size: int) -> Model:
    return Model(module.eval(), Preprocessing((size, size), (0.5,) * 3, (0.5,) * 3))


class _Twin(nn.Module):
    """A conv net; ``last=True`` permutes the middle layer to (N, H, W, C) and back."""

    def __init__(self, last: bool) -> None:
        super().__init__()
        self.last = last
        self.conv = nn.Conv2d(3, 6, 3, stride=2)
        self.mid = nn.GELU()
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.last:
            y = y.permute(0, 2, 3, 1)
        y = self.mid(y)
        if self.last:
            y = y.permute(0, 3, 1, 2)
        return self.head(y.mean((2, 3)))


class _PatchEmbed(nn.Module):
    patch_size = (8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _TinyViT(nn.Module):
    """Tokens built from a known map: patch token (y, x) holds the 8x8 pooled input at (y, x); one class token."""

    num_prefix_tokens = 1

    def __init__(self, fixed: bool = True) -> None:
        super().__init__()
        self.fixed = fixed
        self.patch_embed = _PatchEmbed()
        self.cls_token = nn.Parameter(torch.full((1, 1, 3), 7.0))
        self.block = nn.Identity()
        self.head = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed:
            assert x.shape[-1] == 32, "fixed input size"
        m = nn.functional.avg_pool2d(x, 8)  # (N, 3, H/8, W/8)
        tokens = m.flatten(2).transpose(1, 2)  # (N, L, 3)
        tokens = torch.cat([self.cls_token.expand(len(x), -1, -1), tokens], 1)
        return self.head(self.block(tokens)[:, 0])


def test_nhwc_model_reads_like_its_nchw_twin():
    torch.manual_seed(0)
    a, b = _Twin(False), _Twin(True)
    b.load_state_dict(a.state_dict())
    ma, mb = _wrap(a, 32), _wrap(b, 32)
    ia, ib = get_layer(ma, "mid"), get_layer(mb, "mid")
    assert ia.layout.kind == "maps" and ib.layout.kind == "maps-last"
    assert ia.shape == ib.shape == (6, 15, 15) and ib.raw_shape == (15, 15, 6)
    x = torch.randn(2, 3, 32, 32)
    before = snapshot(b)
    got_a, got_b = capture(ma, x, ["mid"])["mid"], capture(mb, x, ["mid"])["mid"]
    assert got_b.shape == (2, 6, 15, 15) and torch.allclose(got_a, got_b, atol=1e-6)  # GELU on NHWC memory: same values to rounding
    assert hooks_left(b) == [] and assert_unchanged(b, before) is None


def test_tokens_built_from_a_known_map_give_that_map_back():
    model = _wrap(_TinyViT(), 32)
    info = get_layer(model, "block")
    assert info.layout.kind == "tokens" and info.prefix == ("cls",) and info.shape == (3, 4, 4) and info.raw_shape == (17, 3)
    x = torch.randn(2, 3, 32, 32)
    out = capture(model, x, ["block"], prefix=True)
    assert torch.allclose(out["block"], nn.functional.avg_pool2d(x, 8))
    assert out[prefix_key("block")].shape == (2, 3, 1) and (out[prefix_key("block")] == 7).all()
    assert check_unit(model, parse_unit("block:2@cls")) is info and check_unit(model, parse_unit("block:2@#0")) is info
    check_unit(model, parse_unit("block:2@3,3"))
    with pytest.raises(UnitError, match="outside the 4x4 patch grid"):
        check_unit(model, parse_unit("block:2@4,0"))
    with pytest.raises(UnitError, match="no prefix token 'dist'"):
        check_unit(model, parse_unit("block:2@dist"))
    assert hooks_left(model.module) == []


def test_tokens_measured_by_a_second_probe_and_declared():
    net = _TinyViT(fixed=False)
    del type(net).num_prefix_tokens  # the model says nothing: the second probe tells
    try:
        info = get_layer(_wrap(net, 32), "block")
        assert info.layout.kind == "tokens" and len(info.prefix) == 1 and info.shape == (3, 4, 4)
        fixed = _TinyViT(fixed=True)
        with pytest.raises(LayerError, match=r"cannot tell the layout of layer block .*--layout block=tokens:P"):
            get_layer(_wrap(fixed, 32), "block")
        declared = _wrap(fixed, 32)
        declared.layouts["block"] = "tokens:1"
        assert get_layer(declared, "block").shape == (3, 4, 4)
    finally:
        _TinyViT.num_prefix_tokens = 1


def test_at_token_on_a_map_layer_is_a_unit_error():
    model = _wrap(_Twin(False), 32)
    with pytest.raises(UnitError, match="without prefix tokens"):
        check_unit(model, Unit("mid", 0, token="cls"))


@pytest.mark.parametrize(
    ("name", "size", "prefix"),
    [
        ("vit_tiny_patch16_224", 224, ("cls",)),
        ("deit_tiny_distilled_patch16_224", 224, ("cls", "dist")),
        ("vit_little_patch16_reg4_gap_256", 256, ("reg0", "reg1", "reg2", "reg3")),
    ],
)
def test_timm_vit_prefix_tokens(name, size, prefix):
    torch.manual_seed(0)
    net = timm.create_model(name, pretrained=False)
    model = _wrap(net, size)
    info = get_layer(model, "blocks.5")
    g = size // 16
    assert info.layout.kind == "tokens" and info.prefix == prefix and info.shape[1:] == (g, g)
    x = torch.randn(1, 3, size, size)
    before = snapshot(net)
    with torch.no_grad():
        raw = net.blocks[:6](net._pos_embed(net.patch_embed(x)))
    out = capture(model, x, ["blocks.5"], prefix=True)
    assert torch.allclose(out["blocks.5"], raw[:, len(prefix) :].reshape(1, g, g, -1).permute(0, 3, 1, 2), atol=1e-5)
    assert torch.allclose(out[prefix_key("blocks.5")], raw[:, : len(prefix)].transpose(1, 2), atol=1e-5)
    assert hooks_left(net) == [] and assert_unchanged(net, before) is None
    names = {r.name: r for r in layer_table(model, everything=True)}
    assert not names["blocks.0.attn.q_norm"].viewable  # per-head features are not read as maps


@pytest.mark.slow
def test_torchvision_vit_b_16_prefix_token():
    net = torchvision.models.vit_b_16()
    info = get_layer(_wrap(net, 224), "encoder.layers.encoder_layer_5")
    assert info.layout.kind == "tokens" and info.prefix == ("cls",) and info.shape == (768, 14, 14)


def test_timm_swin_reads_as_maps_last():
    net = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False)
    model = _wrap(net, 224)
    a, d = get_layer(model, "layers.0"), get_layer(model, "layers.3")
    assert (a.layout.kind, a.shape, d.layout.kind, d.shape) == ("maps-last", (96, 56, 56), "maps-last", (768, 7, 7))
    assert get_layer(model, "patch_embed.proj").layout.kind == "maps"
    x = torch.randn(1, 3, 224, 224)
    got = capture(model, x, ["layers.0"])["layers.0"]
    with torch.no_grad():
        want = net.layers[0](net.patch_embed(x)).permute(0, 3, 1, 2)
    assert torch.allclose(got, want, atol=1e-5) and hooks_left(net) == []


@pytest.mark.slow
def test_torchvision_swin_reads_as_maps_last():
    model = _wrap(torchvision.models.swin_t(), 224)
    a, d = get_layer(model, "features.1"), get_layer(model, "features.7")
    assert (a.layout.kind, a.shape, d.layout.kind, d.shape) == ("maps-last", (96, 56, 56), "maps-last", (768, 7, 7))


def test_cannot_tell_is_one_line_and_hidden():
    class Amb(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c, self.act, self.fc = nn.Conv2d(3, 8, 3, stride=4, padding=1), nn.GELU(), nn.Linear(512, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.act(self.c(x).permute(0, 2, 3, 1)).flatten(1))

    model = _wrap(Amb(), 32)
    assert "act" not in [r.name for r in layer_table(model)]
    with pytest.raises(LayerError, match=r"cannot tell the layout of layer act \(output 8x8x8 per example\).*--layout act=nchw\|nhwc"):
        capture(model, torch.randn(1, 3, 32, 32), ["act"])
    model.layouts["act"] = "nhwc"
    assert get_layer(model, "act").layout.kind == "maps-last"


def test_tools_read_prefix_tokens():
    from deepvis.backprop import backprop_view, receptive_field
    from deepvis.optimize import visualize

    # every tool reads @cls as the class token's vector, never the patch grid (known answers: tests/test_prefix_tokens.py)
    unit = parse_unit("block:2@cls")
    model = _wrap(_TinyViT(), 32)
    x = torch.zeros(1, 3, 32, 32)
    (res,) = visualize(model, [unit], steps=1, size=32)
    assert res.unit == "block:2@cls" and res.value == 7
    assert backprop_view(model, x, unit, "gradient").activation == 7
    assert receptive_field(model, unit).input_independent  # here the class token never meets the patches
    assert hooks_left(model.module) == []


class _Shuffled(nn.Module):
    """Patch tokens (N, 64, C) from an 8x8 grid, then ``order`` (a fixed permutation, e.g. Hiera's
    mask-unit "unrolling"), a per-token MLP, and a token mean."""

    def __init__(self, order: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("order", order)
        self.embed = nn.Conv2d(3, 8, 8, stride=8)
        self.tokens = nn.Identity()
        self.shuffle = _Gather(order)
        self.mlp = nn.Sequential(nn.Linear(8, 8), nn.GELU())
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tokens(self.embed(x).flatten(2).transpose(1, 2))
        return self.head(self.mlp(self.shuffle(t)).mean(1))


class _Gather(nn.Module):
    def __init__(self, order: torch.Tensor) -> None:
        super().__init__()
        self.order = order

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t[:, self.order]


@pytest.mark.parametrize("scrambled", [False, True])
def test_tokens_out_of_row_major_order_are_measured_and_not_drawn(scrambled):
    torch.manual_seed(0)
    # a transpose of the 8x8 grid (column-major order) moves every off-diagonal token; identity keeps them
    order = torch.arange(64).view(8, 8).t().reshape(-1) if scrambled else torch.arange(64)
    model = _wrap(_Shuffled(order), 64)
    table = {i.name: i for i in layer_table(model, everything=True)}
    assert table["tokens"].layout.kind == "tokens" and table["tokens"].layout.viewable  # before the shuffle: row-major
    for name in ("shuffle", "mlp.0", "mlp"):
        lay = table[name].layout
        if scrambled:
            assert not lay.viewable and "tokens are not in row-major order (measured" in lay.reason, (name, lay)
        else:
            assert lay.kind == "tokens" and lay.viewable
    # a declared layout is the user's word: not measured
    declared = {i.name: i for i in layer_table(model, everything=True, layouts={"shuffle": "tokens:0"})}
    assert declared["shuffle"].layout.viewable


def test_hiera_unrolled_stages_are_not_drawn_and_its_row_major_ones_are():
    torch.manual_seed(0)
    model = _wrap(timm.create_model("hiera_tiny_224", pretrained=False), 224)
    table = {i.name: i for i in layer_table(model, everything=True)}
    assert table["patch_embed"].layout.viewable and table["patch_embed"].shape == (96, 56, 56)
    for name in ("unroll", "blocks.0", "blocks.2", "blocks.5"):  # mask-unit order: 56x56, 28x28, 14x14 grids
        assert "not in row-major order" in table[name].layout.reason, name
    assert table["blocks.11"].layout.viewable and table["blocks.11"].shape == (768, 7, 7)  # the last stage: row-major again


@pytest.mark.parametrize(
    "name,layer,pair",
    [
        ("xcit_nano_12_p16_224", "blocks.0.attn.attn_drop", "32x32"),  # channel-by-channel attention (heads, C/h, C/h)
        ("cait_xxs24_224", "blocks.0.attn.proj_l", "196x196"),  # talking heads over (queries, keys, heads)
    ],
)
def test_pairs_of_other_axes_inside_a_transformer_are_not_read_as_maps(name, layer, pair):
    torch.manual_seed(0)
    model = _wrap(timm.create_model(name, pretrained=False), 224)
    table = {i.name: i for i in layer_table(model, everything=True)}
    lay = table[layer].layout
    assert not lay.viewable and lay.reason.startswith(f"a {pair} pair of axes inside a transformer whose patch grid is 14x14")
    assert table["blocks.0"].layout.kind == "tokens" and table["blocks.0"].shape[1:] == (14, 14)


class _Heads(nn.Module):
    """(N, 32, 7, 7) maps → (N, 4 heads, 49 tokens, 8): per-head features, not a map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        return x.flatten(2).transpose(1, 2).reshape(n, 49, 4, 8).transpose(1, 2)


def test_the_hint_for_an_untold_layout_names_what_it_likely_is():
    net = nn.Sequential()
    net.add_module("conv", nn.Conv2d(3, 32, 4, stride=4))
    net.add_module("heads", _Heads())
    model = _wrap(net, 28)
    (info,) = [i for i in layer_table(model, everything=True) if i.name == "heads"]
    assert not info.layout.viewable
    assert info.layout.reason == (
        "cannot tell the layout of layer heads (output 4x49x8 per example): declare it with --layout heads=nchw|nhwc, "
        "or none when it is not a map, e.g. 4 heads x 49 tokens x 8 (Python: model.layouts['heads'] = 'nchw')"
    )
