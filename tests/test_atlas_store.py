"""The atlas store and build: parameters, locking, reading API, bad files, kill -9 and resume, atlas-show."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepvis.atlas import AtlasError, AtlasOptions, AtlasWriter, SynthesisOptions, build_atlas, open_atlas
from deepvis.cli import main
from deepvis.errors import DeepvisError
from deepvis.models import load_model
from helpers import assert_unchanged, snapshot

# A tiny model for subprocess runs: a conv with fixed weights, ReLU, max-pool, a second conv.
MODEL_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from deepvis.models import Model, Preprocessing

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.conv = nn.Conv2d(3, 6, 3, padding=1)
            self.act = nn.ReLU()
            self.pool = nn.MaxPool2d(2)
            self.conv2 = nn.Conv2d(6, 4, 3, padding=1)
            self.act2 = nn.ReLU()
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)

        def forward(self, x):
            return self.act2(self.conv2(self.pool(self.act(self.conv(x)))))

    def tiny():
        pre = Preprocessing((24, 24), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear", crop_pct=1.0)
        return Model(Tiny(), pre, name="tiny")
    """
)


@pytest.fixture(scope="module")
def tiny_spec(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("model") / "tiny_model.py"
    path.write_text(MODEL_SOURCE)
    return f"{path}:tiny"


def make_dataset(root: Path, n: int = 26, bad: tuple[int, ...] = ()) -> Path:
    """n small random-pattern images in two class folders; the indices in ``bad`` are corrupt files."""
    rng = np.random.default_rng(1)
    for i in range(n):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"img{i:03d}.png"
        if i in bad:
            path.write_bytes(b"\x89PNG\r\n\x1a\n broken")
        else:
            arr = (rng.random((20 + i % 5, 28, 3)) * 255).astype(np.uint8)
            arr[:, i % 20 : i % 20 + 4] = 255  # a bright bar at a different place in each image
            Image.fromarray(arr).save(path)
    return root


def files_of(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.name.startswith(("index.sqlite", ".lock"))
    }


def opts(**kw) -> AtlasOptions:
    base = dict(
        layers=("conv", "conv2"),
        top=4,
        batch_size=4,
        units="0-2",
        synthesis=SynthesisOptions(steps=3, size=24, units_per_batch=2),
        checkpoint_seconds=0.0,
    )
    base.update(kw)
    return AtlasOptions(**base)


def test_build_read_and_resume_is_a_no_op(tmp_path, tiny_spec):
    data = make_dataset(tmp_path / "data")
    model = load_model(tiny_spec, device="cpu")
    model.module.train()  # deepvis must restore the user's flags
    before_model = snapshot(model.module)
    s = build_atlas(tmp_path / "atlas", model, str(data), opts())
    assert_unchanged(model.module, before_model)
    assert s.images_mined == 26 and s.units_viewed == 6 and s.units_synthesized == 6 and s.skipped == []
    before = files_of(tmp_path / "atlas")
    again = build_atlas(tmp_path / "atlas", model, str(data), opts())
    assert again.images_mined == 0 and again.units_viewed == 0 and again.units_synthesized == 0
    assert files_of(tmp_path / "atlas") == before
    with open_atlas(tmp_path / "atlas") as atlas:
        assert atlas.integrity_check() == "ok"
        assert [r.name for r in atlas.layers()] == ["conv", "conv2"] and all(r.mined for r in atlas.layers())
        assert atlas.units("conv2") == [0, 1, 2, 3]  # every unit is mined; views only for 0-2
        rec = atlas.unit("conv2", 1)
        assert len(rec.top) == 4 and all(t.crop is not None for t in rec.top) and rec.synth is not None
        assert [t.value for t in rec.top] == sorted((t.value for t in rec.top), reverse=True)
        assert all(t.crop.is_file() and t.view.is_file() for t in rec.top)
        assert rec.synth.image.is_file() and rec.synth.info["settings"]["steps"] == 3
        assert rec.stats.images == 26 and rec.stats.max == rec.top[0].value
        assert {t.label for t in rec.top} <= {"a", "b"}
        unviewed = atlas.unit("conv2", 3)
        assert all(t.crop is None for t in unviewed.top) and unviewed.synth is None and len(unviewed.top) == 4
        assert len(atlas.stats("conv")) == 6 and atlas.meta["samples"] == 26
        with pytest.raises(AtlasError, match="not in atlas"):
            atlas.unit("nope", 0)
        with pytest.raises(AtlasError, match="out of range"):
            atlas.unit("conv", 6)


def test_other_parameters_are_refused_and_layers_can_be_added(tmp_path, tiny_spec):
    data = make_dataset(tmp_path / "data", n=8)
    model = load_model(tiny_spec, device="cpu")
    out = tmp_path / "atlas"
    build_atlas(out, model, str(data), opts(layers=("conv",), views=False, synthesis=None))
    with open_atlas(out) as atlas:
        index_before = atlas.dump()
    with pytest.raises(AtlasError, match="top 4"):
        build_atlas(out, model, str(data), opts(layers=("conv",), top=5, views=False, synthesis=None))
    with pytest.raises(AtlasError, match="batch_size"):
        build_atlas(out, model, str(data), opts(layers=("conv",), batch_size=2, views=False, synthesis=None))
    other = load_model(tiny_spec, device="cpu")
    with __import__("torch").no_grad():
        other.module.conv.bias.add_(1.0)
    # the mismatch is said in the user's words (model and dataset as given), not as hashes
    with pytest.raises(
        AtlasError, match=r"was made with other weights \(model '.*tiny', weights the module's own: the same name, other parameter values\)"
    ) as exc:
        build_atlas(out, other, str(data), opts(layers=("conv",), views=False, synthesis=None))
    assert "hash" not in str(exc.value)
    (data / "a" / "extra.png").write_bytes((data / "a" / "img001.png").read_bytes())
    with pytest.raises(AtlasError, match=r"was made on other images: the dataset '.*data' has changed since") as exc:
        build_atlas(out, model, str(data), opts(layers=("conv",), views=False, synthesis=None))
    assert "hash" not in str(exc.value)
    (data / "a" / "extra.png").unlink()
    copy = tmp_path / "data_copy"
    __import__("shutil").copytree(data, copy)
    (copy / "a" / "img001.png").unlink()
    with pytest.raises(AtlasError, match=r"was made on other images \(dataset '.*data'; this run: '.*data_copy'\)"):
        build_atlas(out, model, str(copy), opts(layers=("conv",), views=False, synthesis=None))
    with open_atlas(out) as atlas:
        assert atlas.dump() == index_before
    # synthesis parameters are recorded once and then checked too
    build_atlas(out, model, str(data), opts(layers=("conv",), views=False, synthesis=SynthesisOptions(steps=2, size=24)))
    with pytest.raises(AtlasError, match="steps 2"):
        build_atlas(out, model, str(data), opts(layers=("conv",), views=False, synthesis=SynthesisOptions(steps=3, size=24)))
    # adding a layer is fine and mines only the new one
    s = build_atlas(out, model, str(data), opts(layers=("conv", "conv2"), views=False, synthesis=None))
    assert s.images_mined == 8
    with open_atlas(out) as atlas:
        assert [r.name for r in atlas.layers()] == ["conv", "conv2"]


def test_writer_lock_foreign_folder_and_stale_temp_files(tmp_path):
    meta = {"model_hash": "m", "dataset_hash": "d", "input_size": [1, 1]}
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(AtlasError, match="not an atlas"):
        AtlasWriter(tmp_path / "foreign", meta)
    with AtlasWriter(tmp_path / "a", meta), pytest.raises(AtlasError, match="another process"):
        AtlasWriter(tmp_path / "a", meta)
    stale = tmp_path / "a" / "conv" / "0001" / ".top00_crop.png.abc123.tmp.png"
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"partial")
    keep = tmp_path / "a" / "conv" / "0001" / "top00_crop.png"
    keep.write_bytes(b"x")
    with AtlasWriter(tmp_path / "a", meta):
        pass
    assert not stale.exists() and keep.exists()
    with pytest.raises(AtlasError, match="was made with other weights; use the same model"):
        AtlasWriter(tmp_path / "a", {**meta, "model_hash": "other"})
    named = {**meta, "model": "lite0", "weights": "pretrained"}
    with AtlasWriter(tmp_path / "b", named):
        pass
    with pytest.raises(
        AtlasError, match=r"other weights \(model 'lite0', weights pretrained; this run: model 'lite1', weights pretrained\)"
    ):
        AtlasWriter(tmp_path / "b", {**named, "model": "lite1", "model_hash": "other"})
    with pytest.raises(AtlasError, match="not an atlas"):
        open_atlas(tmp_path / "foreign")


