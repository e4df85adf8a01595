"""The live toolbox in a real browser: Playwright driving Debian's Chromium (headless, fake camera).

The page runs under its own Content-Security-Policy (no bypass): conditions are polled with
``page.evaluate``, which CSP does not restrict, and any CSP violation or script error fails the test.
Pages are opened with ``&test=1``, which gives them the read-only probe ``window.deepvis`` (the page's
live figures: static/js/probe.js); a page opened without it has no such global.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from chromium import CHROMIUM, browser_context, wait, watch_problems
from test_server_utils import LiveServer

if not Path(CHROMIUM).exists():
    pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Page

from deepvis import datasets
from deepvis.io import sample_path
from deepvis.server import ServerConfig, create_app

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

TOKEN = "b" * 43
ATLAS_LAYER = "blocks.2"


@pytest.fixture(scope="module")
def atlas_dir(tmp_path_factory, default_model):
    """A small atlas of the default model: layer blocks.2, units 0-1 synthesized (no crops: fast)."""
    from deepvis.atlas import AtlasOptions, SynthesisOptions, build_atlas

    root = tmp_path_factory.mktemp("atlas")
    data = root / "photos"
    data.mkdir()
    for name in ("coffee", "chelsea", "rocket", "astronaut"):
        p = sample_path(name)
        shutil.copy(p, data / f"{name}{p.suffix}")
    opts = AtlasOptions(
        layers=(ATLAS_LAYER,),
        top=3,
        batch_size=4,
        units="0-1",
        views=False,
        synthesis=SynthesisOptions(steps=6, size=64, units_per_batch=2),
    )
    build_atlas(root / "atlas", default_model, str(data), opts, progress=False)
    return root / "atlas"


@pytest.fixture(scope="module")
def server(default_model, atlas_dir):
    app = create_app(ServerConfig(model=default_model, atlas=atlas_dir, token=TOKEN, synthesis_steps=6, synthesis_size=64))
    with LiveServer(app, TOKEN) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    with browser_context(tmp_path_factory.mktemp("chromium-profile")) as ctx:
        yield ctx


@pytest.fixture
def page(browser, server):
    pg = browser.new_page()
    problems = watch_problems(pg)
    pg.goto(server.url("/", test="1"))
    wait(
        pg,
        "window.deepvis && window.deepvis.ready && window.deepvis.frames === 0 && document.getElementById('layer-select').options.length > 0",
    )
    yield pg
    pg.close()
    # refused uploads are logged by the browser as failed requests: those are expected
    assert [p for p in problems if "status of 400" not in p and "status of 413" not in p] == []


def test_only_a_page_opened_for_tests_has_the_probe(browser, server):
    pg = browser.new_page()
    try:
        pg.goto(server.url("/"))
        wait(pg, "document.getElementById('layer-select').options.length > 0 && document.getElementById('normalize').options.length > 0")
        assert pg.evaluate("Object.keys(window).filter((k) => k.toLowerCase().includes('deepvis'))") == []
        # the controls are built from the server's lists
        values = "(id) => [...document.getElementById(id).options].map((o) => o.value)"
        assert pg.evaluate(f"({values})('backprop-mode')") == ["off", "gradient", "deconv", "guided"]
        assert pg.evaluate(f"({values})('normalize')") == ["layer", "channel", "none"]
    finally:
        pg.close()


def test_upload_a_photo_see_the_grid_and_predictions(page, server):
    page.set_input_files("#image-file", str(sample_path("coffee")))
    wait(page, "window.deepvis.frames > 0 && window.deepvis.last.source === 'image'")
    assert page.evaluate("window.deepvis.predictions[0].label") == "espresso"
    items = page.locator("#predictions li")
    assert items.count() == 5 and "espresso" in items.first.inner_text()
    # the grid shows every unit of the layer with real, varying values
    shape = page.evaluate("window.deepvis.last.grid.shape")
    assert page.evaluate("document.getElementById('grid').width") > shape[2] * int(np.ceil(np.sqrt(shape[0])))
    spread = page.evaluate(
        "(() => { const c = document.getElementById('grid'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        " let lo = 255, hi = 0; for (let i = 0; i < d.length; i += 4) { lo = Math.min(lo, d[i]); hi = Math.max(hi, d[i]); } return hi - lo; })()"
    )
    assert spread > 100
    # the input pane shows the photo as the model sees it
    assert page.evaluate("window.deepvis.inputs") >= 1
    assert "coffee" in page.inner_text("#input-label")
    # the original toolbox's layout: the selected unit's map under the input, at the same left edge
    # (positions compare at a glance), the grid beside them; the predictions in view in the window
    box = "(id) => { const b = document.getElementById(id).getBoundingClientRect(); return [b.x, b.y, b.right, b.bottom]; }"
    inp, unit, grid, preds = (page.evaluate(f"({box})('{i}')") for i in ("input-canvas", "unit-map", "grid", "predictions"))
    assert unit[0] == inp[0] and unit[1] > inp[3] and grid[0] > max(inp[2], unit[2])
    assert preds[1] > unit[3] and preds[3] <= page.viewport_size["height"]


def test_select_units_by_click_and_keyboard_and_the_url_follows(page, server):
    page.select_option("#sample-select", "chelsea")
    wait(page, "window.deepvis.frames > 0")
    layer = page.evaluate("window.deepvis.last.layer")
    units = page.evaluate("window.deepvis.last.grid.shape[0]")
    cols = int(np.ceil(np.sqrt(units)))
    # click the middle of tile 5
    box = page.locator("#grid").bounding_box()
    width, height = page.evaluate("[document.getElementById('grid').width, document.getElementById('grid').height]")
    shape = page.evaluate("window.deepvis.last.grid.shape")
    th, tw = shape[1], shape[2]
    x = (1 + 5 * (tw + 1) + tw / 2) * box["width"] / width
    y = (1 + th / 2) * box["height"] / height
    page.mouse.click(box["x"] + x, box["y"] + y)
    wait(page, "window.deepvis.last.unit === 5")
    assert "unit=5" in page.url and f"layer={layer}" in page.url
    page.keyboard.press("l")
    page.keyboard.press("l")
    page.keyboard.press("k")
    wait(page, f"window.deepvis.last.unit === {7 + cols}")
    page.keyboard.press("J")  # three to the left
    wait(page, f"window.deepvis.last.unit === {4 + cols}")
    assert f"unit={4 + cols}" in page.url
    page.keyboard.press("o")  # next layer
    wait(page, f"window.deepvis.last.layer !== {layer!r}")
    assert "layer=" + page.evaluate("window.deepvis.last.layer") in page.url
    # the unit pane shows the selected unit's enlarged map
    assert page.evaluate("!document.getElementById('unit-map').hidden")
    assert page.inner_text("#unit-title").startswith(page.evaluate("window.deepvis.last.layer"))


def test_layer_keys_pass_over_aliases_and_a_typed_unit_outside_the_layer_is_refused(page, server):
    page.select_option("#sample-select", "chelsea")
    wait(page, "window.deepvis.frames > 0")
    listed = page.evaluate("[...document.getElementById('layer-select').options].map((o) => o.value)")
    table = {i["name"]: i for i in server.app.state.toolbox.info()["layers"]}

    def source(name: str) -> str:
        return table[name]["same_as"] or name

    # a listed layer followed in the list by one that outputs the very same tensor (an activation and its norm)
    k = next(k for k in range(len(listed) - 1) if source(listed[k]) == source(listed[k + 1]))
    after = next(n for n in listed[k + 1 :] if source(n) != source(listed[k]))
    page.select_option("#layer-select", listed[k])
    wait(page, f"window.deepvis.last.layer === {listed[k]!r}")
    page.focus("#grid")
    page.keyboard.press("o")  # next layer: the first that shows other data
    wait(page, f"window.deepvis.last.layer === {after!r}")
    page.keyboard.press("u")  # and back: over the aliases of the one before
    wait(page, f"window.deepvis.last.layer !== {after!r}")
    assert source(page.evaluate("window.deepvis.last.layer")) == source(listed[k])
    # a unit typed outside the layer is refused with a message; the box shows the selected unit again
    unit = page.evaluate("window.deepvis.last.unit")
    n = table[page.evaluate("window.deepvis.last.layer")]["shape"][0]
    for typed in ("99999", "-3", "2.5"):
        page.fill("#unit-input", typed)
        page.press("#unit-input", "Enter")
        wait(page, f"window.deepvis.errors.some((e) => e.startsWith('no unit {typed} in '))")
        assert page.input_value("#unit-input") == str(unit)
    assert f"its units are 0-{n - 1}" in page.evaluate("window.deepvis.errors.at(-1)")
    assert page.evaluate("window.deepvis.last.unit") == unit


def test_the_url_reopens_a_view(browser, server):
    pg = browser.new_page()
    try:
        pg.goto(server.url("/", layer="blocks.4.1", unit="17", test="1"))
        wait(pg, "window.deepvis && window.deepvis.ready")
        pg.select_option("#sample-select", "rocket")
        wait(pg, "window.deepvis.frames > 0 && window.deepvis.last.layer === 'blocks.4.1' && window.deepvis.last.unit === 17")
        assert pg.input_value("#layer-select") == "blocks.4.1"
    finally:
        pg.close()


def test_cycle_the_backprop_mode_and_filter(page, server):
    page.select_option("#sample-select", "coffee")
    wait(page, "window.deepvis.frames > 0")
    # unit 3, not 0: unit 0 of the default layer is constant (1.97 on every photo), its guided view is
    # exactly zero, and the default filter (norm) draws zero as black
    page.fill("#unit-input", "3")
    page.press("#unit-input", "Enter")
    wait(page, "window.deepvis.last.unit === 3")
    page.focus("#grid")  # keys typed into the unit field are not shortcuts
    assert page.evaluate("window.deepvis.backprops") == 0
    page.keyboard.press("b")
    wait(page, "window.deepvis.backprops > 0 && window.deepvis.lastBackprop.mode === 'gradient'")
    page.keyboard.press("b")
    wait(page, "window.deepvis.lastBackprop && window.deepvis.lastBackprop.mode === 'deconv'")
    page.keyboard.press("b")
    wait(page, "window.deepvis.lastBackprop.mode === 'guided'")
    first = page.evaluate("window.deepvis.lastBackprop.filter")
    page.keyboard.press("m")
    wait(page, f"window.deepvis.lastBackprop.filter !== {first!r}")
    # the view is drawn and is not blank
    assert (
        page.evaluate(
            "(() => { const c = document.getElementById('backprop'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
            " let n = 0; for (let i = 0; i < d.length; i += 4) n += (d[i] + d[i + 1] + d[i + 2]) > 30; return n; })()"
        )
        > 100
    )
    page.keyboard.press("b")  # back to off
    wait(page, "document.getElementById('backprop-wrap').hidden")
    # the receptive field of the unit's strongest position is boxed on the input
    wait(page, "window.deepvis.rf && !document.getElementById('rf-box').hidden")


def test_the_atlas_pane_and_on_demand_synthesis(page, server):
    page.select_option("#sample-select", "coffee")
    page.select_option("#layer-select", ATLAS_LAYER)
    wait(page, f"window.deepvis.last && window.deepvis.last.layer === '{ATLAS_LAYER}'")
    page.keyboard.press("l")  # unit 1: in the atlas, with a synthesized image and its top inputs
    wait(page, "window.deepvis.last.unit === 1")
    wait(page, "(() => { const i = document.querySelector('#atlas-pane img.synth-img'); return i && i.complete && i.naturalWidth > 0; })()")
    assert page.locator("#atlas-pane .tops figure").count() == 3
    # unit 5 is not in the atlas: synthesize it, with visible progress, while the live view goes on
    page.fill("#unit-input", "5")
    page.press("#unit-input", "Enter")
    wait(page, "window.deepvis.last.unit === 5 && document.getElementById('synth-btn') !== null")
    page.click("#synth-btn")
    wait(page, "window.deepvis.synthesis && ['running', 'done'].includes(window.deepvis.synthesis.state)")
    wait(page, "window.deepvis.synthesis.state === 'done'", timeout=120)
    wait(page, "(() => { const i = document.querySelector('#atlas-pane img.synth-img'); return i && i.complete && i.naturalWidth > 0; })()")
    # pattern mode: the tiles show the synthesized images
    page.keyboard.press("s")
    wait(page, "document.getElementById('pattern').checked && window.deepvis.patternTiles >= 3")


def grid_reference(values: np.ndarray, shape: list[int], colormap: str) -> np.ndarray:
    """The grid as the page drew it before its index-map drawing path, computed here from the same frame
    data: tiles in rows of ceil(sqrt(C)) columns, 1-pixel padding of (40, 40, 40), a vector's units as
    8x8 cells, each value through the colormap's 256 RGB triples (as sent in hello). (H, W, 4) uint8."""
    from deepvis.render.colormap import colormap_lut

    n = shape[0]
    th, tw = (shape[1], shape[2]) if len(shape) == 3 else (8, 8)
    cols = int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.empty((1 + rows * (th + 1), 1 + cols * (tw + 1), 4), np.uint8)
    out[...] = (40, 40, 40, 255)
    lut = np.asarray(colormap_lut(colormap), np.uint8).reshape(256, 3)
    tiles = values.reshape(n, th, tw) if len(shape) == 3 else np.repeat(np.repeat(values.reshape(n, 1, 1), th, 1), tw, 2)
    for c in range(n):
        y, x = 1 + (c // cols) * (th + 1), 1 + (c % cols) * (tw + 1)
        out[y : y + th, x : x + tw, :3] = lut[tiles[c]]
    return out


def canvas_pixels(page: Page, canvas_id: str) -> np.ndarray:
    w, h, data = page.evaluate(
        f"(() => {{ const c = document.getElementById('{canvas_id}'); const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);"
        " return [c.width, c.height, Array.from(d.data)]; })()"
    )
    return np.asarray(data, np.uint8).reshape(h, w, 4)


@pytest.mark.parametrize("layer, colormap", [("blocks.3.2.bn2.act", "gray"), ("blocks.1", "jet"), ("logits", "viridis")])
def test_the_grid_drawing_gives_the_same_pixels_as_the_tile_layout(page, server, layer, colormap):
    page.select_option("#sample-select", "chelsea")
    page.select_option("#layer-select", layer)
    page.select_option("#colormap", colormap)
    wait(page, f"window.deepvis.last && window.deepvis.last.layer === '{layer}' && window.deepvis.lastGrid")
    shape, values = page.evaluate("[window.deepvis.last.grid.shape, Array.from(window.deepvis.lastGrid)]")
    want = grid_reference(np.asarray(values, np.uint8), shape, colormap)
    assert np.array_equal(canvas_pixels(page, "grid"), want)


def test_the_backprop_view_is_readable_by_default_and_the_raw_view_is_one_key_away(page, server):
    page.select_option("#sample-select", "chelsea")
    page.fill("#unit-input", "66")  # a unit the cat excites (unit 0 is constant: its guided view is zero)
    page.press("#unit-input", "Enter")
    wait(page, "window.deepvis.frames > 0 && window.deepvis.last.unit === 66")
    page.focus("#grid")
    for _ in range(3):
        page.keyboard.press("b")  # off -> gradient -> deconv -> guided
    wait(page, "window.deepvis.lastBackprop && window.deepvis.lastBackprop.mode === 'guided'")
    bp = page.evaluate("window.deepvis.lastBackprop")
    assert (bp["filter"], bp["percentile"]) == ("norm", 99.0)
    lit = "(() => { const p = document.getElementById('backprop').getContext('2d').getImageData(0, 0, 224, 224).data; let n = 0; for (let i = 0; i < p.length; i += 4) n += (p[i] + p[i + 1] + p[i + 2]) > 60; return n / (p.length / 4); })()"
    wait(page, f"{lit} > 0")
    readable = page.evaluate(lit)
    page.keyboard.press("v")
    wait(page, "window.deepvis.lastBackprop.filter === 'raw' && window.deepvis.lastBackprop.percentile === 100")
    assert page.is_checked("#backprop-raw")
    raw = page.evaluate(lit)
    assert readable > 0.01 and readable > 3 * raw  # the max-scaled raw view of a photo is nearly black
    page.keyboard.press("v")
    wait(page, "window.deepvis.lastBackprop.filter === 'norm' && window.deepvis.lastBackprop.percentile === 99")
    assert not page.is_checked("#backprop-raw")


def test_fake_camera_gives_live_updates(page, server):
    page.click("#src-camera")
    wait(page, "window.deepvis.liveFrames >= 15 && window.deepvis.latencies.length >= 10")
    stats = page.evaluate("({fps: window.deepvis.fps, p95: window.deepvis.p95, last: window.deepvis.last.source})")
    assert stats["last"] == "camera" and stats["fps"] > 0 and stats["p95"] > 0
    # freeze: no new live frames arrive
    page.keyboard.press("f")
    n = wait(page, "window.deepvis.liveFrames")
    page.wait_for_timeout(500)
    assert page.evaluate("window.deepvis.liveFrames") <= n + 2
    # the status line says frozen, not the last frame rate; a unit selected meanwhile keeps it so
    page.keyboard.press("l")
    wait(page, "window.deepvis.last.unit === 1")
    status = page.inner_text("#status")
    assert status.startswith("frozen (f or Unfreeze to go on)") and "frames/s" not in status
    page.keyboard.press("f")
    m = wait(page, f"window.deepvis.liveFrames > {n + 2} && window.deepvis.liveFrames")
    # unfrozen, the first live result writes the frame rate back (not the text panes' next tick)
    assert "frames/s" in page.inner_text("#status"), m


def make_webm(path: Path, frames: int = 20, fps: int = 10) -> None:
    import av

    rng = np.random.default_rng(0)
    with av.open(str(path), "w", format="webm") as out:
        stream = out.add_stream("libvpx", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 160, 120, "yuv420p"
        for i in range(frames):
            img = np.zeros((120, 160, 3), np.uint8)
            img[:, : 8 * (i + 1)] = rng.integers(0, 255, 3, dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def test_a_video_file_plays_through(page, server, tmp_path):
    clip = tmp_path / "clip.webm"
    make_webm(clip)
    page.set_input_files("#video-file", str(clip))
    wait(page, "window.deepvis.videoEnded", timeout=60)
    assert page.evaluate("window.deepvis.last.source") == "video"
    assert page.evaluate("window.deepvis.liveFrames") >= 5
    # step: pause and move one frame; the stepped frame is processed
    n = page.evaluate("window.deepvis.liveFrames")
    page.evaluate("document.getElementById('video').currentTime = 0.5")
    wait(page, f"window.deepvis.liveFrames > {n}")


def test_a_bad_file_gives_a_visible_message_and_the_page_goes_on(page, server, tmp_path):
    bad = tmp_path / "<img src=x onerror=alert(1)>.png"
    bad.write_bytes(b"definitely not a PNG")
    page.set_input_files("#image-file", str(bad))
    wait(page, "!document.getElementById('message').hidden")
    text = page.inner_text("#message-text")
    assert "not an image" in text and "<img src=x onerror=alert(1)>.png" in text  # shown as text...
    assert page.locator("#message img").count() == 0  # ...never as HTML
    page.select_option("#sample-select", "coffee")
    wait(page, "window.deepvis.frames > 0 && window.deepvis.predictions[0].label === 'espresso'")


def test_help_overlay_lists_every_binding(page, server):
    assert page.is_hidden("#help")
    page.keyboard.press("h")
    assert page.is_visible("#help")
    assert page.locator("#help-table tr").count() >= 20
    assert "previous layer" in page.inner_text("#help-table")
    page.keyboard.press("Escape")
    assert page.is_hidden("#help")


def test_a_video_the_browser_cannot_play_is_decoded_by_the_server(page, server, tmp_path):
    from deepvis.io import VideoWriter

    clip = tmp_path / "clip.avi"  # AVI: a container Chromium does not play
    rng = np.random.default_rng(1)
    with VideoWriter(clip, fps=10) as w:
        for _ in range(8):
            w.write(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8))
    page.set_input_files("#video-file", str(clip))
    wait(page, "window.deepvis.videoEnded", timeout=120)
    assert page.evaluate("window.deepvis.last.source") == "video"
    assert page.evaluate("window.deepvis.liveFrames") >= 5
    assert "frame 8/8" in page.inner_text("#input-label")
    assert page.is_hidden("#message")
    # a damaged file: neither the browser nor the server can decode it; the page says so and goes on
    broken = tmp_path / "broken.webm"
    broken.write_bytes(b"\x1a\x45\xdf\xa3" + bytes(rng.integers(0, 255, 5000, dtype=np.uint8)))
    page.set_input_files("#video-file", str(broken))
    wait(page, "!document.getElementById('message').hidden", timeout=120)
    assert "could not decode" in page.inner_text("#message-text") or "cannot" in page.inner_text("#message-text")
    page.select_option("#sample-select", "coffee")
    wait(page, "window.deepvis.last.source === 'sample' && window.deepvis.predictions[0].label === 'espresso'")


def test_labels_from_the_model_are_shown_as_text(browser):
    from test_server_utils import tiny_model

    model = tiny_model(64)
    model.class_names = [f'<img src=x onerror="window.pwned={i}"> class {i}' for i in range(10)]
    app = create_app(ServerConfig(model=model, token=TOKEN, backprop=False, synthesis=False))
    with LiveServer(app, TOKEN) as srv:
        pg = browser.new_page()
        try:
            pg.goto(srv.url("/", layer="fc", unit="3", test="1"))
            wait(pg, "window.deepvis && window.deepvis.ready")
            pg.select_option("#sample-select", "coffee")
            wait(pg, "window.deepvis.frames > 0 && window.deepvis.last.layer === 'fc'")
            assert '<img src=x onerror="window.pwned=' in pg.inner_text("#predictions")
            assert pg.locator("#predictions img, #unit-title img").count() == 0
            assert "class 3" in pg.inner_text("#unit-title")  # the class label of a class unit
            assert pg.evaluate("window.pwned === undefined")
            # each prediction stays on one line however long its label (these wrapped before), the whole
            # label in its title: the five stay in view under the unit map
            rows = pg.evaluate(
                "[...document.querySelectorAll('#predictions li')].map((li) => [li.getBoundingClientRect().height, li.title, li.querySelector('.label').textContent])"
            )
            assert len(rows) == 5 and all(h < 30 and title == label for h, title, label in rows), rows
        finally:
            pg.close()


# -- the summary pane ---------------------------------------------------------------------------------------------
SUMMARY = "window.deepvis.summary"


def test_the_summary_pane_counts_the_frames_and_resets(page, server):
    page.select_option("#sample-select", "coffee")
    wait(page, "window.deepvis.frames > 0")
    layer = page.evaluate("window.deepvis.last.layer")
    wait(page, f"{SUMMARY} && {SUMMARY}.layer === {layer!r} && {SUMMARY}.images === 1")
    assert page.evaluate(f"{SUMMARY}.source") == "live"
    assert "1 frame seen" in page.inner_text("#summary-source")
    assert "%" in page.inner_text("#summary [data-field='sparsity']")
    assert page.locator("#summary-by-mean .unit-chip").count() == 8
    # the reset key empties it
    page.focus("#grid")
    page.keyboard.press("z")
    wait(page, f"{SUMMARY}.images === 0")
    assert page.inner_text("#summary [data-field='inputs']") == "0" and page.locator("#summary .unit-chip").count() == 0
    # live frames: it updates as they arrive
    page.click("#src-camera")
    wait(page, f"{SUMMARY}.images >= 3")
    n = page.evaluate(f"{SUMMARY}.images")
    wait(page, f"{SUMMARY}.images > {n}")
    assert page.evaluate(f"{SUMMARY}.sparsity") is not None
    # a unit's button is kept from one summary to the next, only its figure rewritten (a click in
    # progress is not lost when the live pane is redrawn under the mouse)
    before = page.evaluate(
        f"(() => {{ document.querySelectorAll('#summary .unit-chip').forEach((b) => {{ b.kept = true; }}); return {SUMMARY}.most_active_by_mean.map((r) => r.unit); }})()"
    )
    n = page.evaluate(f"{SUMMARY}.images")
    wait(page, f"{SUMMARY}.images > {n + 1}")
    shown, rows = page.evaluate(
        "[[...document.querySelectorAll('#summary-by-mean .unit-chip')].map((b) => [Number(b.dataset.unit), !!b.kept, b.lastChild.textContent]),"
        f" {SUMMARY}.most_active_by_mean]"
    )
    assert [u for u, _, _ in shown] == [r["unit"] for r in rows]
    assert all(abs(float(v) - r["mean"]) <= 0.0051 for (_, _, v), r in zip(shown, rows, strict=True))
    kept = [u for u, k, _ in shown if k]
    assert kept and kept == [u for u, _, _ in shown if u in before], (shown, before)
    page.keyboard.press("f")  # freeze: the camera stops


def test_clicking_a_most_active_unit_selects_it(page, server):
    page.select_option("#sample-select", "chelsea")
    wait(page, f"window.deepvis.frames > 0 && {SUMMARY} && {SUMMARY}.images > 0")
    chip = page.locator("#summary-by-max .unit-chip").nth(2)
    unit = int(chip.get_attribute("data-unit"))
    assert unit == page.evaluate(f"{SUMMARY}.most_active_by_max[2].unit")
    chip.click()
    wait(page, f"window.deepvis.last.unit === {unit}")
    assert f"unit={unit}" in page.url


def test_with_a_report_the_summary_pane_shows_its_numbers(browser, default_model, tmp_path):
    import json

    import torch

    from deepvis.analysis.activity import layer_activity
    from deepvis.capture import capture, layer_table
    from deepvis.server.engine import default_layer
    from deepvis.stats import LayerStats

    layer = default_layer(layer_table(default_model))
    x = torch.randn(2, 3, *default_model.preprocessing.input_size)
    a = capture(default_model, x, [layer])[layer].detach()
    st = LayerStats(layer, a.shape[1], 2, tuple(a.shape[2:]))
    st.update(a, torch.arange(2))
    act = layer_activity(st, tuple(a.shape[1:]))
    report = {
        "model": default_model.name,
        "dataset": "two-random",
        "activity": {layer: act.to_dict()},
        "locality": {layer: {"locality": [0.5] * a.shape[1]}},
        "sensitivity": None,
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report).replace("-Infinity", "null").replace("Infinity", "null").replace("NaN", "null"))
    app = create_app(ServerConfig(model=default_model, report=path, token=TOKEN, backprop=False, synthesis=False))
    with LiveServer(app, TOKEN) as srv:
        pg = browser.new_page()
        try:
            pg.goto(srv.url("/", layer=layer, test="1"))
            wait(pg, f"window.deepvis && window.deepvis.ready && {SUMMARY} && {SUMMARY}.layer === {layer!r}")
            assert pg.evaluate(f"{SUMMARY}.source") == "report" and pg.evaluate(f"{SUMMARY}.images") == 2
            assert "report.json" in pg.inner_text("#summary-source")
            shown = [int(u) for u in pg.locator("#summary-by-mean .unit-chip").evaluate_all("(bs) => bs.map((b) => b.dataset.unit)")]
            assert shown == act.most_active("mean")
            assert pg.inner_text("#summary [data-field='locality (median)']") == "0.500"
            assert pg.is_hidden("#summary-reset")  # nothing live to reset
        finally:
            pg.close()


# -- what the unit likes: cropped synthesized images, and a dataset mined in the background ----------------------
SYNTH_IMG = "document.querySelector('#atlas-pane img.synth-img')"


def test_a_synthesized_image_is_shown_cropped_to_the_receptive_field_and_the_toggle_shows_the_canvas(page, server, default_model):
    from deepvis.backprop import layer_field

    geo = layer_field(default_model, ATLAS_LAYER, (64, 64))  # the atlas's synthesis canvas: 64 px
    top, left, bottom, right = geo.at((geo.output_size[0] // 2, geo.output_size[1] // 2)).box
    assert (bottom - top, right - left) != (64, 64)
    page.goto(server.url("/", layer=ATLAS_LAYER, unit="1", test="1"))
    loaded = f"(() => {{ const i = {SYNTH_IMG}; return i && i.complete && i.naturalWidth > 0 && i.naturalWidth; }})()"
    assert wait(page, loaded) == right - left
    assert page.evaluate(f"{SYNTH_IMG}.naturalHeight") == bottom - top
    page.check("#synth-whole")  # the whole canvas
    wait(page, f"{loaded} === 64")
    assert page.evaluate(f"{SYNTH_IMG}.naturalHeight") == 64
    page.uncheck("#synth-whole")
    wait(page, f"{loaded} === {right - left}")


def _open(browser, srv, **query):
    pg = browser.new_page()
    problems = watch_problems(pg)
    pg.goto(srv.url("/", test="1", **query))
    wait(pg, "window.deepvis && window.deepvis.ready")
    return pg, problems


@pytest.mark.timeout(600)  # mining on a busy 2-core machine
def test_with_the_demo_dataset_the_unit_pane_shows_top_9_crops_while_the_view_stays_live(browser, default_model, monkeypatch):
    # the demo dataset with half of its views per photo (23 x 8 = 184 inputs instead of 368): still far more
    # than 9, and still mined for longer than the live view takes to start; mining it is the cost of this test
    monkeypatch.setattr(datasets, "DEMO_VIEWS", datasets.DEMO_VIEWS[:8])
    app = create_app(ServerConfig(model=default_model, dataset="demo", token=TOKEN, synthesis=False))
    with LiveServer(app, TOKEN) as srv:
        pg, problems = _open(browser, srv)
        try:
            layer = pg.evaluate("document.getElementById('layer-select').value")
            wait(pg, "window.deepvis.mining && !document.getElementById('mining-status').hidden")
            pg.click("#src-camera")  # live frames while the dataset is mined
            wait(pg, "window.deepvis.liveFrames >= 3")
            # within a bounded time the selected unit's top-9 crops and deconv views are shown
            wait(pg, "window.deepvis.atlasShown && window.deepvis.atlasShown.crops === 9 && window.deepvis.atlasShown.views === 9", 400)
            shown = "document.querySelectorAll('#atlas-pane .tops img')"
            wait(pg, f"[...{shown}].length === 18 && [...{shown}].every((i) => i.complete && i.naturalWidth > 0)")
            assert pg.evaluate("window.deepvis.atlasShown.layer") == layer
            n = pg.evaluate("window.deepvis.liveFrames")
            wait(pg, f"window.deepvis.liveFrames > {n} + 2")  # the view is still live
            assert layer in pg.inner_text("#mining-status")
            pg.keyboard.press("f")
        finally:
            pg.close()
        assert problems == []


@pytest.mark.timeout(600)  # mining on a busy 2-core machine
def test_a_dataset_with_broken_images_still_serves_and_lists_what_was_skipped(browser, default_model, tmp_path):
    data = tmp_path / "photos"
    data.mkdir()
    for name in ("coffee", "chelsea", "rocket"):
        p = sample_path(name)
        shutil.copy(p, data / f"{name}{p.suffix}")
    (data / "broken.jpg").write_bytes(b"not a JPEG at all")
    app = create_app(ServerConfig(model=default_model, dataset=str(data), token=TOKEN, synthesis=False, backprop=False))
    with LiveServer(app, TOKEN) as srv:
        pg, problems = _open(browser, srv)
        try:
            wait(pg, "document.getElementById('mining-skipped') !== null", 240)
            text = pg.inner_text("#mining-skipped")
            assert text.startswith("1 unreadable input skipped: broken.jpg (") and "<" not in text
            wait(pg, "window.deepvis.atlasShown && window.deepvis.atlasShown.crops === 3", 240)
            pg.select_option("#sample-select", "coffee")
            wait(pg, "window.deepvis.frames > 0")  # the toolbox serves on
        finally:
            pg.close()
        assert problems == []


@pytest.fixture(scope="module")
def vit_server():
    from test_server_vit import tiny_vit

    app = create_app(ServerConfig(model=tiny_vit(), token=TOKEN, synthesis=False, backprop=False))
    with LiveServer(app, TOKEN) as srv:
        yield srv


def test_a_vit_shows_the_prefix_strip_and_attention_per_head_for_a_query(browser, vit_server):
    pg = browser.new_page()
    problems = watch_problems(pg)
    try:
        pg.goto(vit_server.url("/", layer="blocks.1", unit="0", test="1"))
        wait(pg, "window.deepvis && window.deepvis.ready")
        pg.select_option("#sample-select", "coffee")
        # a token layer: the patch maps in the grid, the class and distillation tokens in the strip under it
        wait(pg, "window.deepvis.frames > 0 && window.deepvis.last.layer === 'blocks.1' && window.deepvis.strip !== null")
        assert pg.evaluate("window.deepvis.strip") == {"names": ["cls", "dist"], "shape": [2, 192]}
        assert pg.evaluate("!document.getElementById('strip-wrap').hidden") and pg.inner_text("#strip-labels").split() == ["cls", "dist"]
        assert pg.evaluate("document.getElementById('query-wrap').hidden")
        assert "cls" in pg.inner_text("#unit-stats") and "dist" in pg.inner_text("#unit-stats")
        # a strip cell selects its unit at that prefix token (blocks.1:40@dist); a tile, the channel again
        box = pg.locator("#strip").bounding_box()
        pg.mouse.click(box["x"] + (40.5 / 192) * box["width"], box["y"] + box["height"] * 0.75)
        wait(pg, "window.deepvis.last.unit === 40 && window.deepvis.last.token === 'dist'")
        assert pg.inner_text("#unit-title") == "blocks.1 : 40@dist"
        pg.keyboard.press("l")
        wait(pg, "window.deepvis.last.unit === 41 && window.deepvis.last.token === null")
        # an attention layer: one tile per head, the class token's row by default
        pg.select_option("#layer-select", "blocks.1.attn.attn_drop")
        wait(pg, "window.deepvis.last.layer === 'blocks.1.attn.attn_drop' && window.deepvis.last.query === 'cls'")
        assert pg.evaluate("window.deepvis.last.grid.shape") == [3, 4, 4]
        assert pg.evaluate("window.deepvis.strip") == {"names": ["cls", "dist"], "shape": [2, 3]}
        assert pg.evaluate("!document.getElementById('query-wrap').hidden")
        # the query follows the patch under the cursor on the input
        pg.select_option("#query-mode", "cursor")
        box = pg.locator("#input-canvas").bounding_box()
        pg.mouse.move(box["x"] + box["width"] * 0.9, box["y"] + box["height"] * 0.1)
        wait(pg, "window.deepvis.last.query === '0,3'")
        # the query patch is boxed on the input: patch (0, 3) of 4x4 over 64 px
        assert pg.evaluate("window.deepvis.queryBox") == [0, 48, 16, 64]
        qbox = pg.locator("#query-box").bounding_box()
        assert abs(qbox["x"] - (box["x"] + 0.75 * box["width"])) < 2 and abs(qbox["width"] - box["width"] / 4) < 2
        pg.mouse.move(box["x"] + box["width"] * 0.1, box["y"] + box["height"] * 0.6)
        wait(pg, "window.deepvis.last.query === '2,0'")
        assert pg.evaluate("window.deepvis.queryBox") == [32, 0, 48, 16]
        pg.select_option("#query-mode", "dist")
        wait(pg, "window.deepvis.last.query === 'dist'")
        assert pg.evaluate("window.deepvis.queryBox") is None and pg.evaluate("document.getElementById('query-box').hidden")
    finally:
        pg.close()
    assert problems == []


def _live_camera(browser, server, frames: int = 5, **query) -> tuple[Page, list[str]]:
    """A new page (its URL with the probe and ``query``) showing the fake camera live, ``frames``
    results drawn, and the list collecting its problems."""
    pg = browser.new_page()
    problems = watch_problems(pg)
    pg.goto(server.url("/", test="1", **query))
    wait(pg, "window.deepvis && window.deepvis.ready")
    pg.click("#src-camera")
    wait(pg, f"window.deepvis.liveFrames >= {frames}")
    return pg, problems


def _camera_input(browser, server, capture: str | None) -> tuple[dict, np.ndarray]:
    """Live camera on a new page (``capture``: the page's capture URL switch, None for its default):
    the capture path, whether every sampled result was drawn beside its own input frame, and the input
    canvas's pixels."""
    pg, problems = _live_camera(browser, server, 10, **({"capture": capture} if capture else {}))
    pairs = []
    for _ in range(10):
        pairs.append(pg.evaluate("[window.deepvis.inputSeq, window.deepvis.last.seq]"))
        pg.wait_for_timeout(60)
    info = {"capture": pg.evaluate("window.deepvis.capture"), "pairs": pairs}
    pixels = canvas_pixels(pg, "input-canvas")
    pg.close()
    assert problems == []
    return info, pixels


def test_camera_frames_are_read_frame_by_frame_and_shown_beside_their_own_results(browser, server):
    # Chromium reads the camera frame by frame (MediaStreamTrackProcessor); &capture=video keeps the
    # <video> element path (other browsers). Both show, in the input canvas, the frame whose result
    # is drawn: with two frames in flight the newest frame sent is one ahead of the result.
    track, track_px = _camera_input(browser, server, None)
    video, video_px = _camera_input(browser, server, "video")
    assert (track["capture"], video["capture"]) == ("track", "video")
    for info in (track, video):
        assert all(shown == drawn for shown, drawn in info["pairs"]), info["pairs"]
    # the fake camera's picture is mostly one green: both paths crop and convert it alike
    for px in (track_px, video_px):
        assert px[..., 1].mean() > 80 and px.shape[:2] == (224, 224)
    track_bg = np.median(track_px[..., :3].reshape(-1, 3), 0)
    video_bg = np.median(video_px[..., :3].reshape(-1, 3), 0)
    assert np.abs(track_bg - video_bg).max() <= 4, (track_bg, video_bg)


def test_a_frozen_camera_is_not_read_until_it_thaws(browser, server):
    # frozen, the page reads no camera frame (the track drops them) and sends nothing; unfrozen, it
    # reads and sends again
    pg, problems = _live_camera(browser, server)
    assert pg.evaluate("window.deepvis.capture") == "track"
    pg.keyboard.press("f")
    pg.wait_for_timeout(400)  # the read and the results already on their way land
    before = pg.evaluate("[window.deepvis.trackFrames, window.deepvis.frames]")
    pg.wait_for_timeout(700)  # ~20 frames of the 30 fps fake camera
    assert pg.evaluate("[window.deepvis.trackFrames, window.deepvis.frames]") == before
    pg.keyboard.press("f")
    wait(pg, f"window.deepvis.trackFrames > {before[0] + 5} && window.deepvis.frames > {before[1] + 3}")
    pg.close()
    assert problems == []


def test_a_live_backprop_view_is_drawn_with_a_result_and_its_note_on_the_text_clock(browser, server):
    # a view drawn on its own is one more frame for the browser to lay out, paint and composite, and
    # every write of its note lays the page out: live, a view waits for the next result (at most
    # 250 ms) and its note follows the text panes' clock (250 ms), the newest one last
    pg, problems = _live_camera(browser, server)
    pg.focus("#grid")
    pg.keyboard.press("b")
    wait(pg, "window.deepvis.backprops >= 2")
    pg.evaluate(
        "window.noteWrites = []; new MutationObserver(() => window.noteWrites.push(performance.now()))"
        ".observe(document.getElementById('backprop-note'), {childList: true, characterData: true, subtree: true})"
    )
    d0 = pg.evaluate("({...window.deepvis.backpropsDrawn})")
    pg.wait_for_timeout(2500)
    writes, d1 = pg.evaluate("[window.noteWrites, {...window.deepvis.backpropsDrawn}]")
    with_result, alone = d1["withResult"] - d0["withResult"], d1["alone"] - d0["alone"]
    assert with_result + alone >= 4 and len(writes) >= 3, (with_result, alone, writes)  # the view and its note stay live
    assert with_result >= 0.5 * (with_result + alone), (with_result, alone)
    gaps = np.diff(writes)
    assert gaps.min() >= 190, (gaps.round().tolist(), with_result + alone)  # the old page wrote one per view (~100 ms)
    pg.keyboard.press("f")  # no newer view after the ones on their way: the last note is the newest view's
    pg.wait_for_timeout(1500)
    last, drawn = pg.evaluate("[window.deepvis.lastBackprop, {...window.deepvis.backpropsDrawn}]")
    note = pg.inner_text("#backprop-note")
    assert note.endswith(f" · {last['ms']:.0f} ms") and f"{last['layer']}:{last['unit']}" in note, (note, last)
    # frozen, another unit's view is drawn at once, alone
    pg.keyboard.press("l")
    wait(pg, f"window.deepvis.backpropsDrawn.alone > {drawn['alone']} && window.deepvis.lastBackprop.unit === {last['unit'] + 1}")
    wait(pg, f"document.getElementById('backprop-note').textContent.includes(':{last['unit'] + 1} ')")
    pg.close()
    assert problems == []
