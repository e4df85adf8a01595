"""The summary pane of layers mined in the background (``deepvis serve --dataset``): the mined statistics,
equal to what :mod:`deepvis.stats` computes over the same images, as the pass goes on and when it is done.

The tiny model (tests/test_server_utils.py) over a folder of 12 small photos and 2 broken files.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient

from deepvis.analysis.activity import layer_activity
from deepvis.capture import capture, get_layer
from deepvis.datasets import iter_batches, open_dataset
from deepvis.server import ServerConfig, create_app
from deepvis.server.engine import LiveEngine, default_layer, replica
from deepvis.server.mining import DatasetMiner
from deepvis.server.protocol import unpack
from deepvis.server.session import RawFrame
from deepvis.server.summary import StoredSummaries, summary_fields
from deepvis.stats import LayerStats, mine
from helpers import wait_for
from test_server_utils import TOKEN, receive_until, tiny_model, write_photos

pytestmark = pytest.mark.timeout(180)

#: the numbers of a summary message (what the page shows), compared exactly
NUMBERS = ("images", "units", "sparsity", "dead", "dead_units", "most_active_by_mean", "most_active_by_max")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    return write_photos(tmp_path_factory.mktemp("photos"))


def direct(model, photos: Path, layer: str, batches: list[int], batch_size: int = 4) -> dict:
    """The summary numbers of ``layer`` over the given batches of the dataset, computed directly by deepvis.stats."""
    info = get_layer(model, layer)
    state = LayerStats(layer, info.units, 9, (info.shape[1], info.shape[2]) if info.spatial else None)
    for _step in mine(model, open_dataset(str(photos)), {layer: state}, batches, batch_size):
        pass
    return summary_fields(layer_activity(state, info.shape), layer=layer, source="direct", origin="")


def numbers(fields: dict) -> dict:
    return {k: fields[k] for k in NUMBERS}


def test_a_mined_layers_summary_is_its_dataset_statistics_and_other_layers_stay_live(model, photos):
    app = create_app(
        ServerConfig(
            model=model,
            token=TOKEN,
            allowed_hosts=("testserver",),
            dataset=str(photos),
            mining_batch_size=4,
            synthesis=False,
            backprop=False,
        )
    )
    toolbox = app.state.toolbox
    layer = toolbox.engine.default_settings.layer
    with TestClient(app) as c, c.websocket_connect(f"/ws?token={TOKEN}") as ws:
        json.loads(ws.receive_text())  # hello
        assert wait_for(lambda: (p := toolbox.miner.layer(layer)) is not None and p.phase == "done", 120), toolbox.miner.status()
        ws.send_text(json.dumps({"type": "summary"}))
        m, _ = receive_until(ws, lambda m: isinstance(m, dict) and m.get("type") == "summary", 200)
        want = direct(model, photos, layer, list(range(4)))
        assert m["layer"] == layer and m["source"] == "dataset"
        assert m["origin"] == f"from 12 dataset images ({photos}; 2 unreadable)"
        assert numbers(m) == numbers(want) and m["images"] == 12
        # the same numbers by hand: the fraction of the layer's activations <= 0 over the 12 readable photos
        acts = torch.cat(
            [capture(model, b.x, [layer])[layer] for b in iter_batches(open_dataset(str(photos)), model, 4, workers=1) if b.indices]
        )
        assert acts.shape[0] == 12 and m["sparsity"] == pytest.approx(float((acts <= 0).double().mean()), abs=1e-6)  # json_float: 6 digits
        assert m["dead"] == int(((acts > 0).flatten(2).any(2).any(0) == 0).sum())
        assert m["most_active_by_mean"][0]["unit"] == int(acts.double().mean((0, 2, 3)).argmax())
        # a layer nobody selected was not mined: its summary is the page's live statistics
        session = toolbox.engine.sessions()[0]
        assert toolbox.miner.layer("relu1") is None
        live = json.loads(toolbox.engine.summary_message(session, "relu1"))
        assert live["source"] == "live" and live["images"] == 0


def test_the_summary_follows_the_mining_pass_as_it_goes(model, photos, tmp_path):
    """Mining held after its first batch: the summary is that batch's statistics ("so far"), and the live
    statistics of that layer are not counted meanwhile; released, it becomes the whole dataset's."""
    gate, waiting = threading.Event(), threading.Event()
    ds = open_dataset(str(photos))
    load = ds.load

    def gated_load(i, mode="RGB"):
        if i >= 4 and not gate.is_set():
            waiting.set()
            gate.wait(60)
        return load(i, mode)

    ds.load = gated_load  # type: ignore[method-assign]
    engine = LiveEngine(model, tune_memory_format=False)
    layer = default_layer(engine.processor.table)
    miner = DatasetMiner(replica(model), ds, tmp_path / "atlas", lambda m: None, batch_size=4)
    miner.prepare(layer)
    summaries = StoredSummaries(model, engine.processor.table, miner=miner)
    engine.summaries = summaries
    assert summaries.get(layer) is None  # nothing mined yet: the live statistics
    miner.select(layer, 0)
    miner.start()
    try:
        assert wait_for(lambda: miner.mined_stats(layer) is not None, 60)
        first = summaries.get(layer)
        assert first is not None and first["source"] == "dataset"
        assert first["origin"] == f"from 3 dataset images so far ({photos}, 14 in all: mining)"  # batch 0 holds broken.jpg
        assert numbers(first) == numbers(direct(model, photos, layer, [0]))
        assert summaries.get(layer) is first  # derived once per mined batch
        # frames shown meanwhile are not counted in this layer's live statistics (the mined numbers are shown)
        s = engine.open_session(_Loop())  # type: ignore[arg-type]
        engine.start()
        engine.submit_frame(s, _raw(1))
        assert wait_for(lambda: "frame" in s.latest, 30)
        assert [unpack(m)[0]["type"] for m in engine.take(s) if isinstance(m, bytes)] == ["frame"]
        assert s.summary.activity(layer) is None
        gate.set()
        assert wait_for(lambda: (p := miner.layer(layer)) is not None and p.phase == "done", 120)
        final = summaries.get(layer)
        assert final is not None and final["origin"] == f"from 12 dataset images ({photos}; 2 unreadable)"
        assert numbers(final) == numbers(direct(model, photos, layer, list(range(4))))
    finally:
        gate.set()
        miner.close()
        engine.close()
    # a later server on the same atlas reads the finished layer from it: the same numbers, still the dataset's
    again = DatasetMiner(replica(model), open_dataset(str(photos)), tmp_path / "atlas", lambda m: None, batch_size=4)
    stored = StoredSummaries(model, engine.processor.table, miner=again).get(layer)
    assert stored is not None and stored["source"] == "dataset" and numbers(stored) == numbers(final)


