"""``deepvis serve --dataset``: the dataset mined in the background into a (temporary or kept) atlas.

The tiny model (tests/test_server_utils.py) over a folder of 12 small photos and 2 broken files.
"""

from __future__ import annotations

import gc
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from deepvis.atlas import open_atlas
from deepvis.backprop import layer_field
from deepvis.datasets import open_dataset
from deepvis.errors import InputError, ModelError
from deepvis.server import ServerConfig, create_app
from deepvis.server.engine import LiveEngine, replica
from deepvis.server.mining import DatasetMiner
from deepvis.server.protocol import unpack
from deepvis.server.session import RawFrame
from helpers import wait_for
from test_server_utils import TOKEN, receive_until, tiny_model, write_photos

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"))


def make_app(model, **kw):
    return create_app(ServerConfig(model=model, token=TOKEN, allowed_hosts=("testserver",), mining_batch_size=4, **kw))


def _done(toolbox, layer: str) -> bool:
    p = toolbox.miner.layer(layer)
    return p is not None and p.phase == "done"


def test_the_selected_layer_is_mined_in_the_background_and_the_unit_pane_fills_in(model, photos):
    app = make_app(model, dataset=str(photos), synthesis=False)
    toolbox = app.state.toolbox
    root = toolbox.atlas.root
    layer = toolbox.engine.default_settings.layer
    with TestClient(app) as c:
        assert wait_for(lambda: _done(toolbox, layer), 120), toolbox.miner.status()
        rec = c.get(f"/api/atlas/unit?token={TOKEN}&layer={layer}&unit=3").json()
        assert rec["in_atlas"] and len(rec["top"]) == 9 and all(t["crop"] and t["view"] for t in rec["top"])
        assert [t["rank"] for t in rec["top"]] == list(range(9)) and rec["stats"]["max"] is not None
        # the crop is the receptive field of the unit's maximum, as the atlas cuts it
        top = rec["top"][0]
        r = c.get(f"/api/atlas/image?token={TOKEN}&layer={layer}&unit=3&kind=crop&rank=0")
        field = layer_field(model, layer).at(tuple(top["position"]) if top["position"] else None)
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (field.size[1], field.size[0])
        # what was skipped is listed: in the status every page gets and in the log
        status = c.get(f"/api/info?token={TOKEN}").json()["mining"]
        assert status["skipped_count"] == 2 and sorted(s["name"] for s in status["skipped"]) == ["broken.jpg", "truncated.png"]
        assert status["layers"][layer]["images_mined"] == 12
        with c.websocket_connect(f"/ws?token={TOKEN}") as ws:
            hello = json.loads(ws.receive_text())
            assert hello["mining"]["skipped_count"] == 2 and hello["atlas"]["available"]
            assert layer in hello["atlas"]["layers"]
            # selecting another layer mines it on demand; progress comes as `mining` messages
            other = next(i.name for i in toolbox.engine.processor.table if i.name != layer and i.spatial and i.same_as is None)
            ws.send_text(json.dumps({"type": "settings", "layer": other, "unit": 1}))
            msg, seen = receive_until(
                ws, lambda m: isinstance(m, dict) and m.get("type") == "mining" and m["layers"].get(other, {}).get("phase") == "done", 400
            )
            phases = {
                m["layers"][other]["phase"] for m in seen if isinstance(m, dict) and m.get("type") == "mining" and other in m["layers"]
            }
            assert "mining" in phases or "views" in phases
        rec = c.get(f"/api/atlas/unit?token={TOKEN}&layer={other}&unit=1").json()
        assert rec["in_atlas"] and len(rec["top"]) == 9 and rec["top"][0]["view"]
    assert not root.exists()  # the temporary atlas is removed when the server stops


def test_a_kept_atlas_is_resumed_without_mining_again(model, photos, tmp_path):
    kept = tmp_path / "kept"
    app = make_app(model, dataset=str(photos), atlas=kept, synthesis=False)
    layer = app.state.toolbox.engine.default_settings.layer
    with TestClient(app):
        assert wait_for(lambda: _done(app.state.toolbox, layer), 120)
    with open_atlas(kept) as atlas:
        before = atlas.dump()
        assert atlas.layer(layer).mined
    again = make_app(model, dataset=str(photos), atlas=kept, synthesis=False)
    with TestClient(again) as c:
        assert wait_for(lambda: _done(again.state.toolbox, layer), 60)
        p = again.state.toolbox.miner.layer(layer)
        assert (p.images_mined, p.units_viewed) == (0, 0)  # nothing mined or viewed again
        assert c.get(f"/api/atlas/unit?token={TOKEN}&layer={layer}&unit=0").json()["top"][0]["crop"]
    with open_atlas(kept) as atlas:
        assert atlas.dump() == before


