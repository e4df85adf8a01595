"""Prefix-token units (``@cls``, ``@dist``, ``@regK``, ``@#K``) through every tool, with known answers.

``_Tokens`` is a hand-made ViT-like model on 32x32 inputs: 16 patch tokens (the 8x8 mean of each
patch), one class token (a constant 7) and optional register tokens (0). ``pre`` sees the tokens before
any mixing, where the class token does not depend on the input; ``mix`` (a stand-in for attention) adds
the mean of the patch tokens to the class token. So after ``mix`` the class token's channel c is
``7 + mean(x[c])`` (x: the model input) and its gradient is ``1/1024`` on every pixel of channel c.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image

from deepvis.analysis import SummaryOptions, summarize
from deepvis.atlas import AtlasOptions, SynthesisOptions, build_atlas, open_atlas
from deepvis.backprop import backprop_view, backprop_views, layer_field, receptive_field
from deepvis.capture import Unit, capture, check_unit, get_layer, parse_unit, unit_activation, unit_index
from deepvis.cli import main
from deepvis.datasets import open_dataset
from deepvis.errors import LayerError, UnitError
from deepvis.models import Model, Preprocessing
from deepvis.optimize import Settings, channel, neuron, visualize
from helpers import assert_unchanged, hooks_left, snapshot

_MODEL = """
import torch
from torch import nn


class PatchEmbed(nn.Module):
    patch_size = (8, 8)

    def forward(self, x):
        return nn.functional.avg_pool2d(x, 8).flatten(2).transpose(1, 2)  # (N, 16, C): one token per patch


class Mix(nn.Module):
    def __init__(self, prefix):
        super().__init__()
        self.prefix = prefix

    def forward(self, t):  # the class token adds the mean of the patch tokens (global mixing, like attention)
        return torch.cat([t[:, :1] + t[:, self.prefix :].mean(1, keepdim=True), t[:, 1:]], 1)


class Tokens(nn.Module):
    def __init__(self, regs=0):
        super().__init__()
        self.num_reg_tokens = regs
        self.num_prefix_tokens = 1 + regs
        self.patch_embed = PatchEmbed()
        self.cls_token = nn.Parameter(torch.full((1, 1, 3), 7.0))
        self.reg_token = nn.Parameter(torch.zeros(1, regs, 3))
        self.pre = nn.Identity()
        self.mix = Mix(1 + regs)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        n = len(x)
        t = torch.cat([self.cls_token.expand(n, -1, -1), self.reg_token.expand(n, -1, -1), self.patch_embed(x)], 1)
        return self.head(self.mix(self.pre(t))[:, 0])


def build():
    return Tokens(regs=4).eval()
