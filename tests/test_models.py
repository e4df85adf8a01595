"""Models: the offline default, torchvision/timm loading code, user modules, checkpoints."""

from __future__ import annotations

import json
import random
import socket
import time
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from deepvis.capture import capture
from deepvis.errors import ModelError, WeightsError
from deepvis.models import Preprocessing, WeightsSource, load_model, model_hash, model_identity, read_state_dict
from deepvis.models.efficientnet_lite import lite_checkpoint_renamer
from deepvis.predictions import top_k

CAT_CLASSES = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _top1(model, image) -> int:
    logits = capture(model, model.preprocess(image), ["logits"])["logits"]
    return top_k(model, logits, 1)[0][0].index


def test_default_model_classifies_sample_photos(default_model, sample_images):
    assert default_model.name == "default"
    assert default_model.preprocessing == Preprocessing((224, 224), (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875, 3)
    logits = capture(default_model, default_model.preprocess(sample_images["coffee"]), ["logits"])["logits"]
    best = top_k(default_model, logits, 5)[0]
    assert best[0].label == "espresso" and best[0].probability > 0.8
    assert _top1(default_model, sample_images["chelsea"]) in CAT_CLASSES


def test_lite2_loads_offline_with_its_own_preprocessing(sample_images):
    model = load_model("lite2", device="cpu")
    assert model.preprocessing.input_size == (260, 260)
    assert model.preprocessing.crop_pct == pytest.approx(0.89)
    assert model.label(_top1(model, sample_images["coffee"])) == "espresso"


def test_lite_renamer_follows_the_table():
    rename = lite_checkpoint_renamer((1, 2, 2, 3, 3, 4, 1))
    assert rename("_conv_stem.weight") == "conv_stem.weight"
    assert rename("_bn0.running_mean") == "bn1.running_mean"
    assert rename("_fc.bias") == "classifier.bias"
    assert rename("_blocks.0._project_conv.weight") == "blocks.0.0.conv_pw.weight"
    assert rename("_blocks.2._expand_conv.weight") == "blocks.1.1.conv_pw.weight"
    assert rename("_blocks.3._project_conv.weight") == "blocks.2.0.conv_pwl.weight"
    assert rename("_blocks.15._bn2.bias") == "blocks.6.0.bn3.bias"


def _tiny_state(model: nn.Module, path: Path) -> Path:
    torch.save(model.state_dict(), path)
    return path


def test_torchvision_with_a_weights_file(tmp_path):
    import torchvision

    src = torchvision.models.resnet18(weights=None)
    path = _tiny_state(src, tmp_path / "r18.pth")
    model = load_model("torchvision:resnet18", weights=path, device="cpu")
    assert model.class_names is not None and len(model.class_names) == 1000
    assert model.preprocessing.input_size == (224, 224)
    assert model.preprocessing.interpolation == "bilinear"
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.module(x), src.eval()(x))


