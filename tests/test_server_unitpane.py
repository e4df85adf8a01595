"""The live page's unit pane: quality figures beside synthesized images, feature accentuation of the
shown frame, and whole dataset inputs with their receptive field's box (issues 14 and 11).

The tiny model (tests/test_server_utils.py) over a folder of 12 small photos, mined in the background
(``--dataset``); the judge is the tiny model itself, loaded from its factory (flagged as the optimized
model), so every figure can be recomputed here with :mod:`deepvis.scores`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from deepvis.atlas import open_atlas
from deepvis.backprop import crop_image, layer_field
from deepvis.capture import LOGITS, Unit
from deepvis.datasets import open_dataset
from deepvis.optimize import contrast, contrast_text
from deepvis.scores import beats_top_k, load_judges, objective_value, plausibility, transfer, unit_value
from deepvis.server import ServerConfig, create_app
from deepvis.server.atlas_view import BOX_COLOR, WHOLE_NOT_STORED, AtlasView
from deepvis.server.synthesis import quality_figures
from helpers import wait_for
from test_server_utils import TOKEN, frame_message, is_frame, receive_until, tiny_model

pytestmark = pytest.mark.timeout(240)

JUDGE = f"{Path(__file__).parent / 'test_server_utils.py'}:tiny_model"
LAYER = "conv2"


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """12 random photos (48x40)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"photo{i:02d}.png")
    return root


def make_app(model, **kw):
    kw.setdefault("judges", (JUDGE,))
    return create_app(ServerConfig(model=model, token=TOKEN, allowed_hosts=("testserver",), mining_batch_size=4, **kw))


def _mined(toolbox, layer: str) -> bool:
    p = toolbox.miner.layer(layer)
    return p is not None and p.phase == "done"


def _select(ws, layer: str, unit: int) -> None:
    ws.send_text(json.dumps({"type": "settings", "layer": layer, "unit": unit}))


def _job_done(job: str):
    return lambda m: (
        isinstance(m, dict) and m.get("type") == "synthesis" and m.get("job") == job and m["state"] in ("done", "error", "cancelled")
    )


@pytest.fixture(scope="module")
def mined_atlas(model, photos, tmp_path_factory):
    """A kept atlas of conv2 mined from the photos (crops and views of every unit)."""
    root = tmp_path_factory.mktemp("kept") / "atlas"
    app = make_app(model, dataset=str(photos), atlas=root, synthesis=False)
    with TestClient(app) as c, c.websocket_connect(f"/ws?token={TOKEN}") as ws:
        json.loads(ws.receive_text())
        _select(ws, LAYER, 3)
        toolbox = app.state.toolbox
        assert wait_for(lambda: _mined(toolbox, LAYER), 120)
    return root


