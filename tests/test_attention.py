"""Attention that exists (timm's fused path switched, torchvision's per-head weights asked for), drawn per
head for a query token; prefix tokens drawn apart as a strip. Known answers, hooks gone, model unchanged."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.models.vision_transformer import Attention
from torch import nn
from torchvision.models.vision_transformer import VisionTransformer

from deepvis.activations import activation_views
from deepvis.capture import capture, get_layer, layer_table, prefix_key
from deepvis.capture.attention import mha_weights
from deepvis.capture.layouts import parse_query
from deepvis.errors import UnitError
from deepvis.models import Model, Preprocessing
from deepvis.pixels import to_uint8
from helpers import assert_unchanged, hooks_left, snapshot

BETA = 3.0


def _wrap(module: nn.Module, size: int) -> Model:
    return Model(module.eval(), Preprocessing((size, size), (0.5,) * 3, (0.5,) * 3))


class _PatchEmbed(nn.Module):
    patch_size = (8, 8)


class _AttnViT(nn.Module):
    """One timm ``Attention`` (2 heads of dim 2, fused path on) over tokens built from a known map.

    Token features are [a, b, a, b]: the class token a=1, b=0; patch j a=0, b=m_j (the 8x8 pooled
    input's channel 0). Head 0's queries are 0: every row is uniform, 1/L. Head 1's query is BETA*a and
    its key b: the class token's row is softmax(BETA / sqrt(2) * [0, m_1, ..., m_n]); a patch's row is
    uniform (its a is 0).
    """

    num_prefix_tokens = 1

    def __init__(self, boom: bool = False) -> None:
        super().__init__()
        self.boom = boom
        self.patch_embed = _PatchEmbed()
        self.cls_token = nn.Parameter(torch.tensor([[[1.0, 0.0, 1.0, 0.0]]]))
        self.attn = Attention(4, num_heads=2)
        self.attn.fused_attn = True
        w = torch.zeros(12, 4)
        w[2, 2] = BETA  # head 1's query, dim 0: BETA * a
        w[4 + 2, 3] = 1.0  # head 1's key, dim 0: b
        w[8:12] = torch.eye(4)  # values: the tokens
        with torch.no_grad():
            self.attn.qkv.weight.copy_(w)
        self.head = nn.Linear(4, 2)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        m = nn.functional.avg_pool2d(x[:, :1], 8).flatten(2).transpose(1, 2)  # (N, L-1, 1)
        z = torch.zeros_like(m)
        patches = torch.cat([z, m, z, m], 2)
        return torch.cat([self.cls_token.expand(len(x), -1, -1), patches], 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.attn(self.tokens(x))
        if self.boom:
            raise RuntimeError("boom after the attention")
        return self.head(y[:, 0])


def test_hand_set_attention_rows_are_analytic():
    net = _AttnViT()
    model = _wrap(net, 32)
    info = get_layer(model, "attn.attn_drop")
    assert info.layout.kind == "attention" and info.prefix == ("cls",) and info.shape == (2, 4, 4) and info.raw_shape == (2, 17, 17)
    x = torch.randn(2, 3, 32, 32)
    before = snapshot(net)
    out = capture(model, x, ["attn.attn_drop"], prefix=True)
    rows, pre = out["attn.attn_drop"], out[prefix_key("attn.attn_drop")]  # (2, heads, 4, 4), (2, heads, 1)
    m = nn.functional.avg_pool2d(x[:, :1], 8).flatten(1)  # (2, 16)
    want = torch.softmax(BETA / math.sqrt(2) * torch.cat([torch.zeros(2, 1), m], 1), 1)
    assert torch.allclose(rows[:, 1].flatten(1), want[:, 1:], atol=1e-6) and torch.allclose(pre[:, 1, 0], want[:, 0], atol=1e-6)
    assert torch.allclose(rows[:, 0], torch.full_like(rows[:, 0], 1 / 17)) and torch.allclose(pre[:, 0], torch.full_like(pre[:, 0], 1 / 17))
    # a patch as the query: its a is 0, so both heads attend uniformly
    patch = capture(model, x, ["attn.attn_drop"], query=(2, 3))["attn.attn_drop"]
    assert torch.allclose(patch, torch.full_like(patch, 1 / 17))
    assert net.attn.fused_attn is True and hooks_left(net) == [] and assert_unchanged(net, before) is None
    with pytest.raises(UnitError, match="outside the 4x4 patch grid"):
        capture(model, x, ["attn.attn_drop"], query=(4, 0))
    with pytest.raises(UnitError, match="no prefix token 'dist'"):
        capture(model, x, ["attn.attn_drop"], query="dist")


def test_the_switched_timm_path_equals_the_fused_one_and_is_put_back():
    torch.manual_seed(0)
    net = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64)
    model = _wrap(net, 64)
    names = {r.name: r for r in layer_table(model)}
    assert names["blocks.3.attn.attn_drop"].layout.describe() == "attention 1+4x4" and names["blocks.3.attn.attn_drop"].units == 3
    assert all(b.attn.fused_attn for b in net.blocks)  # the layer table's probe put every flag back
    x = torch.randn(2, 3, 64, 64)
    before = snapshot(net)
    fused = capture(model, x, ["blocks.3"])["blocks.3"]
    both = capture(model, x, ["blocks.3.attn.attn_drop", "blocks.3"], stop_early=False)
    assert torch.allclose(both["blocks.3"], fused, atol=1e-5)  # the explicit path: same block output to float rounding
    with torch.no_grad():
        full = net(x)
    got = capture(model, x, ["blocks.3.attn.attn_drop", "logits"], stop_early=False)["logits"]
    assert torch.allclose(got, full, atol=1e-5)
    assert all(b.attn.fused_attn for b in net.blocks) and hooks_left(net) == [] and assert_unchanged(net, before) is None


def test_flags_and_hooks_are_restored_when_the_forward_raises():
    net = _AttnViT(boom=True)
    model = Model(net.eval(), Preprocessing((32, 32), (0.5,) * 3, (0.5,) * 3))
    net.boom = False
    get_layer(model, "attn.attn_drop")  # the table is probed while the model works
    net.boom = True
    with pytest.raises(RuntimeError, match="boom"):
        capture(model, torch.randn(1, 3, 32, 32), ["attn.attn_drop", "logits"], stop_early=False)
    assert net.attn.fused_attn is True and hooks_left(net) == []


def _tiny_torchvision_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32).eval()


def test_torchvision_multihead_attention_gives_per_head_weights():
    net = _tiny_torchvision_vit()
    model = _wrap(net, 32)
    name = "encoder.layers.encoder_layer_1.self_attention.attn_weights"
    info = get_layer(model, name)
    assert info.layout.kind == "attention" and info.prefix == ("cls",) and info.shape == (2, 4, 4)
    x = torch.randn(2, 3, 32, 32)
    before = snapshot(net)
    block = "encoder.layers.encoder_layer_1"
    out = capture(model, x, ["encoder.layers.encoder_layer_1.ln_1", name, block], stop_early=False, prefix=True)
    plain = capture(model, x, [block])[block]
    assert torch.equal(out[block], plain)  # the model computes what it always computed
    ln = out["encoder.layers.encoder_layer_1.ln_1"]  # canonical (N, C, H, W) of the tokens: rebuild (N, L, C)
    mha = net.encoder.layers[1].self_attention
    with torch.no_grad():
        raw = capture(net, x, ["encoder.layers.encoder_layer_1.ln_1"])["encoder.layers.encoder_layer_1.ln_1"]
        _, want = mha(raw, raw, raw, need_weights=True, average_attn_weights=False)  # (N, heads, L, L)
    assert torch.allclose(ln.flatten(2).transpose(1, 2), raw[:, 1:], atol=1e-6)
    assert torch.allclose(out[name], want[:, :, 0, 1:].reshape(2, 2, 4, 4), atol=1e-6)
    assert torch.allclose(out[prefix_key(name)], want[:, :, 0, :1], atol=1e-6)
    assert hooks_left(net) == [] and assert_unchanged(net, before) is None


def test_a_caller_that_asks_for_averaged_weights_still_gets_them():
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        want_out, want_avg = mha(x, x, x)  # need_weights=True, averaged: torch's defaults
        got: list[torch.Tensor] = []
        with mha_weights({"a.attn_weights": mha}, lambda _n, _m, w: got.append(w)):
            out, avg = mha(x, x, x)
            out2, none = mha(x, x, x, None, False)  # need_weights=False, positionally
    assert torch.allclose(out, want_out, atol=1e-6) and torch.allclose(avg, want_avg, atol=1e-6) and none is None
    assert torch.allclose(out2, want_out, atol=1e-6)
    assert len(got) == 2 and got[0].shape == (1, 2, 5, 5) and torch.allclose(got[0].mean(1), want_avg, atol=1e-6)
    assert hooks_left(mha) == []


def test_parse_query():
    assert parse_query("cls") == "cls" and parse_query("3,5") == (3, 5) and parse_query("#1") == "#1" and parse_query(None) is None
    for bad in ("3,", "a,b", "c l s", "-1,2", "3"):
        with pytest.raises(UnitError, match="bad query"):
            parse_query(bad)


def test_attention_drawn_one_tile_per_head_with_the_prefix_keys_apart():
    model = _wrap(_AttnViT(), 32)
    im = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    v = next(activation_views(model, [im], "attn.attn_drop", k=0, normalize="none", scale=1))
    assert v.query == "cls" and v.activations.shape == (2, 4, 4) and v.prefix is not None and v.prefix.shape == (2, 1)
    assert v.strip is not None and v.picture.shape[0] == v.grid.shape[0] + 2 + v.strip.shape[0]
    q = next(activation_views(model, [im], "attn.attn_drop", k=0, query=(1, 2)))
    assert q.query == "1,2" and torch.allclose(q.activations, torch.full((2, 4, 4), 1 / 17))
    with pytest.raises(UnitError, match="applies to attention layers"):
        next(activation_views(model, [im], "attn.qkv", k=0, query="cls"))


def test_strip_cells_equal_the_prefix_tokens():
    """The token layer attn.qkv (1 + 4x4 tokens, 12 channels): the strip's cells are its class token's
    values on the grid's scale, in channel order."""
    from deepvis.render.strip import STRIP_ROW, strip_geometry

    model = _wrap(_AttnViT(), 32)
    im = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    v = next(activation_views(model, [im], "attn.qkv", k=0, normalize="layer", scale=1))
    info = get_layer(model, "attn.qkv")
    assert info.prefix == ("cls",) and v.prefix is not None and v.strip is not None
    x = model.preprocess([im])
    with torch.no_grad():
        want = model.module.attn.qkv(model.module.tokens(x))[0, 0]  # the class token's 12 values
    assert torch.allclose(v.prefix[:, 0], want, atol=1e-6)
    a = v.activations
    lo, hi = min(float(a.min()), 0.0), float(a.max())
    expect = to_uint8(np.clip((want.numpy() - lo) / (hi - lo), 0, 1))
    x0, cw = strip_geometry(info.prefix, 12, v.grid.shape[1])
    y = 1 + STRIP_ROW // 2
    cells = v.strip[y, [x0 + c * cw + cw // 2 for c in range(12)], 0]
    assert np.array_equal(cells, expect)


def test_cli_draws_attention_for_a_query_and_refuses_a_bad_one(tmp_path, capsys):
    from deepvis.cli import main

    factory = tmp_path / "attnvit.py"
    factory.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\nfrom test_attention import _AttnViT\ndef build():\n    return _AttnViT()\n"
    )
    out = tmp_path / "attn.png"
    spec = ["--model", f"{factory}:build", "--input-size", "32", "-k", "0"]
    assert main(["activations", "sample:coffee", "--layer", "attn.attn_drop", "--query", "1,2", "-o", str(out), *spec]) == 0
    assert Image.open(out).size[0] > 0
    capsys.readouterr()
    assert main(["activations", "sample:coffee", "--layer", "attn.qkv", "--query", "cls", "-o", str(out), *spec]) == 2
    assert "--query applies to attention layers" in capsys.readouterr().err
    assert main(["activations", "sample:coffee", "--layer", "attn.attn_drop", "--query", "4,0", "-o", str(out), *spec]) == 2
    assert "outside the 4x4 patch grid" in capsys.readouterr().err
    assert main(["activations", "sample:coffee", "--layer", "attn.attn_drop", "--query", "4", "-o", str(out), *spec]) == 2
    assert "bad query" in capsys.readouterr().err
    tokens = tmp_path / "tokens.png"
    assert main(["activations", "sample:coffee", "--layer", "attn.qkv", "--grid-only", "-o", str(tokens), *spec]) == 0
    from deepvis.io import load_image, sample_path

    view = next(activation_views(_wrap(_AttnViT(), 32), [load_image(sample_path("coffee"))], "attn.qkv", k=0))
    assert view.strip is not None and Image.open(tokens).size[::-1] == view.picture.shape[:2]  # the grid and the strip under it


class _ConvMHA(nn.Module):
    """A user's own attention over a conv's patches (8x8, stride 8), with no token geometry stated: an
    ``nn.MultiheadAttention`` called with ``need_weights=False``, and a class token when ``cls``."""

    def __init__(self, cls: bool = False, fixed: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 8, stride=8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.cls = nn.Parameter(torch.randn(1, 1, 8)) if cls else None
        self.fixed = fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed and x.shape[-2:] != (32, 48):
            raise ValueError("this model takes 32x48 inputs only")
        t = self.conv(x).flatten(2).transpose(1, 2)
        if self.cls is not None:
            t = torch.cat([self.cls.expand(len(t), -1, -1), t], 1)
        y, _ = self.attn(t, t, t, need_weights=False)
        return y.mean(1)


@pytest.mark.parametrize("cls", [False, True])
def test_a_users_multihead_attention_weights_are_attention_over_the_measured_grid(cls):
    """(heads, queries, keys) is never read as a (C, H, W) map, also when queries = keys makes it look
    square: the token grid (and the prefix) come from a second probe, at any aspect ratio."""
    torch.manual_seed(0)
    model = _wrap(_ConvMHA(cls), 32)
    model.preprocessing = model.preprocessing.with_size((32, 48))
    info = get_layer(model, "attn.attn_weights")
    assert info.layout.kind == "attention" and info.layout.grid == (4, 6) and info.shape == (2, 4, 6)
    assert info.prefix == (("tok0",) if cls else ())
    x = torch.randn(1, 3, 32, 48)
    got = capture(model, x, ["attn.attn_weights"])["attn.attn_weights"]
    with torch.no_grad():
        t = model.module.conv(x).flatten(2).transpose(1, 2)
        if cls:
            t = torch.cat([model.module.cls, t], 1)
        _, w = model.module.attn(t, t, t, average_attn_weights=False)  # (1, heads, L, L)
    # the default query: the first prefix token's row, or the mean over the queries without one
    row = w[:, :, 0, 1:] if cls else w.mean(2)
    assert torch.allclose(got, row.reshape(1, 2, 4, 6), atol=1e-6)
    # a model that takes one input size only: no second probe, so the layout is not guessed but asked for
    fixed = _wrap(_ConvMHA(cls, fixed=True), 32)
    fixed.preprocessing = fixed.preprocessing.with_size((32, 48))
    (row_info,) = [r for r in layer_table(fixed, everything=True) if r.name == "attn.attn_weights"]
    assert not row_info.viewable and "--layout attn.attn_weights=attention:P" in row_info.layout.reason


def test_attention_declared_for_a_model_that_says_nothing():
    from deepvis.capture import parse_layout
    from deepvis.errors import LayerError

    lay = parse_layout("attention:1", (2, 17, 17), "a")
    assert lay.kind == "attention" and lay.grid == (4, 4) and lay.prefix == ("tok0",) and lay.viewable
    assert parse_layout("attention:1:2x8", (2, 17, 17), "a").grid == (2, 8)
    assert not parse_layout("attention", (2, 17, 17), "a").viewable  # no grid: listed, not drawn
    with pytest.raises(LayerError, match="not \\(heads, L, L\\)"):
        parse_layout("attention:1", (2, 17, 16), "a")
    with pytest.raises(LayerError, match="17 tokens - 2 prefix is not a 3x3 grid"):
        parse_layout("attention:2", (2, 17, 17), "a")
    # a count that is not a number is named, not read as 0
    with pytest.raises(LayerError, match="'x' is not a prefix-token count \\(write e.g. tokens:1 or tokens:1:14x14\\)"):
        parse_layout("tokens:x", (17, 8), "a")


def test_multihead_attention_hooks_are_removed_when_the_forward_raises():
    net = _tiny_torchvision_vit()
    model = _wrap(net, 32)
    name = "encoder.layers.encoder_layer_0.self_attention.attn_weights"
    get_layer(model, name)

    def boom(*_args):
        raise RuntimeError("boom after the attention")

    handle = net.encoder.ln.register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture(model, torch.randn(1, 3, 32, 32), [name, "logits"], stop_early=False)
    finally:
        handle.remove()
    assert hooks_left(net) == []
    # a bare nn.Module reads the pseudo-layer too (as produced: (N, heads, L, L))
    raw = capture(net, torch.randn(1, 3, 32, 32), [name])[name]
    assert raw.shape == (1, 2, 17, 17) and torch.allclose(raw.sum(-1), torch.ones(1, 2, 17))


def test_attention_layers_see_the_whole_image_and_say_why():
    from deepvis.backprop import layer_field, receptive_field

    model = _wrap(_tiny_torchvision_vit(), 32)
    for name in (
        "encoder.layers.encoder_layer_0.self_attention.attn_weights",
        "encoder.layers.encoder_layer_1.self_attention.attn_weights",
    ):
        f = layer_field(model, name)
        assert f.output_size == (4, 4) and f.size == (32, 32) and f.stride == (0.0, 0.0)
        assert f.whole_image is not None and "softmax" in f.whole_image  # even in the first block: normalized over every key
        assert receptive_field(model, f"{name}:1@2,3").box == (0, 0, 32, 32)