"""

_ns: dict[str, object] = {}
exec(compile(_MODEL, "tokens_model", "exec"), _ns)  # the same source the CLI tests load from a file
_Tokens = _ns["Tokens"]


def _model(regs: int = 0) -> Model:
    return Model(_Tokens(regs).eval(), Preprocessing((32, 32), (0.5,) * 3, (0.5,) * 3), name="tokens")  # type: ignore[operator]


def test_capture_returns_a_prefix_token_as_its_vector():
    model = _model(regs=4)
    info = get_layer(model, "mix@cls")
    assert info.shape == (3,) and info.layout.kind == "vector" and info.order == get_layer(model, "mix").order
    assert get_layer(model, "mix@reg3").shape == (3,) and get_layer(model, "mix@#4").name == "mix@#4"
    x = torch.randn(2, 3, 32, 32)
    before = snapshot(model.module)
    out = capture(model, x, ["mix@cls", "pre@reg0", "mix"])
    assert list(out) == ["mix@cls", "pre@reg0", "mix"]
    assert torch.allclose(out["mix@cls"], 7 + x.mean((2, 3)), atol=1e-5) and (out["pre@reg0"] == 0).all()
    assert out["mix"].shape == (2, 3, 4, 4)  # the patch grid as before
    assert list(capture(model, x, ["mix@cls"])) == ["mix@cls"]  # the token layer itself only when asked
    u = parse_unit("mix:2@cls")
    assert u == Unit("mix@cls", 2) == Unit("mix", 2, token="cls") and u.layer_key == "mix@cls" and str(Unit("mix@cls", 2)) == "mix:2@cls"
    assert torch.allclose(unit_activation(out, u), 7 + x[:, 2].mean((1, 2)), atol=1e-5)
    assert unit_index(u, (3,)) == (2,) and unit_index(Unit("mix", 1, (2, 3)), (3, 4, 4)) == (1, 2, 3)
    assert torch.allclose(unit_activation(out, Unit("mix", 1)), out["mix"][:, 1].mean((1, 2)))
    assert torch.equal(unit_activation(out, Unit("mix", 1), reduce="max"), out["mix"][:, 1].amax((1, 2)))
    for bad, text in [("mix@reg4", "no prefix token 'reg4'"), ("mix@dist", "no prefix token 'dist'"), ("head@cls", "not a token layer")]:
        with pytest.raises(LayerError, match=text):
            capture(model, x, [bad])
    with pytest.raises(UnitError, match="not both"):
        Unit("mix", 0, (1, 1), "cls")
    assert_unchanged(model.module, before)


def test_check_unit_on_prefix_tokens_names_the_choices():
    model = _model(regs=4)
    assert check_unit(model, parse_unit("mix:0@reg3")).name == "mix"
    with pytest.raises(UnitError, match=r"no prefix token 'reg7' \(this layer has 5: cls, reg0, reg1, reg2, reg3"):
        check_unit(model, parse_unit("mix:0@reg7"))
    with pytest.raises(UnitError, match="head is a vector layer without prefix tokens"):
        get_layer(model, "head@cls")


def test_optimizing_the_class_token_finds_its_analytic_optimum():
    model = _model()
    # v = 7 + mean(x_1) (model input = pixels/127.5): the gradient per 0-255 pixel is 1/(127.5*1024) on
    # channel 1 and 0 elsewhere; decay + constant lr converge to x* = (1-θ)·lr·g/θ on channel 1, 0 elsewhere
    s = Settings(decay=0.3, lr=1e6, steps=80)
    before = snapshot(model.module)
    (res,) = visualize(model, ["mix:1@cls"], preset=s, size=32)
    assert res.unit == "mix:1@cls" and res.objective == "neuron(mix:1@cls)"
    d = res.image - 127.5
    g = 1 / (127.5 * 1024)
    assert torch.allclose(d[1], torch.full((32, 32), 0.7 * 1e6 * g / 0.3), atol=0.01)
    assert d[[0, 2]].abs().max() < 1e-3
    assert res.value == pytest.approx(7 + float(d[1].mean()) / 127.5, abs=1e-4)
    (ch,) = visualize(model, [channel("mix", 1, token="cls")], preset=s, size=32)
    assert ch.unit == "mix:1@cls" and ch.objective == "channel(mix:1@cls)" and torch.allclose(ch.image, res.image)
    obj = neuron("mix", 1, token="cls") - 0.5 * neuron("mix", 0, (1, 1))
    assert obj.name == "neuron(mix:1@cls) - 0.5*neuron(mix:0@1,1)" and obj.layers == ("mix@cls", "mix")
    with pytest.raises(UnitError, match="no prefix token 'dist'"):
        visualize(model, ["mix:0@dist"], steps=1, size=32)
    assert_unchanged(model.module, before)


def test_backprop_gradient_of_the_class_token_is_analytic():
    model = _model()
    x = torch.randn(1, 3, 32, 32)
    before = snapshot(model.module)
    r = backprop_view(model, x, "mix:2@cls", "gradient", seed="one")
    expected = torch.zeros(3, 32, 32)
    expected[2] = 1 / 1024
    assert torch.allclose(r.grad, expected, atol=1e-9) and r.unit == parse_unit("mix:2@cls") and r.argmax is None
    assert r.activation == pytest.approx(7 + float(x[0, 2].mean()), abs=1e-5) and r.layer_shape == (3,)
    assert r.to_dict()["token"] == "cls"
    a = backprop_view(model, x, "mix:2@cls", "gradient")  # seeded by the activation: the gradient of a²/2
    assert torch.allclose(a.grad, expected * a.activation, atol=1e-7)
    # several token and patch units of one input in one pass
    rs = backprop_views(model, x, ["mix:0@cls", "mix:1@2,3", "pre:0@cls"], "gradient", seed="one")
    assert rs[0].grad[0].mean() == pytest.approx(1 / 1024) and rs[1].grad[1, 16:24, 24:32].mean() == pytest.approx(1 / 64)
    assert not rs[2].grad.any()  # before mixing the class token is a constant
    with pytest.raises(UnitError, match="not both"):
        backprop_view(model, x, "mix:2@cls", at=(1, 1))
    assert_unchanged(model.module, before)


def test_receptive_field_of_prefix_tokens():
    model = _model()
    rf = receptive_field(model, "mix:0@cls")
    assert rf.box == (0, 0, 32, 32) and rf.whole_image and not rf.input_independent and rf.token == "cls"
    early = receptive_field(model, parse_unit("pre:1@cls"))
    assert early.input_independent and early.box == (0, 0, 0, 0) and early.to_dict()["input_independent"] is True
    assert receptive_field(model, "mix@cls").box == rf.box
    assert receptive_field(model, "mix:0@1,2").box == (8, 16, 16, 24)  # a patch: its own 8x8 pixels, as before
    with pytest.raises(LayerError, match="is a prefix token, not a map"):
        layer_field(model, "mix@cls")
    with pytest.raises(UnitError, match="no prefix token 'reg0'"):
        receptive_field(model, "mix:0@reg0")
    assert hooks_left(model.module) == []


def test_atlas_mines_the_class_token_as_its_own_layer_and_old_atlases_continue(tmp_path):
    model = _model()
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"im{i}.png")
    opts = AtlasOptions(layers=("mix",), top=3, batch_size=4, view_mode="gradient", synthesis=None, decode_threads=0)
    build_atlas(tmp_path / "atlas", model, str(data), opts, progress=False)  # an atlas without tokens ...
    synth = SynthesisOptions(steps=2, units_per_batch=3)
    more = AtlasOptions(("mix",), 3, 4, view_mode="gradient", synthesis=synth, decode_threads=0, prefix_tokens=True)
    summary = build_atlas(tmp_path / "atlas", model, str(data), more, progress=False)  # ... continued with them
    assert summary.layers == ["mix", "mix@cls"]
    ds = open_dataset(str(data))
    x = model.preprocess([ds.load(i, "RGB") for i in range(len(ds))])
    value = 7 + x[:, 1].mean((1, 2))  # the class token's channel 1
    with open_atlas(tmp_path / "atlas") as atlas:
        assert [r.name for r in atlas.layers()] == ["mix", "mix@cls"] and atlas.layer("mix@cls").shape == (3,)
        rec = atlas.unit("mix@cls", 1)
        assert [t.sample for t in rec.top] == value.argsort(descending=True)[:3].tolist()
        assert [t.value for t in rec.top] == pytest.approx(value.sort(descending=True).values[:3].tolist(), abs=1e-5)
        assert all(t.position is None for t in rec.top) and rec.synth is not None
        assert Image.open(rec.top[0].crop).size == (32, 32) and Image.open(rec.top[0].view).size == (32, 32)  # whole inputs
        assert atlas.unit("mix", 1).top[0].position is not None  # the patch grid's layer, as before
    out = tmp_path / "pane.png"
    assert main(["atlas-show", str(tmp_path / "atlas"), "--unit", "mix:1@cls", "-o", str(out)]) == 0 and out.exists()


def test_report_covers_the_class_token_and_keeps_the_patch_numbers(tmp_path):
    model = _model()
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(1)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"im{i}.png")
    ds = open_dataset(str(data))
    kw = dict(layers=("mix",), epsilons=(1.0,), sensitivity_images=4, cluster_k=2, thumbnails=False, decode_threads=0, batch_size=4)
    with_cls = summarize(model, ds, SummaryOptions(**kw), progress=False)  # type: ignore[arg-type]
    without = summarize(model, ds, SummaryOptions(**kw, class_token=False), progress=False)  # type: ignore[arg-type]
    assert with_cls.layer_names == ["mix", "mix@cls"] and without.layer_names == ["mix"]
    a, b = with_cls.activity["mix"], without.activity["mix"]
    assert np.array_equal(a.mean, b.mean) and np.array_equal(a.top_values, b.top_values)
    assert np.allclose(with_cls.activity["mix@cls"].mean, 7 + with_cls.activity["mix"].mean, atol=1e-5)  # 7 + the patch mean
    assert "mix@cls" not in with_cls.locality and with_cls.layer_summary("mix@cls")["shape"] == [3]
    assert with_cls.sensitivity is not None and with_cls.sensitivity.layers[:2] == ["mix", "mix@cls"]
    assert "mix@cls" in with_cls.clusters


def _cli(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_bad_prefix_token_units_are_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "tokens.py"
    path.write_text(textwrap.dedent(_MODEL))
    model = ["--model", f"{path}:build", "--input-size", "32"]
    out = tmp_path / "o"
    for unit, text in [
        ("head:0@cls", "head is a vector layer without prefix tokens"),
        ("mix:0@reg7", "no prefix token 'reg7' (this layer has 5: cls, reg0, reg1, reg2, reg3"),
        ("mix:0@4,0", "outside the 4x4 patch grid"),
        ("mix:9@cls", "out of range"),
    ]:
        for cmd in (
            ["optimize", "--unit", unit, "--steps", "1", "-o", out],
            ["backprop", "sample:coffee", "--unit", unit, "--mode", "gradient", "-o", tmp_path / "v.png"],
            ["rf", "--unit", unit],
        ):
            code, _, err = _cli([*cmd, *model], capsys)
            if cmd[0] != "optimize" and "outside" in text:
                text_here = "outside the 4x4"
            else:
                text_here = text
            assert code == 2 and text_here in err and err.count("\n") == 1, (cmd, err)
    data = tmp_path / "data"
    data.mkdir()
    Image.new("RGB", (32, 32)).save(data / "a.png")
    for layers, text in [("head@cls", "head is a vector layer without prefix tokens"), ("mix@reg7", "no prefix token 'reg7'")]:
        code, _, err = _cli(["atlas", data, "--layers", layers, "-o", tmp_path / "atlas", *model], capsys)
        assert code == 2 and text in err and err.count("\n") == 1, err
        code, _, err = _cli(["report", data, "--layers", layers, "-o", tmp_path / "r.html", *model], capsys)
        assert code == 2 and text in err and err.count("\n") == 1, err
    assert not (tmp_path / "r.html").exists()


@pytest.mark.slow
def test_timm_vit_tiny_end_to_end_on_the_class_token(tmp_path, capsys):
    pytest.importorskip("timm")
    path = tmp_path / "vit.py"
    path.write_text('import timm\n\ndef build():\n    return timm.create_model("vit_tiny_patch16_224", pretrained=False)\n')
    model = ["--model", f"{path}:build"]
    out = tmp_path / "opt"
    args = ["optimize", "--unit", "blocks.5:17@cls", "--class", "3", "--steps", "2", "--preset", "1", "-o", out, "--json"]
    code, stdout, err = _cli([*args, *model], capsys)
    assert code == 0, err
    rows = json.loads(stdout)["units"]
    assert [r["unit"] for r in rows] == ["blocks.5:17@cls", "logits:3"] and (out / "blocks.5-17-cls.png").exists()  # a class logit too
    code, stdout, err = _cli(
        ["optimize", "--layer", "blocks.5", "--units", "0-1", "--token", "cls", "--steps", "1", "-o", tmp_path / "o2", "--json", *model],
        capsys,
    )
    assert code == 0 and [u["unit"] for u in json.loads(stdout)["units"]] == ["blocks.5:0@cls", "blocks.5:1@cls"], err
    view = tmp_path / "v.png"
    code, stdout, err = _cli(
        ["backprop", "sample:coffee", "--unit", "blocks.5:17@cls", "--mode", "gradient", "-o", view, "--json", *model], capsys
    )
    data = json.loads(stdout)
    assert code == 0 and data["token"] == "cls" and data["grad_l2"] > 0 and view.exists(), err
    code, _, err = _cli(["backprop", "sample:coffee", "--unit", "blocks.5:17@cls", "--mode", "guided", "-o", view, *model], capsys)
    assert code == 2 and "GELU" in err  # deconv/guided refuse for GELU models, as for every unit
    code, stdout, _ = _cli(["rf", "--unit", "blocks.5:17@cls", *model], capsys)
    assert code == 0 and "the whole image (224x224 px), because of attention in blocks.0" in stdout
    code, stdout, _ = _cli(["rf", "--unit", "pos_drop@cls", *model], capsys)
    assert code == 0 and "input-independent" in stdout
    code, stdout, _ = _cli(["rf", "--unit", "pos_drop:0@cls", "--json", *model], capsys)
    assert json.loads(stdout)["input_independent"] is True
    atlas = tmp_path / "atlas"
    args = ["atlas", "demo", "--layers", "blocks.5@cls", "--units", "17", "-k", "9", "--batch-size", "16", "--view-mode", "gradient"]
    code, _, err = _cli([*args, "--steps", "1", "--synth-batch", "1", "-o", atlas, *model], capsys)
    assert code == 0, err
    with open_atlas(atlas) as a:
        rec = a.unit("blocks.5@cls", 17)
        assert len(rec.top) == 9 and Image.open(rec.top[0].crop).size == (224, 224) and rec.synth is not None
    code, _, err = _cli(["atlas-show", atlas, "--unit", "blocks.5:17@cls", "-o", tmp_path / "pane.png"], capsys)
    assert code == 0, err