def test_a_layer_switch_stops_mining_and_selecting_it_again_continues_from_the_checkpoint(model, photos, tmp_path):
    """Mining is stopped after its current batch when another layer is selected (checkpointed, as a killed
    ``deepvis atlas`` would be); selected again, it continues: every input is mined once in all."""
    gate = threading.Event()
    waiting = threading.Event()
    ds = open_dataset(str(photos))
    load = ds.load

    def gated_load(i, mode="RGB"):
        if i >= 4 and not gate.is_set():  # the first batch goes through; the second waits
            waiting.set()
            gate.wait(30)
        return load(i, mode)

    ds.load = gated_load  # type: ignore[method-assign]
    statuses: list[dict] = []
    miner = DatasetMiner(replica(model), ds, tmp_path / "atlas", lambda m: statuses.append(json.loads(m)), batch_size=4)
    layer = LiveEngine(model).default_settings.layer
    miner.prepare(layer)
    miner.select(layer, 0)
    miner.start()
    try:
        assert waiting.wait(30) and miner.layer(layer).phase == "mining"
        miner.select("conv1", 0)  # while the second batch waits: mining of the first layer stops after it
        gate.set()
        assert wait_for(lambda: miner.layer("conv1").phase == "done", 120)
        # conv1 was mined while the first layer was not: that one had stopped part-way
        when = next(m for m in statuses if m["layers"].get("conv1", {}).get("phase") == "done")["layers"][layer]
        assert when["phase"] != "done" and 0 < when["images_mined"] < 12, when
        # the first layer is still wanted: it continues from its checkpoint (also when selected again)
        miner.select(layer, 0)
        assert wait_for(lambda: miner.layer(layer).phase == "done", 120)
        p = miner.layer(layer)
        assert p.images_mined == 12 and p.units_viewed == p.units  # each input mined once, each unit viewed once
    finally:
        gate.set()
        miner.close()
    with open_atlas(tmp_path / "atlas") as atlas:
        assert atlas.layer(layer).mined and atlas.layer("conv1").mined


def test_the_views_progress_goes_on_counting_when_another_unit_restarts_the_run(model, photos, tmp_path):
    """Selecting another unit while views are made restarts the run (that unit's views come next); the
    progress counts the layer's units viewed so far, so it does not fall back (it showed 13/332 after 124/480)."""
    gate = threading.Event()
    waiting = threading.Event()
    ds = open_dataset(str(photos))
    load = ds.load
    statuses: list[dict] = []
    layer = LiveEngine(model).default_settings.layer

    def gated_load(i, mode="RGB"):
        p = miner.layer(layer)
        if p is not None and p.phase == "views" and p.done > 0 and not gate.is_set():  # some views are written: hold the run
            waiting.set()
            gate.wait(30)
        return load(i, mode)

    ds.load = gated_load  # type: ignore[method-assign]
    miner = DatasetMiner(replica(model), ds, tmp_path / "atlas", lambda m: statuses.append(json.loads(m)), batch_size=4)
    miner.base = replace(miner.base, views_units_per_task=2)  # small view tasks: the run stops soon after the switch
    send = miner._send
    seen: list[dict] = []  # every progress the miner reports, also those its broadcast throttles

    def watched(*args, **kwargs):
        p = miner.layer(layer)
        if p is not None:
            seen.append(p.to_dict())
        return send(*args, **kwargs)

    miner._send = watched  # type: ignore[method-assign]
    miner.prepare(layer)
    miner.select(layer, 0)
    miner.start()
    try:
        assert waiting.wait(60)
        miner.select(layer, 9)  # another unit: the run stops after its current task and starts again from unit 9
        gate.set()
        assert wait_for(lambda: miner.layer(layer).phase == "done", 120)
    finally:
        gate.set()
        miner.close()
    views = [m for m in seen if m["phase"] == "views"]
    units = miner.layer(layer).units
    assert len({m["done"] for m in views}) > 3  # the progress was followed through the runs
    assert {v["total"] for v in views} == {units}
    done = [v["done"] for v in views]
    assert done == sorted(done) and done[-1] <= units, done
    assert miner.layer(layer).units_viewed == units


