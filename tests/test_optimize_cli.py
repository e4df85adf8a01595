"""``deepvis optimize``: the files it writes, its JSON, and one-line errors that leave nothing behind."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from deepvis.cli import main
from deepvis.cli.optimize import unit_slug


def run(args, capsys):
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_optimize_writes_raw_display_record_and_montage(tmp_path, capsys):
    out = tmp_path / "opt"
    args = [
        "optimize",
        "--layer",
        "blocks.3",
        "--units",
        "0-1",
        "--class",
        "espresso",
        "--class",
        "967",
        "--preset",
        "1",
        "--steps",
        "3",
        "--size",
        "48",
        "--decay",
        "0.01",
        "--seed",
        "3",
        "-o",
        out,
        "--json",
    ]
    code, stdout, err = run(args, capsys)
    assert code == 0, err
    summary = json.loads(stdout)
    assert [u["unit"] for u in summary["units"]] == ["blocks.3:0", "blocks.3:1", "logits:967"]  # the class given twice once
    assert summary["settings"]["decay"] == 0.01 and summary["settings"]["blur_width"] == 0.5 and summary["settings"]["name"] == "1+custom"
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["montage.png"] + [f"{s}{ext}" for s in ("blocks.3-0", "blocks.3-1", "logits-967") for ext in ("_raw.png", ".png", ".json")]
    )
    rec = json.loads((out / "logits-967.json").read_text())
    assert rec["label"] == "espresso" and rec["model"] == "default" and rec["seed"] == 3 and len(rec["trace"]) == 3
    assert rec["value"] == max(rec["trace"]) and rec["settings"]["steps"] == 3 and rec["dead"] is False
    assert rec["files"] == {"raw": "logits-967_raw.png", "display": "logits-967.png", "record": "logits-967.json"}
    raw = np.asarray(Image.open(out / "blocks.3-0_raw.png"), dtype=np.float32)
    disp = np.asarray(Image.open(out / "blocks.3-0.png"), dtype=np.float32)
    assert raw.shape == disp.shape == (48, 48, 3)
    assert np.abs(disp - 128).max() > 3 * np.abs(raw - 127.5).max() or np.abs(disp - 128).max() >= 120  # stretched
    assert Image.open(out / "montage.png").width > 2 * 48


def test_optimize_text_output_and_options(tmp_path, capsys):
    code, stdout, err = run(
        [
            "optimize",
            "--layer",
            "blocks.2",
            "--units",
            "4",
            "--at",
            "1,1",
            "--steps",
            "2",
            "--size",
            "32",
            "--preset",
            "robust",
            "--no-fourier",
            "--scale",
            "0.95,1.05",
            "-o",
            tmp_path / "o",
        ],
        capsys,
    )
    assert code == 0, err
    assert stdout.startswith("blocks.2:4@1,1: ")
    assert (tmp_path / "o" / "blocks.2-4-y1x1.png").exists()
    rec = json.loads((tmp_path / "o" / "blocks.2-4-y1x1.json").read_text())
    assert rec["settings"]["fourier"] is False and rec["settings"]["scale"] == [0.95, 1.05] and rec["settings"]["decorrelate"] is True


def test_a_second_run_into_the_same_folder_says_what_else_is_there(tmp_path, capsys):
    from deepvis.scores import result_records

    base = ["optimize", "--layer", "blocks.2", "--steps", "1", "--size", "32", "-o", tmp_path / "o"]
    code, _, err = run([*base, "--units", "0,1"], capsys)
    assert code == 0 and "earlier run" not in err
    (tmp_path / "o" / "notes.json").write_text('{"mine": 1}')  # a JSON file that is not a record
    (tmp_path / "o" / "broken.json").write_text("{")
    assert result_records(tmp_path / "o") == ["blocks.2-0.json", "blocks.2-1.json"]
    code, _, err = run([*base, "--units", "1,2"], capsys)  # unit 1 is rewritten, unit 0 stays from the first run
    assert code == 0
    assert f"note: {tmp_path / 'o'} also holds 1 result(s) of an earlier run (blocks.2-0.json), not in this montage" in err
    assert result_records(tmp_path / "o") == ["blocks.2-0.json", "blocks.2-1.json", "blocks.2-2.json"]
    assert result_records(tmp_path / "missing") == []


@pytest.mark.parametrize(
    "args,message",
    [
        (["--layer", "blocks.99", "--units", "0"], "no layer named"),
        (["--layer", "blocks.3", "--units", "80"], "out of range"),
        (["--layer", "blocks.3", "--units", "0", "--at", "9,9"], "outside"),
        (["--layer", "blocks.3"], "needs --units"),
        (["--units", "3"], "need --layer"),
        (["--class", "no such class"], "no class named"),
        ([], "nothing to optimize"),
        (["--class", "1", "--preset", "9"], "unknown preset"),
        (["--class", "1", "--decay", "2"], "decay must be"),
        (["--class", "1", "--steps", "0"], "steps must be"),
        (["--class", "1", "--batch-size", "0"], "batch-size"),
    ],
)
def test_optimize_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    code, stdout, err = run(
        ["optimize", *args, "--size", "32", "--steps", "2", "-o", out]
        if "--steps" not in args
        else ["optimize", *args, "--size", "32", "-o", out],
        capsys,
    )
    assert code == 2
    assert err.startswith("deepvis: error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_output_that_is_a_file_is_refused(tmp_path, capsys):
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    code, _, err = run(["optimize", "--class", "1", "--steps", "1", "-o", f], capsys)
    assert code == 2 and "not a folder" in err and f.read_bytes() == b"x"


def test_unit_slugs():
    assert unit_slug("blocks.3:7") == "blocks.3-7"
    assert unit_slug("blocks.3:7@2,3") == "blocks.3-7-y2x3"
    assert unit_slug("logits:281") == "logits-281"
