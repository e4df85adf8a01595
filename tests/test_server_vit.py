"""The live toolbox on a ViT: the prefix strip of token layers, per-head attention for a query token."""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from fastapi.testclient import TestClient
from PIL import Image

from deepvis.capture import capture, prefix_key
from deepvis.errors import UnitError
from deepvis.models import Model, Preprocessing
from deepvis.render import strip_values
from deepvis.server import ServerConfig, create_app
from deepvis.server.frames import FrameProcessor, quantize
from deepvis.server.protocol import ProtocolError, ViewSettings
from helpers import hooks_left
from test_server_utils import TOKEN

pytestmark = pytest.mark.timeout(120)

ATTN = "blocks.1.attn.attn_drop"


def tiny_vit() -> Model:
    """timm's distilled DeiT-tiny with random weights at 64 px: class and distillation tokens + a 4x4 patch grid."""
    torch.manual_seed(0)
    net = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=64).eval()
    return Model(net, Preprocessing((64, 64), (0.5,) * 3, (0.5,) * 3), name="tiny-deit")


@pytest.fixture(scope="module")
def model():
    return tiny_vit()


def _input(proc: FrameProcessor) -> torch.Tensor:
    rng = np.random.default_rng(3)
    return proc.to_input(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)))


def test_a_token_layer_frame_carries_its_prefix_strip(model):
    proc = FrameProcessor(model)
    x = _input(proc)
    out = proc.process(x, ViewSettings(layer="blocks.1", unit=5, gain=2.0))
    acts = capture(model, x, ["blocks.1"], prefix=True)
    a, pre = acts["blocks.1"][0], acts[prefix_key("blocks.1")][0]  # (192, 4, 4), (192, 2)
    assert out.header["prefix"] == {"names": ["cls", "dist"], "shape": [2, 192]}
    want = quantize(np.clip(strip_values(pre, a, "layer") * 2.0, 0, 1))
    assert np.array_equal(np.frombuffer(out.blobs["prefix"], np.uint8).reshape(2, 192), want)
    assert out.header["unit_stats"]["prefix"] == pytest.approx(pre[5].tolist(), abs=1e-5)
    assert "query" not in out.header
    # the diff view has no strip (its running mean is of the patch maps)
    out = proc.process(x, ViewSettings(layer="blocks.1", unit=5, diff=True))
    assert "prefix" not in out.blobs and "prefix" in out.header["unit_stats"]
    assert hooks_left(model.module) == []


def test_an_attention_layer_is_drawn_per_head_for_the_query(model):
    proc = FrameProcessor(model)
    x = _input(proc)
    out = proc.process(x, ViewSettings(layer=ATTN, unit=1))
    assert out.header["query"] == "cls" and out.header["grid"]["shape"] == [3, 4, 4] and out.header["prefix"]["names"] == ["cls", "dist"]
    grid = np.frombuffer(out.blobs["grid"], np.uint8).reshape(3, 4, 4)
    patch = proc.process(x, ViewSettings(layer=ATTN, unit=1, query=(2, 1)), cached=out.activations)
    assert patch.header["query"] == "2,1" and not np.array_equal(np.frombuffer(patch.blobs["grid"], np.uint8).reshape(3, 4, 4), grid)
    raw = capture(model, x, [ATTN], query=(2, 1), prefix=True)
    assert patch.header["unit_stats"]["max"] == pytest.approx(float(raw[ATTN][0, 1].max()), abs=1e-5)
    # each head's row sums to 1 over the patches and the prefix keys
    total = raw[ATTN][0].sum((1, 2)) + raw[prefix_key(ATTN)][0].sum(1)
    assert torch.allclose(total, torch.ones(3), atol=1e-5)
    with pytest.raises(UnitError, match="outside the 4x4 patch grid"):
        proc.check(ViewSettings(layer=ATTN, query=(4, 0)))
    with pytest.raises(UnitError, match="no prefix token 'reg0'"):
        proc.check(ViewSettings(layer=ATTN, query="reg0"))
    assert all(b.attn.fused_attn for b in model.module.blocks) and hooks_left(model.module) == []