def test_cli_skips_and_lists_bad_files(tmp_path, tiny_spec, capsys):
    data = make_dataset(tmp_path / "data", n=10, bad=(3, 7))
    rc = main(
        [
            "atlas",
            str(data),
            "--model",
            tiny_spec,
            "--layers",
            "conv2",
            "-o",
            str(tmp_path / "atlas"),
            "--top",
            "3",
            "--batch-size",
            "4",
            "--no-synthesis",
            "--units",
            "0",
            "--json",
        ]
    )
    out = capsys.readouterr()
    assert rc == 0
    assert "skipped 2 unreadable input(s)" in out.err and "a/img003.png" in out.err and "a/img007.png" in out.err
    import json

    report = json.loads(out.out)
    assert [s["key"] for s in report["skipped"]] == ["a/img003.png", "a/img007.png"] and report["images_mined"] == 8
    with open_atlas(tmp_path / "atlas") as atlas:
        assert [k for _, k, _ in atlas.skipped()] == ["a/img003.png", "a/img007.png"]
        assert atlas.unit("conv2", 0).stats.images == 8
        assert all(t.key not in ("a/img003.png", "a/img007.png") for t in atlas.unit("conv2", 0).top)
    # atlas-show: the unit's pane, and the listing
    rc = main(["atlas-show", str(tmp_path / "atlas"), "--unit", "conv2:0", "-o", str(tmp_path / "pane.png")])
    assert rc == 0
    pane = Image.open(tmp_path / "pane.png")
    assert pane.width > 3 * 2 * 96 and pane.height > 2 * 96
    assert main(["atlas-show", str(tmp_path / "atlas")]) == 0
    assert "conv2" in capsys.readouterr().out
    # bad input: one-line errors, exit 2, no output left behind
    assert main(["atlas-show", str(tmp_path / "atlas"), "--unit", "conv2:9", "-o", str(tmp_path / "x.png")]) == 2
    assert main(["atlas-show", str(tmp_path / "nowhere"), "--unit", "conv2:0", "-o", str(tmp_path / "x.png")]) == 2
    assert main(["atlas", str(data), "--model", tiny_spec, "--layers", "nope", "-o", str(tmp_path / "a2"), "--no-synthesis"]) == 2
    assert main(["atlas", str(data), "--model", tiny_spec, "--layers", "conv", "-o", str(tmp_path / "a3"), "--preset", "9"]) == 2
    err = capsys.readouterr().err
    assert "no layer named 'nope'" in err and "unknown preset" in err and "Traceback" not in err
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "a3").exists() and not (tmp_path / "a2").exists()