def test_mining_never_blocks_the_frame_loop(model, photos, tmp_path):
    """Mining held up mid-pass (its images do not load): frames keep flowing meanwhile."""
    release = threading.Event()
    loading = threading.Event()
    ds = open_dataset(str(photos))
    load = ds.load

    def slow_load(i, mode="RGB"):
        loading.set()
        release.wait(30)
        return load(i, mode)

    ds.load = slow_load  # type: ignore[method-assign]
    engine = LiveEngine(model)
    miner = DatasetMiner(replica(model), ds, tmp_path / "atlas", lambda m: None, batch_size=4)
    layer = engine.default_settings.layer
    miner.prepare(layer)
    s = engine.open_session(_Loop())  # type: ignore[arg-type]
    engine.start()
    miner.select(layer, 0)
    miner.start()
    try:
        assert loading.wait(30) and miner.layer(layer).phase == "mining"
        seqs = []
        for seq in range(1, 11):
            engine.submit_frame(s, _raw(seq))
            assert wait_for(lambda: "frame" in s.latest, 30)
            seqs += [unpack(m)[0]["seq"] for m in engine.take(s) if isinstance(m, bytes) and unpack(m)[0]["type"] == "frame"]
        assert seqs[-1] == 10 and len(seqs) >= 9 and miner.layer(layer).phase == "mining"
        release.set()
        assert wait_for(lambda: miner.layer(layer).phase == "done", 120)
    finally:
        release.set()
        miner.close()
        engine.close()


class _Loop:
    def call_soon_threadsafe(self, fn, *args):
        pass


def _raw(seq: int) -> RawFrame:
    px = np.random.default_rng(seq).integers(0, 255, (32, 32, 4), dtype=np.uint8).tobytes()
    return RawFrame(seq, 32, 32, "rgba", memoryview(px), "camera")


def test_a_missing_dataset_is_one_line_and_status_2(model, tmp_path):
    with pytest.raises(InputError, match="dataset not found"):
        make_app(model, dataset=str(tmp_path / "nope"))
    proc = subprocess.run(
        [sys.executable, "-m", "deepvis", "serve", "--port", "0", "--dataset", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"deepvis: error: dataset not found: {tmp_path / 'nope'} (give a folder of images, a .txt list of image paths, or demo)"
    ]


def test_an_atlas_of_another_model_is_refused_with_a_dataset_too(model, photos, tmp_path):
    kept = tmp_path / "kept"
    make_app(model, dataset=str(photos), atlas=kept, synthesis=False)  # creates the atlas (no mining: the app never started)
    other = tiny_model()
    with torch.no_grad():
        other.module.conv1.bias.add_(1.0)
    with pytest.raises(ModelError, match="was made with other weights"):
        make_app(other, dataset=str(photos), atlas=kept)


def test_a_synthesized_image_is_cropped_to_the_units_receptive_field(model):
    app = make_app(model, synthesis_steps=6, synthesis_size=32)
    with TestClient(app) as c, c.websocket_connect(f"/ws?token={TOKEN}") as ws:
        json.loads(ws.receive_text())
        ws.send_text(json.dumps({"type": "synthesize", "layer": "conv2", "unit": 4}))
        msg, _ = receive_until(ws, lambda m: isinstance(m, dict) and m.get("type") == "synthesis" and m["state"] in ("done", "error"))
        assert msg["state"] == "done", msg
        whole = c.get(f"/api/atlas/image?token={TOKEN}&layer=conv2&unit=4&kind=synth")
        cropped = c.get(f"/api/atlas/image?token={TOKEN}&layer=conv2&unit=4&kind=synth&crop=1")
    # conv2's center unit (8, 8) on the 32-px canvas sees a 5x5 field at rows/columns 14..18
    assert Image.open(io.BytesIO(whole.content)).size == (32, 32)
    image = Image.open(io.BytesIO(cropped.content))
    assert image.size == (5, 5)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(whole.content)))[14:19, 14:19])


# -- the temporary atlas (--dataset without --atlas) is removed on every way out -------------------------------
def _temp_atlases(tmp: Path) -> list[str]:
    return sorted(p.name for p in tmp.glob("deepvis-atlas-*"))


