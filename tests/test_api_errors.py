"""The Python API's answers to plausible misuse: one-line deepvis errors that say what to do, never a
raw AttributeError from deep inside; and the receptive field's checks and reasons on every layer kind."""

from __future__ import annotations

import pytest
import timm
import torch
from PIL import Image
from torch import nn

import deepvis
from deepvis.backprop import backprop_view, layer_field, receptive_field
from deepvis.capture import capture
from deepvis.errors import DeepvisError, InputError, ModelError, UnitError
from deepvis.models import Model, Preprocessing, load_model
from deepvis.optimize import visualize


class Net(nn.Module):
    """conv(3→8, stride 2) → ReLU → conv(8→16, stride 2) → global pooling → fc(16→10), at 32 px."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gap(self.conv2(self.relu(self.conv1(x)))).flatten(1))


@pytest.fixture(scope="module")
def net() -> Model:
    torch.manual_seed(0)
    return deepvis.as_model(Net(), Preprocessing(input_size=(32, 32)))


@pytest.fixture(scope="module")
def vit() -> Model:
    return deepvis.as_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64))


def test_a_bare_module_is_refused_with_the_way_to_wrap_it(net):
    bare = net.module
    x = torch.zeros(1, 3, 32, 32)
    for call in (
        lambda: receptive_field(bare, "conv2:0@1,1"),
        lambda: layer_field(bare, "conv2"),
        lambda: backprop_view(bare, x, "conv2:0"),
        lambda: visualize(bare, ["conv2:0"], steps=1),
    ):
        with pytest.raises(ModelError, match=r"deepvis\.as_model\(module\)"):
            call()
    with pytest.raises(ModelError, match=r"load_model takes a model name, not Net.*as_model"):
        load_model(bare)  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="not str"):
        receptive_field("default", "blocks.3:0")  # type: ignore[arg-type]


def test_capture_names_what_it_takes(net):
    image = Image.new("RGB", (32, 32))
    with pytest.raises(InputError, match=r"tensor that model\.preprocess\(image\) makes, not Image"):
        capture(net, image, ["conv2"])  # type: ignore[arg-type]
    with pytest.raises(InputError, match=r"\(N, 3, H, W\) input; this tensor is \(3, 32, 32\)"):
        capture(net, torch.zeros(3, 32, 32), ["conv2"])
    with pytest.raises(InputError, match=r"\(N, 3, H, W\) input; this tensor is \(1, 1, 32, 32\)"):
        capture(net, torch.zeros(1, 1, 32, 32), ["conv2"])
    with pytest.raises(InputError, match="floating-point input.*torch.uint8"):
        capture(net, torch.zeros(1, 3, 32, 32, dtype=torch.uint8), ["conv2"])
    # one layer name is one layer (not its letters), as a unit string is one unit
    x = net.preprocess(image)
    assert capture(net, x, "conv2")["conv2"].shape == (1, 16, 8, 8)
    (r,) = visualize(net, "conv2:3", steps=2, size=32, progress=lambda *_: None)
    assert r.unit == "conv2:3" and r.steps_run == 2 and r.objective == "neuron(conv2:3@center)"


def test_receptive_field_checks_the_unit_and_says_why_it_is_the_whole_image(net, vit):
    # the channel, the position and a position on a vector layer are checked (they were ignored)
    with pytest.raises(UnitError, match=r"out of range: layer conv2 has 16 units"):
        receptive_field(net, "conv2:99@1,1")
    with pytest.raises(UnitError, match=r"outside the 8x8 map of conv2"):
        receptive_field(net, "conv2:0@8,0")
    with pytest.raises(UnitError, match="no spatial map"):
        receptive_field(net, "fc", (1, 1))
    with pytest.raises(UnitError, match=r"outside the 4x4 patch grid of blocks\.5 at 64x64 px"):
        receptive_field(vit, "blocks.5:0@99,99")
    with pytest.raises(DeepvisError, match=r"input_size is \(height, width\)"):
        receptive_field(net, "conv2:0@1,1", input_size=64)  # type: ignore[arg-type]
    # conv2 at (1, 1): two 3x3 stride-2 convolutions, 7 px at stride 4, starting at 4·1 − 3 = 1
    rf = receptive_field(net, "conv2:0@1,1")
    assert rf.field == (1, 1, 8, 8) and rf.whole_image is None
    # after global pooling and after attention: the whole image, with the reason the layer's field gives
    logit = receptive_field(net, "logits:0")
    assert logit.box == (0, 0, 32, 32) and "global pooling" in (logit.whole_image or "")
    patch = receptive_field(vit, "blocks.5:0@3,2")
    assert vit.preprocessing.input_size == (64, 64)  # the size its patch grid was built for, not its config's 224
    assert patch.position == (3, 2) and patch.box == (0, 0, 64, 64)
    assert patch.whole_image == layer_field(vit, "blocks.5").whole_image and "attention" in patch.whole_image


def test_as_model_with_a_name_and_preprocessing_keeps_the_model_it_names():
    pre = Preprocessing(input_size=(160, 160))
    m = deepvis.as_model("default", pre)
    assert m.preprocessing == pre and m.name == "default"
    assert m.label(967) == load_model("default").label(967) != "class 967"
    assert m.weights == load_model("default").weights


def test_one_image_one_unit_string_and_a_photo_for_a_grayscale_model(net):
    from deepvis.activations import activation_views
    from deepvis.capture import unit_activation

    image = Image.new("RGB", (40, 32), (200, 10, 10))
    (view,) = activation_views(net, image, "conv2")  # one image, not an iterable of its rows
    assert view.activations.shape == (16, 8, 8)
    acts = capture(net, net.preprocess(image), ["conv2"])
    assert torch.equal(unit_activation(acts, "conv2:1@2,3"), acts["conv2"][:, 1, 2, 3])
    with pytest.raises(UnitError, match=r"its layer fc is not among the activations \(conv2\)"):
        unit_activation(acts, "fc:0")
    # a grayscale model takes a photo (converted, as deepvis.show does); other modes are one-line errors
    gray = deepvis.as_model(nn.Conv2d(1, 2, 3), Preprocessing(input_size=(16, 16), mean=(0.5,), std=(0.5,), channels=1))
    x = gray.preprocess(image)
    assert x.shape == (1, 1, 16, 16) and torch.allclose(x, gray.preprocess(image.convert("L")))
    with pytest.raises(InputError, match="expected a L image, got mode CMYK"):
        gray.preprocess(image.convert("CMYK"))


def test_a_model_without_a_classifier_head_gives_no_predictions():
    """timm's num_classes=0 (DINOv2, CLIP towers): the output is pooled features, never read as classes."""
    from deepvis.activations import activation_views
    from deepvis.predictions import class_scores_problem, require_class_scores
    from deepvis.server.frames import FrameProcessor

    torch.manual_seed(0)
    module = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, img_size=32, patch_size=8).eval()
    model = deepvis.as_model(module, Preprocessing(input_size=(32, 32)))
    assert class_scores_problem(model) == (
        "model custom (VisionTransformer) has no classifier head (num_classes=0): its output is a 192-d feature vector, not class scores"
    )
    with pytest.raises(ModelError, match="; predictions need a model with a classifier$"):
        require_class_scores(model)
    image = Image.new("RGB", (32, 32), (120, 60, 30))
    (view,) = list(activation_views(model, image, "blocks.0", k=5))
    assert view.predictions == []
    assert not FrameProcessor(model).has_logits
    # the same architecture with a head has class scores
    headed = deepvis.as_model(
        timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=7, img_size=32, patch_size=8).eval(),
        Preprocessing(input_size=(32, 32)),
    )
    assert class_scores_problem(headed) is None and len(next(iter(activation_views(headed, image, "blocks.0", k=5))).predictions) == 5