# -- kill -9 and resume ---------------------------------------------------------------------------------

DRIVER = textwrap.dedent(
    """
    import contextlib, os, signal, sys
    from deepvis.atlas import store

    mode, n = os.environ["KILL_AT"].split(":")
    n = int(n)
    count = [0]

    def boom():
        os.kill(os.getpid(), signal.SIGKILL)

    def tick():
        count[0] += 1
        if count[0] == n:
            boom()

    if mode == "checkpoint":  # right after the n-th mining checkpoint is committed
        orig_save = store.AtlasWriter.save_progress
        def save_progress(self, *a, **k):
            orig_save(self, *a, **k)
            tick()
        store.AtlasWriter.save_progress = save_progress
    elif mode == "uncommitted":  # inside the n-th transaction, before its COMMIT
        orig_exit = store._Transaction.__exit__
        def __exit__(self, exc_type, *rest):
            if exc_type is None:
                tick()
            return orig_exit(self, exc_type, *rest)
        store._Transaction.__exit__ = __exit__
    elif mode == "file":  # the n-th PNG is written under its temporary name, not yet renamed
        orig_atomic = store.atomic_path
        @contextlib.contextmanager
        def atomic_path(target):
            with orig_atomic(target) as tmp:
                yield tmp
                tick()
        store.atomic_path = atomic_path
    elif mode in ("views", "synth"):  # all files of the n-th unit written, its rows not yet committed
        name = "write_views" if mode == "views" else "write_synth"
        orig_tx = store.AtlasWriter._tx
        def _tx(self):
            if sys._getframe(1).f_code.co_name == name:
                tick()
            return orig_tx(self)
        store.AtlasWriter._tx = _tx

    from deepvis.cli import main
    sys.exit(main(sys.argv[1:]))
    """
)