@pytest.fixture
def tmp_root(tmp_path, monkeypatch) -> Path:
    """The temporary directory the temporary atlas is made in (and nothing else of this test is)."""
    root = tmp_path / "tmp"
    root.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(root))
    return root


def test_a_temporary_atlas_of_an_app_never_started_goes_with_the_app(model, photos, tmp_root):
    app = make_app(model, dataset=str(photos), synthesis=False, backprop=False)
    root = app.state.toolbox.atlas.root
    assert root.parent == tmp_root and (root / "index.sqlite").exists()  # prepared: the atlas exists
    del app
    gc.collect()
    assert _temp_atlases(tmp_root) == []


def test_a_temporary_atlas_is_removed_when_building_the_app_fails(model, photos, tmp_root, tmp_path):
    """The miner had made its atlas when the report was refused."""
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"activity": {"nope": {"shape": [3]}}}))
    with pytest.raises(ModelError, match="was made for another model"):
        make_app(model, dataset=str(photos), report=report, synthesis=False)
    assert _temp_atlases(tmp_root) == []


def test_a_temporary_atlas_is_removed_when_starting_the_app_fails(model, photos, tmp_root, monkeypatch):
    app = make_app(model, dataset=str(photos), synthesis=False, backprop=False)
    toolbox = app.state.toolbox

    def broken_start() -> None:
        raise RuntimeError("no thread for the miner")

    monkeypatch.setattr(toolbox.miner, "start", broken_start)
    with pytest.raises(RuntimeError, match="no thread for the miner"), TestClient(app):
        pass
    assert _temp_atlases(tmp_root) == [] and not toolbox.engine._frames._thread  # the engine was closed too


def test_a_temporary_atlas_of_an_app_never_started_is_removed_at_exit(tmp_path):
    """A process that builds the app and exits without starting or closing it leaves no atlas behind."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    script = (
        "import sys, tempfile\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        f"tempfile.tempdir = {str(tmp)!r}\n"
        "from test_server_utils import tiny_model\n"
        "from deepvis.server import ServerConfig, create_app\n"
        "app = create_app(ServerConfig(model=tiny_model(), dataset='demo', synthesis=False, backprop=False))\n"
        "print(app.state.toolbox.atlas.root, flush=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert Path(proc.stdout.strip()).parent == tmp and _temp_atlases(tmp) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_temporary_atlas_is_removed_when_the_server_is_interrupted(photos, tmp_path, sig):
    """``deepvis serve --dataset`` stopped by Ctrl-C or a TERM signal while it mines."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    factory = tmp_path / "tinynet.py"
    factory.write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from test_server_utils import tiny_model\n"
        "def build():\n    return tiny_model().module\n"
    )
    cmd = [sys.executable, "-m", "deepvis", "serve", "--port", "0", "--model", f"{factory}:build", "--input-size", "32"]
    proc = subprocess.Popen(
        [*cmd, "--dataset", str(photos), "--no-backprop"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "TMPDIR": str(tmp)},
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("deepvis serve: open "), (line, proc.stderr.read() if proc.poll() is not None else "")
        url = line.split("open ", 1)[1].strip()
        base, token = url.split("/?token=")
        mining = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not mining.get("layers"):  # serving, and the miner has begun
            try:
                mining = httpx.get(f"{base}/api/info?token={token}", timeout=5).json()["mining"]
            except httpx.TransportError:
                time.sleep(0.05)
        assert mining.get("layers") and len(_temp_atlases(tmp)) == 1
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode in ((130, 0) if sig == signal.SIGINT else (-signal.SIGTERM, 0)), err
    assert _temp_atlases(tmp) == [], err


def test_serve_autocast_reaches_the_dataset_miner_and_is_recorded_in_its_atlas(model, photos, tmp_path):
    """``deepvis serve --autocast bf16 --dataset``: the miner's forward passes run under autocast (the
    atlas records it, so a resumed build cannot mix settings), the live frames' too."""
    app = make_app(model, dataset=str(photos), atlas=str(tmp_path / "atlas"), autocast="bf16")
    toolbox = app.state.toolbox
    assert toolbox.engine.processor.autocast == "bf16"
    assert toolbox.miner is not None and toolbox.miner.base.autocast == "bf16"
    with open_atlas(tmp_path / "atlas") as atlas:
        assert atlas.meta["autocast"] == "bf16"
    toolbox.close()