def test_a_report_wins_over_the_mined_statistics(model, photos, tmp_path):
    """A layer the report covers shows the report's numbers (with its locality), mined or not."""
    ds = open_dataset(str(photos))
    engine = LiveEngine(model, tune_memory_format=False)
    layer = default_layer(engine.processor.table)
    info = get_layer(model, layer)
    report = tmp_path / "report.json"
    state = LayerStats(layer, info.units, 4, (info.shape[1], info.shape[2]))
    for _step in mine(model, ds, {layer: state}, [1], 4):
        pass
    act = layer_activity(state, info.shape)
    locality = {layer: {"locality": [0.25] * info.units}}
    report.write_text(json.dumps({"activity": {layer: act.to_dict()}, "locality": locality, "dataset": "elsewhere"}))
    miner = DatasetMiner(replica(model), ds, tmp_path / "atlas", lambda m: None, batch_size=4)
    miner.prepare(layer)
    miner.select(layer, 0)
    miner.start()
    try:
        assert wait_for(lambda: (p := miner.layer(layer)) is not None and p.phase in ("views", "done"), 120)
    finally:
        miner.close()
    got = StoredSummaries(model, engine.processor.table, report=report, miner=miner).get(layer)
    assert got is not None and got["source"] == "report" and got["images"] == 4 and got["locality"] == {"median": 0.25}


class _Loop:
    def call_soon_threadsafe(self, fn, *args):
        pass


def _raw(seq: int) -> RawFrame:
    px = np.random.default_rng(seq).integers(0, 255, (32, 32, 4), dtype=np.uint8).tobytes()
    return RawFrame(seq, 32, 32, "rgba", memoryview(px), "camera")