def test_kill_9_at_several_points_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_spec):
    data = make_dataset(tmp_path / "data", n=26, bad=(5,))
    args = [
        "atlas",
        str(data),
        "--model",
        tiny_spec,
        "--layers",
        "conv,conv2",
        "--top",
        "4",
        "--batch-size",
        "4",
        "--units",
        "0-2",
        "--steps",
        "3",
        "--size",
        "24",
        "--synth-batch",
        "2",
        "--checkpoint-seconds",
        "0",
        "--decode-threads",
        "2",
    ]
    ref = tmp_path / "ref"
    assert main([*args, "-o", str(ref)]) == 0

    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    out = tmp_path / "killed"
    env = {**os.environ, "DEEPVIS_PROGRESS": "0", "DEEPVIS_NO_ALLOCATOR_TUNING": "1"}
    # each run is killed at a different place; each restart continues the previous ones' work. With
    # this dataset the kills land: after mining checkpoint 2; inside checkpoint 4's transaction; after
    # mining, halfway through writing a view PNG; after a unit's view files, before their rows; after a
    # unit's synthesized files, before its row; halfway through writing a synthesized PNG.
    kills = ["checkpoint:2", "uncommitted:3", "file:5", "views:2", "synth:2", "file:2"]
    for kill in kills:
        proc = subprocess.run(
            [sys.executable, str(driver), *args, "-o", str(out)], env={**env, "KILL_AT": kill}, capture_output=True, text=True, timeout=120
        )
        assert proc.returncode == -signal.SIGKILL, (kill, proc.returncode, proc.stderr[-2000:])
        con = sqlite3.connect(out / "index.sqlite")  # the index is sound after every kill
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        con.close()
    assert any(p.name.endswith(".tmp.png") for p in out.rglob(".*")), "a kill mid-file should leave a temp file"
    proc = subprocess.run(
        [sys.executable, str(driver), *args, "-o", str(out)], env={**env, "KILL_AT": "none:0"}, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr[-2000:]

    assert files_of(out) == files_of(ref)
    assert not [p for p in out.rglob(".*") if p.name != ".lock"]
    with open_atlas(ref) as a, open_atlas(out) as b:
        assert b.integrity_check() == "ok"
        assert a.dump() == b.dump()
        assert [k for _, k, _ in b.skipped()] == ["a/img005.png"]
        assert sum(1 for layer in ("conv", "conv2") for u in b.units(layer) if b.unit(layer, u).synth) == 6


def test_engine_name_is_checked(tmp_path, tiny_spec):
    data = make_dataset(tmp_path / "data", n=4)
    with pytest.raises(DeepvisError, match="unknown engine"):
        build_atlas(tmp_path / "x", load_model(tiny_spec, device="cpu"), str(data), opts(views=False, synthesis=None), engine="spark")