def test_a_token_layers_neighbours_come_with_their_prefix_tokens_and_attention_is_left_out(model):
    proc = FrameProcessor(model)
    x = _input(proc)
    # before blocks.1.attn.proj: an identity (skipped), then the attention layer (its view needs a query: not
    # captured); after it, the dropout, the attention module, its layer scale and drop path output the
    # projection's very tensor (passed over, as the page's keys do): the next layer of other data is norm2
    assert proc.neighbours("blocks.1.attn.proj") == ("blocks.1.norm2",)
    out = proc.process(x, ViewSettings(layer="blocks.1.attn.proj", unit=2))
    s = ViewSettings(layer="blocks.1.norm2", unit=4)
    fresh, again = proc.process(x, s), proc.process(x, s, cached=out.activations)
    assert again.activations is out.activations and "prefix" in again.blobs
    assert again.blobs == fresh.blobs and again.header == fresh.header
    assert all(b.attn.fused_attn for b in model.module.blocks) and hooks_left(model.module) == []


def test_the_query_setting_is_validated():
    base = ViewSettings(layer="x")
    assert ViewSettings.parse({"query": "CLS"}, base, ()).query == "cls"
    assert ViewSettings.parse({"query": [3, 4]}, base, ()).query == (3, 4)
    assert ViewSettings.parse({"query": [3, 4]}, base, ()).to_dict()["query"] == [3, 4]
    assert ViewSettings.parse({"query": None}, base, ()).query is None
    for bad in ("c l s", [1], [1, -2], [True, 1], 5, "x" * 40):
        with pytest.raises(ProtocolError, match="setting 'query'"):
            ViewSettings.parse({"query": bad}, base, ())


def test_a_prefix_token_unit_is_selected_and_its_backprop_view_drawn(model):
    from deepvis.server.unitviews import unit_view

    base = ViewSettings(layer="blocks.1")
    s = ViewSettings.parse({"unit": 5, "token": "CLS", "position": None}, base, ("norm",))
    assert s.token == "cls" and s.position is None
    assert ViewSettings.parse({"position": [1, 1]}, s, ("norm",)).token is None  # a pinned position clears the token
    assert ViewSettings.parse({"unit": 6}, s, ("norm",)).token is None  # so does another unit
    assert ViewSettings.parse({"token": "dist"}, ViewSettings.parse({"position": [1, 1]}, base, ()), ()).position is None
    with pytest.raises(ProtocolError, match="setting 'token'"):
        ViewSettings.parse({"token": "c l s"}, base, ())
    proc = FrameProcessor(model)
    x = _input(proc)
    out = proc.process(x, s)
    assert out.header["token"] == "cls" and out.header["unit_stats"]["prefix"][0] is not None
    with pytest.raises(UnitError, match="reg0"):
        proc.check(ViewSettings(layer="blocks.1", token="reg0"))
    header, blobs = unit_view(model, x, ViewSettings(layer="blocks.1", unit=5, token="cls", backprop="gradient", filter="norm"))
    assert (header["h"], header["w"]) == (64, 64) and len(blobs["rgb"]) == 64 * 64 * 3
    assert hooks_left(model.module) == []


def test_hello_describes_layouts_and_prefix_tokens(model):
    app = create_app(ServerConfig(model=model, token=TOKEN, allowed_hosts=("testserver",), synthesis=False, backprop=False))
    with TestClient(app) as c:
        layers = {layer["name"]: layer for layer in c.get(f"/api/info?token={TOKEN}").json()["layers"]}
    assert layers["blocks.1"]["layout"] == "tokens" and layers["blocks.1"]["prefix"] == ["cls", "dist"]
    assert layers[ATTN]["layout"] == "attention" and layers[ATTN]["shape"] == [3, 4, 4]


def test_the_page_says_when_the_weights_are_random():
    from deepvis.models import WeightsSource

    vit = tiny_vit()
    vit.weights = WeightsSource.random()
    kw = dict(token=TOKEN, allowed_hosts=("testserver",), synthesis=False, backprop=False)
    with TestClient(create_app(ServerConfig(model=vit, **kw))) as client:
        info = client.get(f"/api/info?token={TOKEN}").json()["model"]
    assert info["untrained"] is True and info["weights"] == "random (seed 0)"
    with TestClient(create_app(ServerConfig(model=tiny_vit(), **kw))) as client:
        assert client.get(f"/api/info?token={TOKEN}").json()["model"]["untrained"] is False