@pytest.fixture()
def empty_offline_hubs(tmp_path, monkeypatch):
    """No network and empty weight caches, whatever the user's own caches (~/.cache/torch, ~/.cache/huggingface) hold."""
    import huggingface_hub.constants

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    home = tmp_path / "empty_cache"
    home.mkdir()
    for var, sub in (("TORCH_HOME", "torch"), ("HF_HOME", "huggingface"), ("HF_HUB_CACHE", "huggingface/hub")):
        monkeypatch.setenv(var, str(home / sub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads its environment once, at import: set what it read
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(home / "huggingface/hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # torch.hub reads $TORCH_HOME on each call
    monkeypatch.setattr(socket, "create_connection", _no_network)  # the reachability check finds no host
    return home


def _no_network(address, timeout=None, *a, **k):
    """``socket.create_connection`` of a machine without a network: fails at once (never connects)."""
    assert timeout is not None and timeout <= 3.0, f"reachability check without a short timeout ({timeout})"
    raise OSError(f"[Errno 101] Network is unreachable: {address}")


def test_torchvision_pretrained_offline_is_one_clear_error(empty_offline_hubs):
    with pytest.raises(ModelError, match=r"cannot fetch pretrained weights for torchvision:resnet18.*--weights FILE"):
        load_model("torchvision:resnet18")


def test_timm_offline_error_and_weights_file(tmp_path, empty_offline_hubs):
    import timm

    with pytest.raises(ModelError, match=r"timm:resnet18.*--weights FILE"):
        load_model("timm:resnet18")
    src = timm.create_model("resnet18", pretrained=False, num_classes=7)
    from safetensors.torch import save_file

    save_file(src.state_dict(), str(tmp_path / "r18.safetensors"))
    model = load_model("timm:resnet18", weights=tmp_path / "r18.safetensors", device="cpu")
    assert model.module.num_classes == 7 and model.class_names is None


def test_unknown_models_suggest_close_names():
    with pytest.raises(ModelError, match="resnet18"):
        load_model("torchvision:resnet181")
    with pytest.raises(ModelError, match="unknown model 'nosuch'"):
        load_model("nosuch")


USER_FILE = """
import torch
from torch import nn

class Gray(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)
    def forward(self, x):
        return self.fc(self.pool(torch.relu(self.conv(x))).flatten(1))

def gray():
    torch.manual_seed(0)
    return Gray()

def rgb96():
    m = nn.Sequential(nn.Conv2d(3, 2, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2, 2))
    m.pretrained_cfg = {"input_size": (3, 96, 96), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    return m

def broken():
    raise RuntimeError("no")
"""


@pytest.fixture()
def user_file(tmp_path):
    p = tmp_path / "mynet.py"
    p.write_text(USER_FILE)
    return p


def test_user_module_grayscale_and_custom_size(user_file, tmp_path):
    gray = load_model(f"{user_file}:gray", device="cpu")
    assert gray.preprocessing.channels == 1 and gray.preprocessing.pil_mode == "L"
    rgb = load_model(f"{user_file}:rgb96", device="cpu")
    assert rgb.preprocessing.input_size == (96, 96) and rgb.preprocessing.std == (0.25,) * 3
    labels = tmp_path / "labels.txt"
    labels.write_text("red\ngreen\nblue\n")
    named = load_model(f"{user_file}:gray", labels=labels, device="cpu")
    assert named.class_index("green") == 1
    with pytest.raises(ModelError, match="factory raised RuntimeError"):
        load_model(f"{user_file}:broken")
    with pytest.raises(ModelError, match="no callable named 'missing'"):
        load_model(f"{user_file}:missing")
    with pytest.raises(ModelError, match="model file not found"):
        load_model(f"{tmp_path / 'nope.py'}:gray")


def test_user_module_from_a_package_path():
    model = load_model("torchvision.models:alexnet", device="cpu")
    assert model.preprocessing.channels == 3 and model.preprocessing.input_size == (224, 224)


def test_checkpoint_mismatch_names_the_keys(user_file, tmp_path):
    bad = {"conv.weight": torch.zeros(4, 1, 5, 5), "conv.bias": torch.zeros(4), "extra.w": torch.zeros(1)}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(WeightsError) as err:
        load_model(f"{user_file}:gray", weights=tmp_path / "bad.pt")
    msg = str(err.value)
    assert "missing keys: fc.weight, fc.bias" in msg
    assert "unexpected keys: extra.w" in msg
    assert "conv.weight (4, 1, 5, 5) vs (4, 1, 3, 3)" in msg
    assert "\n" not in msg


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch /tmp/deepvis_pwned_marker",))


def test_pickled_code_is_never_executed(tmp_path):
    marker = Path("/tmp/deepvis_pwned_marker")
    marker.unlink(missing_ok=True)
    torch.save({"w": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(WeightsError, match="pickled Python objects besides tensors"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


def test_bad_weight_files(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(WeightsError, match="empty"):
        read_state_dict(tmp_path / "empty.pt")
    with pytest.raises(WeightsError, match="cannot read weights"):
        read_state_dict(tmp_path / "junk.pt")
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "none.pt")
    torch.save({"state_dict": {"module.a": torch.ones(1)}}, tmp_path / "wrapped.pt")
    assert list(read_state_dict(tmp_path / "wrapped.pt")) == ["a"]


def test_default_weights_can_be_given_in_either_naming(tmp_path, default_model):
    from deepvis.models.efficientnet_lite import _checkpoint_path

    model = load_model("default", weights=_checkpoint_path(0), device="cpu")  # lukemelas names
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.allclose(model.module(x), default_model.module(x))
    torch.save(default_model.module.state_dict(), tmp_path / "timm_names.pth")
    again = load_model("default", weights=tmp_path / "timm_names.pth", device="cpu")  # timm names
    with torch.no_grad():
        assert torch.equal(again.module(x), default_model.module(x))


def test_to_image_rounds_half_up_and_clips():
    prep = Preprocessing((1, 5), (0.5,), (0.5,), channels=1)
    pixels01 = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1]).view(1, 1, 5)  # 0.5 -> 127.5 -> 128
    image = prep.to_image(prep.normalize(pixels01))
    assert image.mode == "L" and np.asarray(image).tolist() == [[0, 128, 255, 255, 0]]
    rgb = Preprocessing((2, 2))
    x = rgb.normalize(torch.full((3, 2, 2), 10 / 255))
    assert (np.asarray(rgb.to_image(x)) == 10).all()


# -- random weights (--weights random) ----------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["timm:resnet18", "torchvision:resnet18", "default"])
def test_random_weights_are_deterministic_and_leave_the_global_rng(spec):
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    a = load_model(spec, weights="random", device="cpu")
    b = load_model(spec, weights="random", device="cpu")
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert (np.random.get_state()[1] == states[2]).all()  # the caller's random streams are untouched
    assert model_hash(a) == model_hash(b)
    assert a.weights == WeightsSource.random(0) and a.weights.untrained and str(a.weights) == "random (seed 0)"
    assert model_identity(a)["weights"] == "random (seed 0)"
    assert a.name == spec and a.class_names is not None and len(a.class_names) == 1000


def test_random_weights_differ_from_the_trained_ones(default_model):
    rand = load_model("default", weights="random", device="cpu")
    assert default_model.weights.kind == "pretrained" and str(default_model.weights) == "pretrained"
    assert model_hash(rand) != model_hash(default_model)
    assert [n for n, _ in rand.module.named_parameters()] == [n for n, _ in default_model.module.named_parameters()]


def test_random_googlenet_has_the_pretrained_architecture():
    model = load_model("torchvision:googlenet", weights="random", device="cpu")
    assert model.module.aux1 is None and model.module.transform_input  # as the published model, no auxiliary heads


def test_random_weights_for_a_user_factory_is_one_line(user_file):
    with pytest.raises(ModelError, match=r"^--weights random applies to built-in, torchvision: and timm: models; .*gray makes its own"):
        load_model(f"{user_file}:gray", weights="random")
    model = load_model(f"{user_file}:gray", device="cpu")
    assert model.weights.kind == "module" and not model.weights.untrained


def test_weights_file_is_recorded(tmp_path):
    import torchvision

    path = _tiny_state(torchvision.models.resnet18(weights=None), tmp_path / "r18.pth")
    model = load_model("torchvision:resnet18", weights=path, device="cpu")
    assert model.weights == WeightsSource.file(str(path)) and str(model.weights) == str(path)


def test_cli_says_untrained_once_and_records_it(capsys):
    from deepvis.cli import main

    assert main(["layers", "--model", "timm:resnet18", "--weights", "random", "--json"]) == 0
    out, err = capsys.readouterr()
    assert err.count("random weights (seed 0): untrained") == 1 and len(err.strip().splitlines()) == 1
    data = json.loads(out)
    assert data["model"] == "timm:resnet18" and data["weights"] == "random (seed 0)"
    assert main(["layers", "--json"]) == 0  # trained weights: no note
    out, err = capsys.readouterr()
    assert err == "" and json.loads(out)["weights"] == "pretrained"


def test_help_of_weights_says_random(capsys):
    from deepvis.cli import main

    with pytest.raises(SystemExit):
        main(["layers", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--weights FILE|random" in text and "'random': the architecture untrained" in text


def test_optimize_records_the_weights():
    from deepvis.optimize import visualize

    model = load_model("timm:resnet18", weights="random", device="cpu", input_size=32)
    res = visualize(model, ["layer1:0"], steps=1, size=32)[0]
    assert res.to_dict()["weights"] == "random (seed 0)"


# -- offline hubs: the local caches without any network call, else one fast line -----------------------------
def test_offline_hub_fails_at_once_with_one_line(empty_offline_hubs, capfd, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # the socket check decides
    for spec in ("timm:vit_tiny_patch16_224", "torchvision:resnet18"):
        t0 = time.perf_counter()
        with pytest.raises(ModelError) as err:
            load_model(spec)
        assert time.perf_counter() - t0 < 10
        msg = str(err.value)
        assert "\n" not in msg and "cannot be reached" in msg and "--weights random" in msg and "--weights FILE" in msg
    out, errout = capfd.readouterr()
    assert out == "" and errout == ""  # no retries, no "Downloading: ..."


def test_hf_hub_offline_flag_is_respected(empty_offline_hubs):
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set; pass --weights FILE"):
        load_model("timm:resnet18")


def _fake_hf_cache(root: Path, repo: str, filename: str, payload: dict) -> Path:
    """A Hugging Face hub cache entry as huggingface_hub writes it: refs/main names a snapshot holding the file."""
    from safetensors.torch import save_file

    folder = root / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd")
    snap = folder / "snapshots" / "0123abcd"
    snap.mkdir(parents=True)
    save_file(payload, str(snap / filename))
    return snap / filename


def test_timm_weights_in_the_hf_cache_load_without_network(empty_offline_hubs, capfd, monkeypatch):
    import huggingface_hub
    import timm

    def no_download(*a, **k):
        raise AssertionError("a network call for cached weights")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", no_download)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_download)  # timm's own reference
    torch.manual_seed(5)
    src = timm.create_model("resnet18", pretrained=False)
    hub_id = timm.models.get_pretrained_cfg("resnet18").hf_hub_id
    _fake_hf_cache(empty_offline_hubs / "huggingface/hub", hub_id, "model.safetensors", src.state_dict())
    capfd.readouterr()
    model = load_model("timm:resnet18", device="cpu")
    assert model.weights == WeightsSource.pretrained(f"hf-hub:{hub_id}")
    for k, v in src.state_dict().items():
        assert torch.equal(model.module.state_dict()[k], v), k
    assert capfd.readouterr().err == ""


def test_torchvision_weights_in_the_torch_hub_cache_load_without_network(empty_offline_hubs, capfd):
    import torchvision

    torch.manual_seed(6)
    src = torchvision.models.resnet18(weights=None)
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    ckpt = empty_offline_hubs / "torch" / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(src.state_dict(), ckpt / url.rsplit("/", 1)[1])
    capfd.readouterr()
    model = load_model("torchvision:resnet18", device="cpu")
    assert model.weights.kind == "pretrained" and model.weights.detail == "ResNet18_Weights.IMAGENET1K_V1"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.module(x), src.eval()(x))
    out, err = capfd.readouterr()
    assert out == "" and err == ""  # no "Downloading: ..."


def test_input_size_builds_vits_for_that_size_and_leaves_convnets_as_they_are():
    from deepvis.capture import get_layer

    vit = load_model("timm:vit_tiny_patch16_224", weights="random", device="cpu", input_size=96)
    assert vit.module.patch_embed.img_size == (96, 96) and vit.preprocessing.input_size == (96, 96)
    info = get_layer(vit, "blocks.0")
    assert info.layout.describe() == "tokens 1+6x6" and info.shape == (192, 6, 6)
    assert vit.module(torch.zeros(1, 3, 96, 96)).shape == (1, 1000)
    cnn = load_model("timm:resnet18", weights="random", device="cpu", input_size=64)  # takes no img_size: built as is
    assert cnn.preprocessing.input_size == (64, 64) and get_layer(cnn, "layer2").shape == (128, 8, 8)
