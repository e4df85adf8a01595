"""``deepvis backprop`` and ``deepvis rf``: main jobs, JSON, and one-line errors with exit 2 and no output."""

from __future__ import annotations

import json
import textwrap

import numpy as np
from PIL import Image

from deepvis.cli import main

SILU_MODEL = """
import torch
from torch import nn


def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, stride=2), nn.SiLU(), nn.Conv2d(8, 8, 3, stride=2), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
"""


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_backprop_main_job(tmp_path, capsys):
    out = tmp_path / "view.png"
    code, stdout, err = run(
        ["backprop", "sample:coffee", "--unit", "logits:967", "--mode", "guided", "--filter", "norm", "-o", out], capsys
    )
    assert code == 0, err
    assert stdout.startswith("logits:967 (guided): activation")
    im = np.asarray(Image.open(out))
    assert im.shape == (224, 224, 3) and im.max() == 255 and im.min() == 0
    code, stdout, err = run(
        [
            "backprop",
            "sample:chelsea",
            "--unit",
            "blocks.3:11",
            "--at",
            "max",
            "--mode",
            "deconv",
            "--filter",
            "normblur",
            "--overlay",
            "--json",
            "-o",
            tmp_path / "o.jpg",
        ],
        capsys,
    )
    assert code == 0, err
    data = json.loads(stdout)
    assert data["position"] == data["argmax"] and data["unit"] == f"blocks.3:11@{data['position'][0]},{data['position'][1]}"
    assert data["mode"] == "deconv" and data["layer_shape"] == [80, 14, 14] and data["activation"] > 0
    assert Image.open(tmp_path / "o.jpg").size == (224, 224)


def test_backprop_draws_the_readable_view_by_default_and_the_raw_one_when_asked(tmp_path, capsys):
    """The command's default display is the live toolbox's (deepvis.backprop.READABLE): on a real photo
    many more pixels are visible in it than in the raw view at full scale, which it still draws when asked."""
    from deepvis.backprop import RAW, READABLE, backprop_image, backprop_view
    from deepvis.io import load_image, sample_photos
    from deepvis.models import load_model

    args = ["backprop", "sample:chelsea", "--unit", "blocks.5:3", "--at", "max", "--mode", "guided"]
    code, _, err = run([*args, "-o", tmp_path / "default.png"], capsys)
    assert code == 0, err
    code, _, err = run([*args, "--filter", RAW.filter, "--percentile", RAW.percentile, "-o", tmp_path / "raw.png"], capsys)
    assert code == 0, err
    default, raw = (np.asarray(Image.open(tmp_path / f"{n}.png")).max(2) for n in ("default", "raw"))
    result = backprop_view(load_model("default"), load_image(sample_photos()["chelsea"], "RGB"), "blocks.5:3", mode="guided", at="max")
    assert np.array_equal(default, backprop_image(result, READABLE.filter, percentile=READABLE.percentile).max(2))
    visible, visible_raw = (float((v > 64).mean()) for v in (default, raw))
    assert visible > 0.05 and visible > 5 * visible_raw, (visible, visible_raw)  # measured: 0.145 against 0.004


def test_backprop_errors_exit_2_without_output(tmp_path, capsys):
    out = tmp_path / "v.png"
    for args, text in [
        (["--unit", "blocks.3:999"], "out of range"),
        (["--unit", "blocks.3"], "bad unit"),
        (["--unit", "nolayer:1"], "no layer named"),
        (["--unit", "blocks.3:1@2,2", "--at", "max"], "not both"),
        (["--unit", "blocks.3:1", "--percentile", "0"], "percentile"),
    ]:
        code, _, err = run(["backprop", "sample:coffee", *args, "-o", out], capsys)
        assert code == 2 and text in err and err.count("\n") == 1, err
        assert not out.exists()
    code, _, err = run(["backprop", tmp_path / "missing.png", "--unit", "blocks.3:1", "-o", out], capsys)
    assert code == 2 and "not found" in err and not out.exists()


def test_backprop_silu_model_needs_allow_plain(tmp_path, capsys):
    path = tmp_path / "net.py"
    path.write_text(textwrap.dedent(SILU_MODEL))
    out = tmp_path / "v.png"
    base = ["backprop", "sample:coffee", "--model", f"{path}:build", "--input-size", "64", "--unit", "logits:1", "-o", out]
    code, _, err = run([*base, "--mode", "deconv"], capsys)
    assert code == 2 and "0 (Sequential" not in err and "1 (SiLU: silu)" in err and "--allow-plain" in err
    assert not out.exists()
    code, _, err = run([*base, "--mode", "deconv", "--allow-plain"], capsys)
    assert code == 0 and "warning" in err and "1 (SiLU" in err and out.exists()
    code, _, err = run([*base, "--mode", "gradient"], capsys)
    assert code == 0 and "warning" not in err


def test_rf_text_json_and_crop(tmp_path, capsys):
    small = ["--input-size", "128"]  # blocks.1's field is 19 px at any input size; 128 px is quicker
    out = tmp_path / "crop.png"
    code, stdout, err = run(["rf", "--unit", "blocks.1:5@0,0", "--image", "sample:coffee", "-o", out, *small], capsys)
    assert code == 0, err
    assert "blocks.1@0,0: input rows 0 to 12, columns 0 to 12 (13x13 px)" in stdout
    assert "full field rows -6 to 12" in stdout and "32x32 map, field 19x19 px, stride 4x4 px, input 128x128" in stdout
    crop = np.asarray(Image.open(out))
    assert crop.shape == (19, 19, 3)
    assert (crop[:6] == 0).all() and (crop[:, :6] == 0).all() and crop[6:, 6:].any()  # padded at the top-left
    code, stdout, err = run(["rf", "--unit", "blocks.1@16,16", "--json", *small], capsys)
    data = json.loads(stdout)
    assert data["size"] == [19, 19] and data["clipped"] is False and data["box"] == data["field"] == [58, 58, 77, 77]
    assert data["layer_field"]["stride"] == [4.0, 4.0] and data["layer_field"]["output_size"] == [32, 32]
    code, _, err = run(["rf", "--unit", "blocks.1@0,0", "--image", "sample:coffee"], capsys)
    assert code == 2 and "go together" in err
    code, _, err = run(["rf", "--unit", "blocks.1@99,0", *small], capsys)
    assert code == 2 and "outside the 32x32" in err
    code, stdout, _ = run(["rf", "--unit", "logits", *small], capsys)
    assert code == 0 and "rows 0 to 127, columns 0 to 127" in stdout
