"""Capture: layer tables, captured activations equal a manual forward, early stop, hooks always removed."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from deepvis.capture import Unit, capture, check_unit, get_layer, layer_table, module_device, parse_unit, parse_unit_set
from deepvis.capture.hooks import ALL_MODULES, INPLACE_OUTPUTS, RESOLVED_MODULES
from deepvis.capture.layers import LAYER_TABLES
from deepvis.errors import LayerError, UnitError
from deepvis.models import Model, Preprocessing
from helpers import assert_unchanged, hooks_left, snapshot


def _wrap(module: nn.Module, size: int = 224, channels: int = 3) -> Model:
    torch.manual_seed(0)
    mean = (0.5,) * channels
    return Model(module, Preprocessing((size, size), mean, mean, channels=channels))


@pytest.fixture(scope="module")
def alexnet():
    torch.manual_seed(0)
    return _wrap(torchvision.models.alexnet(weights=None))


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    return _wrap(torchvision.models.resnet18(weights=None))


@pytest.fixture(scope="module")
def googlenet():
    torch.manual_seed(0)
    return _wrap(torchvision.models.googlenet(weights=None, init_weights=False, aux_logits=False))


def _layers(model):
    return {r.name: r for r in layer_table(model)}


def test_layer_tables_of_classic_nets(alexnet, resnet18, googlenet):
    a = _layers(alexnet)
    assert a["features.0"].shape == (64, 55, 55) and a["features.0"].type == "Conv2d"
    assert a["features.12"].shape == (256, 6, 6)
    assert a["classifier.6"].shape == (1000,) and a["logits"].shape == (1000,)
    assert [r.name for r in layer_table(alexnet)][:3] == ["features.0", "features.1", "features.2"]
    r = _layers(resnet18)
    assert r["layer1.0.relu"].calls == 2  # BasicBlock reuses its ReLU
    assert r["layer4"].shape == (512, 7, 7) and r["avgpool"].shape == (512, 1, 1)
    assert r["fc"].units == 1000
    g = _layers(googlenet)
    assert g["inception3a"].shape == (256, 28, 28)
    assert g["inception5b"].shape == (1024, 7, 7)


@pytest.mark.parametrize(
    "net, layer, manual",
    [
        ("alexnet", "features.5", lambda m, x: m.features[:6](x)),
        ("alexnet", "features.0", lambda m, x: m.features[0](x)),  # followed by ReLU(inplace=True)
        ("alexnet", "classifier.4", lambda m, x: m.classifier[:5](torch.flatten(m.avgpool(m.features(x)), 1))),
        ("resnet18", "layer2", lambda m, x: m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))),
        ("resnet18", "layer1.0.relu", lambda m, x: m.layer1[0](m.maxpool(m.relu(m.bn1(m.conv1(x)))))),  # last call
        ("googlenet", "inception3a", lambda m, x: m.inception3a(m.maxpool2(m.conv3(m.conv2(m.maxpool1(m.conv1(m._transform_input(x)))))))),
        ("googlenet", "logits", lambda m, x: m(x)),
    ],
)
def test_captured_equals_manual_forward(net, layer, manual, request):
    model = request.getfixturevalue(net)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    got = capture(model, x, [layer])[layer]
    with torch.no_grad():
        want = manual(model.module.eval(), x.clone())
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)
    assert hooks_left(model.module) == []


def test_inplace_modified_output_is_the_module_output(alexnet):
    x = torch.randn(1, 3, 224, 224)
    got = capture(alexnet, x, ["features.0", "features.2"])
    assert (got["features.0"] < 0).any()  # the conv output before the in-place ReLU
    assert "features.0" in alexnet.cache.entries(alexnet.module).get(INPLACE_OUTPUTS, None)


class Tripwire(nn.Module):
    def forward(self, x):
        raise AssertionError("the forward pass should have stopped before this module")


def test_forward_stops_after_the_deepest_requested_layer():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3), Tripwire())
    out = capture(net, torch.randn(1, 3, 8, 8), ["0", "2"])
    assert out["0"].shape == (1, 4, 6, 6) and out["2"].shape == (1, 2, 4, 4)
    assert hooks_left(net) == []
    with pytest.raises(AssertionError, match="stopped before"):
        capture(net, torch.randn(1, 3, 8, 8), ["0"], stop_early=False)
    assert hooks_left(net) == []


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_hooks_removed_and_model_restored_on_every_path(resnet18):
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Boom())
    net.train()
    before = snapshot(net)
    with pytest.raises(RuntimeError, match="boom"):
        capture(net, torch.randn(1, 3, 8, 8), ["1", "2"])
    assert_unchanged(net, before)
    assert net.training and net[1].training
    before = snapshot(resnet18.module)
    with pytest.raises(LayerError, match="no layer named 'layer9'"):
        capture(resnet18, torch.randn(1, 3, 64, 64), ["layer1", "layer9"])
    capture(resnet18, torch.randn(1, 3, 64, 64), ["layer1", "logits"])
    capture(resnet18, torch.randn(1, 3, 64, 64, requires_grad=True), ["layer1"], grad=True)
    assert_unchanged(resnet18.module, before)


def test_grad_capture_reaches_the_input(resnet18):
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    a = capture(resnet18, x, ["layer1"], grad=True)["layer1"]
    a[0, 3].sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    no = capture(resnet18, torch.randn(1, 3, 64, 64), ["layer1"])["layer1"]
    assert not no.requires_grad


def test_one_channel_model_and_other_input_sizes():
    net = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    model = _wrap(net, size=28, channels=1)
    rows = _layers(model)
    assert rows["0"].shape == (8, 12, 12) and rows["logits"].shape == (10,)
    x = torch.randn(3, 1, 28, 28)
    got = capture(model, x, ["1", "logits"])
    with torch.no_grad():
        assert torch.allclose(got["1"], net[:2](x)) and torch.allclose(got["logits"], net(x))
    assert layer_table(model, (1, 64, 64))[0].shape == (8, 30, 30)


def test_default_model_capture_matches_manual(default_model, sample_images):
    x = default_model.preprocess([sample_images["coffee"], sample_images["chelsea"]])
    m = default_model.module
    got = capture(default_model, x, ["blocks.2", "bn1"])
    with torch.no_grad():
        h = m.bn1(m.conv_stem(x))
        assert torch.allclose(got["bn1"], h, atol=1e-5)
        want = m.blocks[2](m.blocks[1](m.blocks[0](h)))
    assert torch.allclose(got["blocks.2"], want, atol=1e-5)


def test_units_and_unit_sets(default_model):
    u = parse_unit("blocks.3:17@5,6")
    assert u == Unit("blocks.3", 17, (5, 6)) and str(u) == "blocks.3:17@5,6"
    assert parse_unit("logits:281").is_class
    for bad in ("blocks.3", "blocks.3:x", "blocks.3:1@2", ":3", "a:1@1,2,3"):
        with pytest.raises(UnitError):
            parse_unit(bad)
    assert parse_unit_set("7", 10) == [7]
    assert parse_unit_set("0-3,8,2", 10) == [0, 1, 2, 3, 8]
    assert parse_unit_set("all", 4) == [0, 1, 2, 3]
    for bad in ("10", "3-1", "x", "1-"):
        with pytest.raises(UnitError):
            parse_unit_set(bad, 10)
    assert check_unit(default_model, parse_unit("blocks.3:79@13,13")).units == 80
    with pytest.raises(UnitError, match="out of range: layer blocks.3 has 80 units"):
        check_unit(default_model, parse_unit("blocks.3:80"))
    with pytest.raises(UnitError, match="outside the 14x14 map"):
        check_unit(default_model, parse_unit("blocks.3:1@14,0"))
    with pytest.raises(UnitError, match="no spatial map"):
        check_unit(default_model, parse_unit("logits:1@0,0"))
    assert get_layer(default_model, "logits").units == 1000


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_capture_on_cuda(alexnet):
    model = _wrap(torchvision.models.alexnet(weights=None)).to("cuda")
    x = torch.randn(2, 3, 224, 224)
    out = capture(model, x, ["features.5"])["features.5"]
    assert out.device.type == "cuda"


def test_aliased_layers_equal_their_own_outputs(default_model, sample_images):
    """Layers that share a tensor (Identity, in-place activations) are hooked once; values must equal
    a capture that hooks every module itself."""
    table = layer_table(default_model)
    aliased = [r.name for r in table if r.same_as]
    assert "blocks.0.0.aa" in aliased and "bn1.drop" not in aliased
    names = [r.name for r in table if r.name != "logits"]
    x = default_model.preprocess(sample_images["rocket"])
    via_model = capture(default_model, x, names)
    via_module = capture(default_model.module, x, names)  # no layer table: every module hooked
    for n in names:
        assert torch.equal(via_model[n], via_module[n]), n
    assert (via_model["bn1.drop"] < 0).any() and (via_model["bn1.act"] >= 0).all()


def test_cache_is_dropped_when_the_structure_changes():
    """Layer tables and resolved modules are structural facts: kept while the weights change in place,
    recomputed after a submodule is replaced, the model is cast or a module is added."""
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3))
    model = _wrap(net, size=16)
    x = torch.randn(1, 3, 16, 16)
    first = layer_table(model)
    capture(model, x, ["2"])
    entries = model.cache.entries(net)
    assert entries.get(LAYER_TABLES, (3, 16, 16)) is first and entries.get(RESOLVED_MODULES, "2") is net[2]
    with torch.no_grad():
        net[0].weight.mul_(2)  # new values, same structure: kept
    assert layer_table(model) is first
    net[2] = nn.Conv2d(4, 5, 3)  # replaced: a new table with the new shape, the new module hooked
    assert layer_table(model) is not first and get_layer(model, "2").shape == (5, 12, 12)
    assert capture(model, x, ["2"])["2"].shape == (1, 5, 12, 12)
    assert model.cache.entries(net).get(RESOLVED_MODULES, "2") is net[2]
    net[1] = nn.Identity()  # no parameters: the module list still changes
    assert model.cache.entries(net).get(ALL_MODULES, None) is None
    capture(model, x, ["1"])
    assert model.cache.entries(net).get(ALL_MODULES, None) == list(net.modules())
    before = layer_table(model)
    net.double()  # cast: dtype changed
    assert model.cache.entries(net).get(LAYER_TABLES, (3, 16, 16)) is None
    net.float()
    net.add_module("3", nn.ReLU())  # a module added
    assert layer_table(model) is not before and "3" in [r.name for r in layer_table(model)]
    model.cache.clear()
    assert len(model.cache) == 0
    layer_table(model)
    model.to("meta")  # moved to another device (meta: no CUDA needed to see the device change)
    assert model.cache.entries(net).get(LAYER_TABLES, (3, 16, 16)) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cache_is_dropped_when_the_model_moves():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    model = _wrap(net, size=16)
    first = layer_table(model)
    model.to("cuda")
    assert model.cache.entries(net).get(LAYER_TABLES, (3, 16, 16)) is None
    assert layer_table(model) is not first
    assert capture(model, torch.randn(1, 3, 16, 16), ["1"])["1"].device.type == "cuda"


def test_model_cache_travels_empty():
    import copy
    import pickle

    model = Model(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 2, 3)), Preprocessing((16, 16)))
    layer_table(model)
    assert len(model.cache) > 0
    for clone in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert len(clone.cache) == 0
        assert [i.name for i in layer_table(clone)] == [i.name for i in layer_table(model)]


def test_device_comes_from_buffers_when_there_are_no_parameters():
    """A module with only buffers gets its probe and its input on the buffers' device (meta: no CUDA needed)."""

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("scale", torch.ones(1, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            assert x.device == self.scale.device
            return x * self.scale

    net = nn.Sequential(Scale()).to("meta")
    assert module_device(net).type == "meta"
    assert layer_table(net, (3, 8, 8))[0].shape == (3, 8, 8)
    assert capture(net, torch.randn(1, 3, 8, 8), ["0"])["0"].device.type == "meta"
    assert hooks_left(net) == []
