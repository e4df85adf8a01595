"""The command line: the main job, JSON output, and one-line errors with exit 2 for every bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deepvis._fs import atomic_path
from deepvis.cli import main
from deepvis.io import VideoWriter


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_activations_main_job(tmp_path, capsys):
    out = tmp_path / "view.png"
    code, stdout, err = run(["activations", "sample:coffee", "--layer", "blocks.3", "-o", out, "--unit", "5"], capsys)
    assert code == 0, err
    assert "espresso" in stdout
    im = Image.open(out)
    assert im.width > 300 and im.height > 200
    code, stdout, _ = run(
        [
            "activations",
            "sample:chelsea",
            "--layer",
            "global_pool",
            "-o",
            tmp_path / "fc.png",
            "--grid-only",
            "--json",
            "--colormap",
            "viridis",
        ],
        capsys,
    )
    assert code == 0
    data = json.loads(stdout)
    assert data["inputs"][0]["predictions"][0]["index"] in {281, 282, 283, 284, 285}
    assert Image.open(tmp_path / "fc.png").size == (1 + 36 * 9, 1 + 36 * 9)  # 1280 units, 8px cells


def test_predict_and_layers_json(capsys):
    code, stdout, _ = run(["predict", "sample:coffee", "sample:chelsea", "-k", "3", "--json"], capsys)
    rows = json.loads(stdout)
    assert code == 0 and rows[0]["predictions"][0]["label"] == "espresso" and len(rows[1]["predictions"]) == 3
    code, stdout, _ = run(["layers", "--json"], capsys)
    layers = {r["name"]: r for r in json.loads(stdout)["layers"]}
    assert layers["blocks.3"]["shape"] == [80, 14, 14] and layers["logits"]["units"] == 1000
    code, stdout, _ = run(["models"], capsys)
    assert "default" in stdout and "lite2" in stdout and "torchvision:NAME" in stdout


def test_video_input_gives_video_and_frames(tmp_path, capsys):
    clip = tmp_path / "clip.mp4"
    rng = np.random.default_rng(0)
    with VideoWriter(clip, fps=8) as w:
        for _ in range(4):
            w.write(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8))
    code, _, err = run(["activations", clip, "--layer", "blocks.1", "-o", tmp_path / "grids.mp4", "-k", "0"], capsys)
    assert code == 0, err
    from deepvis.io import read_frames

    assert len(list(read_frames(tmp_path / "grids.mp4"))) == 4
    code, _, err = run(["activations", clip, "--layer", "blocks.1", "-o", tmp_path / "frames", "--every", "2"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "frames").iterdir()) == ["frame_000000.png", "frame_000001.png"]


def _bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "notes.png").write_text("not an image")
    good = tmp_path / "good.png"
    Image.new("RGB", (64, 64), (9, 9, 9)).save(good)
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")
    torch.save({"x": torch.zeros(2)}, tmp_path / "wrong.pt")
    o = ["-o", str(tmp_path / "out.png")]
    return {
        "missing": (["activations", str(tmp_path / "nope.jpg"), "--layer", "blocks.3", *o], "not found"),
        "empty": (["activations", str(tmp_path / "empty.jpg"), "--layer", "blocks.3", *o], "empty"),
        "non-image": (["activations", str(tmp_path / "notes.png"), "--layer", "blocks.3", *o], "not an image"),
        "truncated": (["activations", str(tmp_path / "cut.png"), "--layer", "blocks.3", *o], "truncated"),
        "bomb": (["activations", str(tmp_path / "bomb.png"), "--layer", "blocks.3", *o], "decompression bomb"),
        "unknown model": (["activations", str(good), "--layer", "blocks.3", "--model", "resnet9000", *o], "unknown model"),
        "unknown layer": (["activations", str(good), "--layer", "blocks.33", *o], "no layer named 'blocks.33'"),
        "unit out of range": (["activations", str(good), "--layer", "blocks.3", "--unit", "80", *o], "out of range"),
        "checkpoint mismatch": (
            ["activations", str(good), "--layer", "blocks.3", "--weights", str(tmp_path / "wrong.pt"), *o],
            "does not fit the model",
        ),
        "bad output type": (["activations", str(good), "--layer", "blocks.3", "-o", str(tmp_path / "out.txt")], "should be a .png"),
        "bad sample": (["predict", "sample:unicorn"], "no sample photo"),
    }


def test_every_bad_input_is_one_line_and_exit_2(tmp_path, capsys):
    for name, (args, msg) in _bad_inputs(tmp_path).items():
        code, out, err = run(args, capsys)
        assert code == 2, name
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("deepvis: error:") and msg in lines[0], (name, err)
        assert "Traceback" not in err
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".") or p.name.startswith("out")]
    assert leftovers == []


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "result.png"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_bytes(b"new")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old"


def test_real_entry_point_reexecs_with_allocator_tuning_and_debug_shows_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DEEPVIS_REEXECED", "LD_PRELOAD")}
    exe = Path(sys.executable).with_name("deepvis")
    r = subprocess.run([str(exe), "info", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["allocator_tuned"] is True and "hugetlb=1" in info["GLIBC_TUNABLES"]
    r = subprocess.run([str(exe), "layers", "--model", "nosuch"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    r = subprocess.run([str(exe), "layers", "--model", "nosuch", "--debug"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_atomic_outputs_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644


def test_one_restart_sets_allocator_and_start_only_variables():
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "DEEPVIS_REEXECED", "LD_PRELOAD", "OMP_WAIT_POLICY")}
    code = (
        "import os\n"
        "from deepvis.allocator import ensure_allocator_tuning\n"
        "print('start', flush=True)\n"
        "ensure_allocator_tuning({'OMP_WAIT_POLICY': 'PASSIVE'})\n"
        "print(os.environ['GLIBC_TUNABLES'][:20], os.environ['OMP_WAIT_POLICY'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:3] == ["start", "start", "glibc.malloc.hugetlb PASSIVE"]  # ran twice, then settled
    env["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's own choice is kept
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.stdout.strip().splitlines()[-1].endswith("ACTIVE")


def _clean_env(**extra: str) -> dict[str, str]:
    drop = ("GLIBC_TUNABLES", "DEEPVIS_REEXECED", "LD_PRELOAD", "OMP_WAIT_POLICY", "DEEPVIS_NO_ALLOCATOR_TUNING")
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def _subcommands() -> list[str]:
    from deepvis.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return sorted(sub.choices)


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["--version"],
        ["layers", "--help"],
        *[[name, "--help"] for name in _subcommands()],
        ["backprop", "x.png", "--unit", "logits:1", "-o", "out.png", "--mode", "bogus"],  # a bad choice
        ["predict"],  # a missing argument
        ["layers", "--no-such-option"],
        ["no-such-command"],
    ],
    ids=lambda a: " ".join(a),
)
def test_help_and_argument_errors_import_no_torch(args, tmp_path):
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "deepvis", *args],
        capture_output=True,
        text=True,
        env=_clean_env(),
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == (0 if args[-1] in ("--help", "--version") else 2), r.stderr
    imported = {line.rsplit("|", 1)[1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
    assert "deepvis.cli" in imported and "torch" not in imported and "numpy" not in imported
    assert list(tmp_path.iterdir()) == []


def test_only_model_commands_restart_and_only_once(tmp_path):
    """Each interpreter start appends a line to a log (a sitecustomize on PYTHONPATH); exec keeps the pid."""
    log = tmp_path / "starts.log"
    (tmp_path / "sitecustomize.py").write_text(
        "import os\n"
        f"with open({str(log)!r}, 'a') as f:\n"
        "    f.write(f\"{os.getpid()} {os.environ.get('DEEPVIS_REEXECED', '-')} {'GLIBC_TUNABLES' in os.environ} "
        "{os.environ.get('OMP_WAIT_POLICY', '-')}\\n\")\n"
    )
    env = _clean_env(PYTHONPATH=str(tmp_path))
    exe = Path(sys.executable).with_name("deepvis")

    def starts(*args: str) -> list[list[str]]:
        log.unlink(missing_ok=True)
        subprocess.run([str(exe), *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
        return [line.split() for line in log.read_text().splitlines()]

    for args in (["--help"], ["layers", "--help"], ["layers", "--bogus"], ["models"], ["info", "--json"]):
        assert [s[1:] for s in starts(*args)] == [["-", "False", "-"]], args  # no restart
    first, second = starts("layers", "--model", "nosuch")  # a model command: exactly one restart, same process
    assert first[0] == second[0] and first[1:] == ["-", "False", "-"] and second[1:] == ["1", "True", "-"]
    _, second = starts("serve", "--model", "nosuch", "--port", "99999")
    assert second[1:] == ["1", "True", "PASSIVE"]  # serve's start-only setting rides on the same restart
    assert len(starts("layers", "--model", "nosuch")) == 2
    env["DEEPVIS_NO_ALLOCATOR_TUNING"] = "1"  # opted out: no restart at all
    assert len(starts("layers", "--model", "nosuch")) == 1


def test_choices_come_from_the_library_lists():
    from deepvis import choices
    from deepvis.backprop import FILTERS, MODES
    from deepvis.cli import build_parser
    from deepvis.optimize import LR_POLICIES, OBJECTIVE_KINDS, OPTIMIZERS, PRESETS
    from deepvis.render import COLORMAPS

    assert MODES is choices.BACKPROP_MODES and FILTERS is choices.BACKPROP_FILTERS and COLORMAPS is choices.COLORMAPS
    assert LR_POLICIES is choices.LR_POLICIES and OPTIMIZERS is choices.OPTIMIZERS and OBJECTIVE_KINDS is choices.OBJECTIVE_KINDS
    assert tuple(PRESETS) == choices.PRESET_NAMES  # the settings live with the optimizer; their names here, for --help
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    opts = {name: {a.dest: a for a in p._actions} for name, p in sub.choices.items()}
    assert opts["backprop"]["mode"].choices is MODES and opts["backprop"]["filter"].choices is FILTERS
    assert opts["activations"]["normalize"].choices is choices.NORMALIZATIONS
    assert opts["optimize"]["lr_policy"].choices is LR_POLICIES and opts["optimize"]["objective"].choices is OBJECTIVE_KINDS
