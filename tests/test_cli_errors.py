"""The command line's answers to bad input, across commands: one line on stderr, exit 2, before any
work is done where it can be known then; and nothing already computed is lost (Ctrl-C in optimize)."""

from __future__ import annotations

import json
import os
import signal

import pytest

import deepvis.optimize
from deepvis.cli import main


def _one_line_error(capsys, code: int) -> str:
    _, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["activations", "sample:coffee", "--layer", "blocks.3", "-o", "{file}/x.png"],
        ["optimize", "--layer", "blocks.3", "--units", "0", "--steps", "2", "--size", "32", "-o", "{file}/sub/out"],
        ["report", "demo", "--max-images", "4", "-o", "{file}/r.html"],
    ],
)
def test_an_output_that_cannot_be_written_is_refused_before_the_work(tmp_path, capsys, argv):
    (tmp_path / "afile").write_text("a file, not a folder")
    code = main([a.replace("{file}", str(tmp_path / "afile")) for a in argv])
    line = _one_line_error(capsys, code)
    assert line.startswith("deepvis: error: cannot write ") and line.endswith(f"{tmp_path / 'afile'} is a file, not a folder")


def test_an_unwritable_folder_is_named(tmp_path, capsys):
    if os.geteuid() == 0:  # root writes anywhere a mode bit says no; /proc refuses new files even to root
        target = "/proc/deepvis-test/x.png"
        folder = "/proc"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target, folder = str(locked / "x.png"), str(locked)
    code = main(["activations", "sample:coffee", "--layer", "blocks.3", "-o", target])
    assert _one_line_error(capsys, code).startswith(f"deepvis: error: cannot write {target}: cannot write in {folder} (")


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["optimize", "--layer", "blocks.3", "--steps", "abc", "-o", "o"],
            "deepvis optimize: error: argument --steps: invalid int value: 'abc'",
        ),
        (["predict", "sample:coffee", "--input-size", "0"], "deepvis predict: error: argument --input-size: 0 is less than 1"),
        (["activations", "sample:coffee", "--layer", "blocks.3", "--scale", "-2", "-o", "a.png"], "argument --scale: -2 is less than 1"),
        (["atlas", "demo", "--batch-size", "0", "-o", "a"], "argument --batch-size: 0 is less than 1"),
        (["info", "extra"], "deepvis: error: unrecognized arguments: extra"),
    ],
)
def test_argument_errors_are_one_line(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    _, err = capsys.readouterr()
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err and "--help)" in err


def test_a_damaged_atlas_index_is_one_line(tmp_path, capsys):
    (tmp_path / "atlas").mkdir()
    (tmp_path / "atlas" / "index.sqlite").write_bytes(os.urandom(4096))
    code = main(["atlas", "demo", "--layers", "blocks.3", "--no-views", "--no-synthesis", "-o", str(tmp_path / "atlas")])
    assert "its index index.sqlite cannot be read" in _one_line_error(capsys, code)
    assert (tmp_path / "atlas" / "index.sqlite").stat().st_size == 4096  # left as it was


def test_ctrl_c_in_optimize_writes_the_units_done(tmp_path, capsys, monkeypatch):
    """SIGINT during the second batch: the first unit is written whole, the second as far as it got
    (``stopped`` in its record), the third never began; the exit status is 130."""
    real = deepvis.optimize.visualize
    steps = 6

    def interrupted_in_the_second_batch(*args, progress, **kwargs):
        def report(done, total):
            progress(done, total)
            if done == steps + 2:
                os.kill(os.getpid(), signal.SIGINT)

        return real(*args, progress=report, **kwargs)

    monkeypatch.setattr(deepvis.optimize, "visualize", interrupted_in_the_second_batch)
    out = tmp_path / "o"
    argv = ["optimize", "--layer", "blocks.3", "--units", "0-2", "--batch-size", "1", "--steps", str(steps), "--size", "32"]
    code = main([*argv, "--judge", "none", "-o", str(out)])
    _, err = capsys.readouterr()
    assert code == 130, err
    assert "interrupted: wrote 2 of the 3 units (1 stopped before their last step" in err
    first, second = (json.loads((out / f"blocks.3-{k}.json").read_text()) for k in (0, 1))
    assert (first["stopped"], first["steps_run"]) == (False, steps)
    assert second["stopped"] is True and second["steps_run"] < steps
    assert not (out / "blocks.3-2.json").exists() and (out / "montage.png").is_file()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back


@pytest.mark.parametrize(
    "argv,message",
    [
        (["rf", "--unit", "blocks.3:80@1,1"], "unit blocks.3:80@1,1 is out of range: layer blocks.3 has 80 units (0-79)"),
        (["rf", "--unit", "blocks.3@20,1"], "position is outside the 14x14 map of blocks.3"),
        (["predict", "sample:coffee", "--labels", "{short}"], "has 3 names, but the model has 1000 outputs"),
        (["layers", "--layout", "blocks.33=nchw"], "no layer named 'blocks.33' in the model; did you mean blocks.3"),
    ],
)
def test_a_unit_labels_or_layout_the_model_does_not_have_is_one_line(tmp_path, capsys, argv, message):
    (tmp_path / "short.txt").write_text("a\nb\nc\n")
    code = main([a.replace("{short}", str(tmp_path / "short.txt")) for a in argv])
    assert message in _one_line_error(capsys, code)


def test_an_atlas_of_only_unreadable_inputs_is_an_error(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    for k in range(2):
        (data / f"b{k}.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    code = main(["atlas", str(data), "--layers", "blocks.3", "--no-views", "--no-synthesis", "-o", str(tmp_path / "a")])
    _, err = capsys.readouterr()
    assert (
        code == 2
        and err.strip().splitlines()[-1] == f"deepvis: error: none of the 2 inputs of {data} could be read: the atlas holds nothing"
    )


def test_contradicting_options_are_refused(tmp_path, capsys):
    base = ["optimize", "--layer", "blocks.3", "--units", "0", "--steps", "1", "--size", "32", "-o", str(tmp_path / "o")]
    assert "does not go with --objective channel" in _one_line_error(capsys, main([*base, "--at", "1,1", "--objective", "channel"]))
    assert "--fourier and --param pixel contradict" in _one_line_error(capsys, main([*base, "--fourier", "--param", "pixel"]))
    assert not (tmp_path / "o").exists()
    # --judge for hidden units only: run, with a note that says where their figures come from
    assert main([*base, "--judge", "lite1"]) == 0
    assert "note: --judge applies to class objectives" in capsys.readouterr().err


def test_a_judge_without_weights_here_is_told_so_without_the_model_options_advice(tmp_path, capsys):
    (tmp_path / "u.json").write_text("{}")
    line = _one_line_error(capsys, main(["score", str(tmp_path), "--judge", "timm:resnet18"]))
    assert line.startswith("deepvis: error: judge timm:resnet18: ") and "--weights" not in line
    assert line.endswith("a judge needs trained weights that are here")


def test_a_video_into_a_picture_name_is_refused(tmp_path, capsys):
    from PIL import Image

    from deepvis.io import VideoWriter, sample_path

    clip = tmp_path / "clip.mp4"
    with VideoWriter(clip, fps=5) as w:
        for _ in range(3):
            w.write(Image.open(sample_path("coffee")).convert("RGB").resize((64, 64)))
    line = _one_line_error(capsys, main(["activations", str(clip), "--layer", "blocks.3", "-o", str(tmp_path / "v.png")]))
    assert "clip.mp4 is a video: OUT is a video file" in line and not (tmp_path / "v.png").exists()


@pytest.mark.parametrize(
    "option,message", [("--weights", "is a folder, not a checkpoint file"), ("--labels", "is a folder, not a file of names")]
)
def test_a_folder_given_for_a_file_is_named_as_one(tmp_path, capsys, option, message):
    assert message in _one_line_error(capsys, main(["predict", "sample:coffee", option, str(tmp_path)]))


def test_backprop_options_that_do_not_apply_are_refused(tmp_path, capsys):
    out = tmp_path / "b.png"
    base = ["backprop", "sample:coffee", "-o", str(out)]
    line = _one_line_error(capsys, main([*base, "--unit", "logits:967", "--at", "max"]))
    assert line == "deepvis: error: unit logits:967 is one value (layer logits has no map of positions): at='max' does not apply to it"
    line = _one_line_error(capsys, main([*base, "--unit", "blocks.3:1", "--alpha", "0.3"]))
    assert line == "deepvis: error: --alpha weighs the view in --overlay: add --overlay, or drop --alpha"
    assert not out.exists()
    # with --overlay it is used: a smaller weight keeps the output nearer the photo
    assert main([*base, "--unit", "blocks.3:1", "--overlay", "--alpha", "0.0"]) == 0
    import numpy as np
    from PIL import Image

    from deepvis.io import load_image
    from deepvis.io.samples import sample_path
    from deepvis.models import load_model

    photo = load_model("default").preprocessing.fit(load_image(sample_path("coffee")))
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(photo.convert("RGB")))


def test_predict_refuses_a_model_without_a_classifier_head(tmp_path, capsys):
    (tmp_path / "headless.py").write_text(
        "import timm\n\n\ndef tower():\n"
        "    return timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=0, img_size=32, patch_size=8)\n"
    )
    spec = f"{tmp_path / 'headless.py'}:tower"
    line = _one_line_error(capsys, main(["predict", "sample:coffee", "--model", spec, "--input-size", "32"]))
    assert line.endswith(
        "has no classifier head (num_classes=0): its output is a 192-d feature vector, not class scores; predictions need a model with a classifier"
    )
    out = tmp_path / "a.png"
    assert main(["activations", "sample:coffee", "--model", spec, "--input-size", "32", "--layer", "blocks.0", "-o", str(out)]) == 0
    assert "deepvis: note: no predictions: " in capsys.readouterr().err and out.is_file()


def test_layers_of_a_model_that_returns_a_tuple_says_why_there_are_no_logits(tmp_path, capsys):
    (tmp_path / "pair.py").write_text(
        "import torch\nfrom torch import nn\n\n\nclass Pair(nn.Module):\n"
        "    def __init__(self):\n        super().__init__()\n        self.c = nn.Conv2d(3, 4, 3)\n        self.fc = nn.Linear(4, 2)\n\n"
        "    def forward(self, x):\n        f = self.c(x).mean((2, 3))\n        return self.fc(f), f\n\n\ndef pair():\n    return Pair()\n"
    )
    spec = f"{tmp_path / 'pair.py'}:pair"
    assert main(["layers", "--model", spec, "--input-size", "16"]) == 0
    out, err = capsys.readouterr()
    header, first = out.splitlines()[:2]
    assert header.startswith("layer  type ") and first.startswith("c      Conv2d ")  # the columns line up under the header
    assert "deepvis: note: the model returns a tuple of 2 (2, 4), not one tensor, so it has no `logits` layer" in err
    line = _one_line_error(capsys, main(["predict", "sample:coffee", "--model", spec, "--input-size", "16"]))
    assert "e.g. a module whose forward is `return net(x)[0]`" in line