def test_a_model_that_fails_at_the_default_input_size_says_how_to_give_another():
    class Fixed(nn.Module):  # a Linear after flattening: only 16 x 16 inputs fit
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.fc = nn.Linear(4 * 16 * 16, 5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.conv(x).flatten(1))

    from deepvis.capture import layer_table

    with pytest.raises(
        DeepvisError, match=r"fails on an input of shape \(3, 224, 224\).*--input-size PX, or Preprocessing\(input_size=...\)"
    ):
        layer_table(deepvis.as_model(Fixed()))
    assert layer_table(deepvis.as_model(Fixed(), Preprocessing(input_size=(16, 16))))[-1].shape == (5,)


class _Pair(nn.Module):
    """Returns (class scores, features) or {"logits": ..., "features": ...}: common in research code."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.as_dict = as_dict
        self.conv = nn.Conv2d(3, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor):
        f = self.conv(x).mean((2, 3))
        return {"logits": self.fc(f), "features": f} if self.as_dict else (self.fc(f), f)


@pytest.mark.parametrize(
    "as_dict,what,pick",
    [(False, "a tuple of 2 (4, 6)", "[0]"), (True, "a dict ('logits': 4, 'features': 6)", "['logits']")],
)
def test_a_model_that_returns_a_tuple_or_dict_is_told_how_to_wrap_it(as_dict, what, pick, capsys):
    from deepvis.capture import get_layer, layer_table
    from deepvis.capture.layers import output_problem

    model = deepvis.as_model(_Pair(as_dict), Preprocessing(input_size=(16, 16)))
    message = (
        f"the model returns {what}, not one tensor, so it has no `logits` layer (predictions, class objectives): "
        f"wrap it to return its class scores, e.g. a module whose forward is `return net(x){pick}`; its inner layers work as they are"
    )
    assert output_problem(model) == message
    with pytest.raises(DeepvisError) as exc:
        get_layer(model, "logits")
    assert str(exc.value) == message
    with pytest.raises(DeepvisError) as exc:
        capture(model, torch.zeros(1, 3, 16, 16), ["logits"])
    assert str(exc.value) == message
    assert capture(model, torch.zeros(1, 3, 16, 16), ["conv"])["conv"].shape == (1, 6, 8, 8)  # inner layers work
    assert "logits" not in [i.name for i in layer_table(model)]


def test_capture_at_a_size_a_fixed_grid_model_does_not_take_is_one_line():
    torch.manual_seed(0)
    model = deepvis.as_model(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8).eval())
    assert model.preprocessing.input_size == (32, 32)
    with pytest.raises(InputError) as exc:
        capture(model, torch.zeros(1, 3, 48, 48), ["blocks.0"])
    message = str(exc.value)
    assert message.startswith("the model fails on an input of 48x48 px (AssertionError: ") and "\n" not in message
    assert message.endswith("it was set up for 32x32: resize the input (model.preprocess(image) does) or give another input size")
    assert capture(model, torch.zeros(1, 3, 32, 32), ["blocks.0"])["blocks.0"].shape == (1, 192, 4, 4)