def test_quality_figures_equal_the_scores_of_the_library(model, photos, mined_atlas):
    view = AtlasView(mined_atlas, model)
    judges = load_judges([JUDGE])
    calls = []

    def get_judges():
        calls.append(1)
        return judges

    with open_atlas(mined_atlas) as atlas:
        rec = atlas.unit(LAYER, 3)
    top1 = Image.open(rec.top[0].crop).convert("RGB").resize((32, 32))
    figures = quality_figures(model, top1, Unit(LAYER, 3), get_judges, view)
    values = [t.value for t in rec.top]
    assert figures["beats_top_k"] == beats_top_k(unit_value(model, top1, Unit(LAYER, 3)), values)
    assert figures["beats_top_k"]["k"] == 9
    refs = [Image.open(t.crop).convert("RGB") for t in rec.top]
    expected = plausibility(judges[0], top1, refs, same_model=True)
    assert figures["plausibility"] == [expected] and expected["n"] == 9
    assert figures["transfer"] == [] and "transfer" not in figures["no_score"]  # not a class unit
    assert any("is the optimized model" in f for f in figures["flags"])
    b = figures["beats_top_k"]
    assert figures["line"].startswith(f"beats-top-9: {b['ratio']:.2g}x ({b['beats']}/9) · plausibility {expected['mean']:.2f} (")
    assert calls  # the judges were needed (the atlas has crops)

    # a class unit: transfer to the judge, the rank and probability of the class under it
    image = Image.fromarray(np.random.default_rng(3).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    cls = quality_figures(model, image, Unit(LOGITS, 4), get_judges, None)
    assert cls["transfer"] == [transfer(judges[0], image, 4, "class 4", same_model=True)]
    with torch.no_grad():
        logits = model.module(model.preprocess([image], crop=False))[0]
    assert cls["transfer"][0]["rank"] == int((logits > logits[4]).sum()) + 1
    assert cls["transfer"][0]["probability"] == pytest.approx(float(logits.softmax(0)[4]), rel=1e-5)
    assert cls["no_score"] == {
        "beats-top-k": "no atlas: start with --atlas or --dataset",
        "plausibility": "no atlas: start with --atlas or --dataset",
    }
    assert "beats-top-k: no score (no atlas: start with --atlas or --dataset)" in cls["line"]
    # every image gets the contrast figure, read against the served model's mean image
    assert cls["contrast"] == contrast(image, model.preprocessing.mean_pixel().tolist()) and not cls["contrast"]["faint"]
    assert f"contrast {contrast_text(cls['contrast'])}" in cls["line"]
    mean = tuple(int(round(v)) for v in model.preprocessing.mean_pixel().tolist())
    grey = quality_figures(model, Image.new("RGB", (32, 32), mean), Unit(LOGITS, 4), get_judges, None)
    assert grey["contrast"]["faint"] and "(it looks flat grey)" in " ".join(grey["flags"])


def test_no_judge_is_loaded_when_no_figure_needs_one(model):
    def no_judges():
        raise AssertionError("judges loaded for nothing")

    image = Image.new("RGB", (32, 32), (90, 120, 30))
    figures = quality_figures(model, image, Unit(LAYER, 1), no_judges, None)
    assert figures["no_score"]["beats-top-k"].startswith("no atlas")
    assert figures["plausibility"] == [] and figures["transfer"] == []


def test_live_synthesis_and_accentuation_carry_their_figures(model, photos, mined_atlas):
    app = make_app(model, atlas=mined_atlas, synthesis_steps=8, synthesis_size=32)
    with TestClient(app) as c, c.websocket_connect(f"/ws?token={TOKEN}") as ws:
        json.loads(ws.receive_text())
        # synthesis of a class unit: transfer to the judge, no atlas figures for logits (not mined)
        ws.send_text(json.dumps({"type": "synthesize", "layer": LOGITS, "unit": 2}))
        msg, _ = receive_until(ws, _job_done("synthesize"), limit=200)
        assert msg["state"] == "done", msg
        t = msg["scores"]["transfer"]
        assert len(t) == 1 and t[0]["judge"] == JUDGE and t[0]["same_model"] and 1 <= t[0]["rank"] <= 10
        assert msg["scores"]["no_score"]["beats-top-k"] == "the unit's top-9 are not mined yet"
        rec = c.get(f"/api/atlas/unit?token={TOKEN}&layer={LOGITS}&unit=2").json()
        assert rec["synth"]["source"] == "live" and rec["synth"]["scores"] == msg["scores"]

        # accentuation of the frame shown: the unit rises, within the ball, with its figures
        _select(ws, LAYER, 3)
        ws.send_bytes(frame_message(1, 32, 32, seed=5))
        receive_until(ws, is_frame, limit=100)
        frame = app.state.toolbox.engine.sessions()[0].current
        # before and after are what the accentuation raises (the channel's mean here), not the map's maximum
        before = objective_value(model, frame.image, Unit(LAYER, 3))
        assert before != pytest.approx(unit_value(model, frame.image, Unit(LAYER, 3)))
        ws.send_text(json.dumps({"type": "accentuate", "layer": LAYER, "unit": 3}))
        msg, _ = receive_until(ws, _job_done("accentuate"), limit=300)
        assert msg["state"] == "done", msg
        assert msg["before"] == pytest.approx(before, rel=1e-5, abs=1e-6) and msg["measure"] == "channel mean"
        assert msg["before"] == pytest.approx(msg["objective_before"], rel=1e-4, abs=1e-5)
        assert msg["after"] > msg["before"] and msg["note"] is None
        assert msg["pixel_rms"] <= msg["radius"] + 1e-3 and msg["radius"] == 24.0
        with open_atlas(mined_atlas) as atlas:
            values = [t.value for t in atlas.unit(LAYER, 3).top]
        b = msg["scores"]["beats_top_k"]  # the atlas ranks by the map's maximum: so does beats-top-k
        after_max = b["value"]
        assert b["k"] == 9 and b["ratio"] == pytest.approx(after_max / max(values), rel=1e-5, abs=1e-6)
        assert msg["scores"]["plausibility"][0]["n"] == 9
        png = c.get(f"/api/atlas/image?token={TOKEN}&layer={LAYER}&unit=3&kind=accent")
        assert png.status_code == 200
        image = Image.open(io.BytesIO(png.content)).convert("RGB")
        assert image.size == (32, 32)
        # the served image is the result: its activation is the one reported, and it stays near the frame
        assert objective_value(model, image, Unit(LAYER, 3)) == pytest.approx(msg["after"], rel=1e-5)
        assert unit_value(model, image, Unit(LAYER, 3)) == pytest.approx(after_max, rel=1e-5)
        diff = np.asarray(image, np.float64) - np.asarray(frame.image.convert("RGB"), np.float64)
        assert np.sqrt((diff**2).mean()) <= 24.0 + 0.5
        rec = c.get(f"/api/atlas/unit?token={TOKEN}&layer={LAYER}&unit=3").json()
        assert rec["accentuation"]["after"] == msg["after"] and rec["accentuation"]["scores"]["line"]

        # a pinned position where the ReLU is off: no gradient, the frame comes back unchanged, and it says so
        from deepvis import capture

        acts = capture(model, model.preprocessing.with_size((32, 32)).to_tensor(frame.image, crop=False)[None], ["relu2"])["relu2"][0, 3]
        y, x = (int(v) for v in (acts == 0).nonzero()[0])
        ws.send_text(json.dumps({"type": "accentuate", "layer": "relu2", "unit": 3, "position": [y, x]}))
        msg, _ = receive_until(ws, _job_done("accentuate"), limit=300)
        assert msg["state"] == "done" and msg["measure"] == f"value at {y},{x}", msg
        assert msg["before"] == msg["after"] == 0.0 and msg["pixel_rms"] == 0.0
        assert (
            msg["note"]
            == "the unit's gradient is exactly 0 on this frame at that position: nothing raises it, the frame is returned unchanged"
        )

        # figures of an atlas image that has none: asked for, computed on the worker
        ws.send_text(json.dumps({"type": "figures", "layer": LAYER, "unit": 3}))
        msg, _ = receive_until(ws, _job_done("figures"), limit=100)
        assert msg["scores"]["no_score"] == {"figures": "no synthesized image in the atlas"}


def test_an_accentuation_is_cancelled_and_bad_requests_are_one_line(model):
    app = make_app(model, synthesis_steps=100000, synthesis_size=32, judges=())
    with TestClient(app) as c, c.websocket_connect(f"/ws?token={TOKEN}") as ws:
        json.loads(ws.receive_text())
        ws.send_text(json.dumps({"type": "accentuate", "layer": LAYER, "unit": 0}))
        msg, _ = receive_until(ws, lambda m: isinstance(m, dict) and m.get("type") == "error")
        assert msg["message"] == "no frame to accentuate yet: show an image, a sample or the camera first"
        ws.send_text(json.dumps({"type": "accentuate", "layer": LAYER, "unit": 99}))
        msg, _ = receive_until(ws, lambda m: isinstance(m, dict) and m.get("type") == "error")
        assert "99" in msg["message"] and "\n" not in msg["message"]
        ws.send_bytes(frame_message(1, 32, 32, seed=1))
        receive_until(ws, is_frame, limit=100)
        ws.send_text(json.dumps({"type": "accentuate", "layer": LAYER, "unit": 0}))
        receive_until(ws, lambda m: isinstance(m, dict) and m.get("job") == "accentuate" and m["state"] == "running", limit=100)
        ws.send_text(json.dumps({"type": "accentuate", "layer": LAYER, "unit": 0, "cancel": True}))
        msg, _ = receive_until(ws, _job_done("accentuate"), limit=300)
        assert msg["state"] == "cancelled"
        assert app.state.toolbox.synthesis.result(LAYER, 0, "accentuate") is None
        assert c.get(f"/api/atlas/image?token={TOKEN}&layer={LAYER}&unit=0&kind=accent").status_code == 404


def test_a_dataset_crop_is_also_served_as_its_whole_input_with_the_box(model, photos, tmp_path):
    app = make_app(model, dataset=str(photos), atlas=tmp_path / "atlas", synthesis=False)
    with TestClient(app) as c, c.websocket_connect(f"/ws?token={TOKEN}") as ws:
        json.loads(ws.receive_text())
        _select(ws, LAYER, 5)
        toolbox = app.state.toolbox
        assert wait_for(lambda: _mined(toolbox, LAYER), 120)
        assert wait_for(lambda: all(t["crop"] for t in c.get(f"/api/atlas/unit?token={TOKEN}&layer={LAYER}&unit=5").json()["top"]), 120)
        rec = c.get(f"/api/atlas/unit?token={TOKEN}&layer={LAYER}&unit=5").json()
        assert rec["whole_note"] is None and len(rec["top"]) == 9
        field = layer_field(model, LAYER)
        ds = open_dataset(str(photos))
        with open_atlas(tmp_path / "atlas") as atlas:
            tops = atlas.unit(LAYER, 5).top
        for t, entry in zip(tops, rec["top"]):
            rf = field.at(t.position)
            assert entry["whole"] and entry["box"] == list(rf.box)
            whole = np.asarray(
                Image.open(io.BytesIO(c.get(f"/api/atlas/image?token={TOKEN}&layer={LAYER}&unit=5&kind=input&rank={t.rank}").content))
            )
            seen = model.preprocessing.to_image(model.preprocess([ds.load(t.sample)])[0])
            assert whole.shape == (32, 32, 3)
            top, left, bottom, right = rf.box
            # the box's outline in yellow; inside it the input as the crop shows it
            assert (whole[top, left:right] == BOX_COLOR).all() and (whole[bottom - 1, left:right] == BOX_COLOR).all()
            assert (whole[top:bottom, left] == BOX_COLOR).all() and (whole[top:bottom, right - 1] == BOX_COLOR).all()
            crop = np.asarray(crop_image(seen, rf, fill=0))
            oy, ox = top - rf.field[0], left - rf.field[1]
            inner = whole[top + 1 : bottom - 1, left + 1 : right - 1]
            assert np.array_equal(inner, crop[oy + 1 : oy + bottom - top - 1, ox + 1 : ox + right - left - 1])
            outside = np.ones((32, 32), bool)
            outside[top:bottom, left:right] = False
            assert np.array_equal(whole[outside], np.asarray(seen)[outside])
    # the same atlas served without its dataset: crops only, and the record says so
    app = make_app(model, atlas=tmp_path / "atlas", synthesis=False)
    with TestClient(app) as c:
        rec = c.get(f"/api/atlas/unit?token={TOKEN}&layer={LAYER}&unit=5").json()
        assert rec["whole_note"] == WHOLE_NOT_STORED
        assert not any(t["whole"] for t in rec["top"]) and all(t["crop"] for t in rec["top"])
        assert c.get(f"/api/atlas/image?token={TOKEN}&layer={LAYER}&unit=5&kind=input&rank=0").status_code == 404


def test_a_unit_whose_input_is_silent_and_filter_negative_has_tied_tops_and_flat_views(photos, tmp_path):
    """The case of blocks.3.2.bn2.act unit 0 of the default model on ``demo`` (docs/server.md), with
    known numbers: conv2's unit 0 reads only conv1's channel 2, which is dead (zero weights, bias -1:
    ReLU gives 0 everywhere), through a filter of negative taps; its value is its bias, 0.75, at every
    position of every input, so its top-9 tie at 0.75, and its gradient and deconv views are exactly
    zero: uniformly gray (128), the right picture, not a display bug."""
    model = tiny_model()
    with torch.no_grad():
        model.module.conv1.weight[2] = 0.0
        model.module.conv1.bias[2] = -1.0
        model.module.conv2.weight[0] = 0.0
        model.module.conv2.weight[0, 2] = -0.5
        model.module.conv2.bias[0] = 0.75
    app = make_app(model, dataset=str(photos), atlas=tmp_path / "atlas", synthesis=False)
    with TestClient(app) as c, c.websocket_connect(f"/ws?token={TOKEN}") as ws:
        json.loads(ws.receive_text())
        _select(ws, LAYER, 0)
        assert wait_for(lambda: _mined(app.state.toolbox, LAYER), 120)
        assert wait_for(lambda: all(t["view"] for t in c.get(f"/api/atlas/unit?token={TOKEN}&layer={LAYER}&unit=0").json()["top"]), 120)
        rec = c.get(f"/api/atlas/unit?token={TOKEN}&layer={LAYER}&unit=0").json()
        assert [t["value"] for t in rec["top"]] == [0.75] * 9
        for t in rec["top"]:
            view = np.asarray(
                Image.open(io.BytesIO(c.get(f"/api/atlas/image?token={TOKEN}&layer={LAYER}&unit=0&kind=view&rank={t['rank']}").content))
            )
            assert view.shape == (5, 5, 3) and (view == 128).all()
        # a unit of the same layer that sees live inputs has views that are not flat
        rec = c.get(f"/api/atlas/unit?token={TOKEN}&layer={LAYER}&unit=5").json()
        assert len({t["value"] for t in rec["top"]}) > 1
