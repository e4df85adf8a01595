"""The unit pane in a real browser (Playwright + Debian's Chromium): "accentuate" shows the accentuated
frame with its figures, and the "whole canvas" toggle shows a dataset crop's whole input with its box.

The tiny model (tests/test_server_utils.py) over 12 small photos mined in the background, so that the
test runs in seconds; the judge is the tiny model itself (its figures flagged as such).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from chromium import CHROMIUM, browser_context, wait, watch_problems
from test_server_utils import LiveServer, tiny_model

if not Path(CHROMIUM).exists():
    pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


from deepvis.server import ServerConfig, create_app

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

TOKEN = "u" * 43
LAYER = "conv2"
JUDGE = f"{Path(__file__).parent / 'test_server_utils.py'}:tiny_model"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(root / f"photo{i:02d}.png")
    app = create_app(
        ServerConfig(
            model=tiny_model(),
            dataset=str(root),
            token=TOKEN,
            synthesis_steps=12,
            synthesis_size=32,
            mining_batch_size=4,
            judges=(JUDGE,),
        )
    )
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
    pg.goto(server.url("/", layer=LAYER, unit="3", test="1"))
    wait(pg, "window.deepvis && window.deepvis.ready && document.getElementById('layer-select').options.length > 0")
    yield pg
    pg.close()
    assert problems == []


def loaded(selector: str) -> str:
    return (
        f"(() => {{ const i = document.querySelector({selector!r}); return i && i.complete && i.naturalWidth > 0 && i.naturalWidth; }})()"
    )


def test_accentuate_shows_the_accentuated_frame_and_its_figures(page):
    page.select_option("#sample-select", "coffee")
    wait(page, f"window.deepvis.last && window.deepvis.last.layer === '{LAYER}' && window.deepvis.last.unit === 3")
    wait(page, "document.getElementById('accent-btn') !== null")
    page.click("#accent-btn")
    wait(
        page,
        "window.deepvis.synthesis && window.deepvis.synthesis.job === 'accentuate' && window.deepvis.synthesis.state === 'done'",
        timeout=120,
    )
    assert wait(page, loaded("#accent-img")) == 32  # the model's input size
    m = page.evaluate("window.deepvis.synthesis")
    assert m["after"] > m["before"] and m["pixel_rms"] <= m["radius"] + 1e-3
    numbers = page.inner_text("#accent-numbers")
    assert numbers.startswith(f"channel mean {m['before']:.3f} → {m['after']:.3f} · distance {m['pixel_rms']:.1f} of 24 RMS levels")
    figures = wait(page, "document.getElementById('accent-figures') && document.getElementById('accent-figures').textContent")
    # the unit's top-9 are mined by now or not yet: beats-top-k is either a figure or a reason
    assert figures.startswith("beats-top-9: ") or "beats-top-k: no score (" in figures
    # a figure judged by the served model (the tiny model: plausibility against the mined top-9) is flagged;
    # before the top-9 are mined there is no such figure and no flag
    flagged = bool(m["scores"].get("flags"))
    assert flagged == figures.startswith("beats-top-9: ")
    assert figures == m["scores"]["line"] + (" · * not independent: the judge is the served model" if flagged else "")


def test_the_toggle_shows_a_dataset_crops_whole_input_with_its_box(page):
    wait(page, "window.deepvis.atlasShown && window.deepvis.atlasShown.crops === 9", timeout=180)
    first = "#atlas-pane .tops img.top-crop"
    wait(page, loaded(first))
    crop_w = page.evaluate(f"document.querySelector({first!r}).naturalWidth")
    assert crop_w == 5  # conv2's field: 5x5 pixels
    page.check("#synth-whole")
    whole = "#atlas-pane .tops img.top-input"
    assert wait(page, loaded(whole)) == 32
    # the box is drawn in yellow on the whole input
    yellow = page.evaluate(
        "(() => { const i = document.querySelector('#atlas-pane .tops img.top-input'); const c = document.createElement('canvas');"
        " c.width = i.naturalWidth; c.height = i.naturalHeight; const g = c.getContext('2d'); g.drawImage(i, 0, 0);"
        " const d = g.getImageData(0, 0, c.width, c.height).data; let n = 0;"
        " for (let k = 0; k < d.length; k += 4) n += d[k] === 255 && d[k + 1] === 221 && d[k + 2] === 0; return n; })()"
    )
    assert yellow >= 4 * 3  # a box of at least 4x4 pixels: its outline
    # the nine are laid out in three columns of one width, whatever their captions say (a long file name)
    widths = page.evaluate(
        "(() => { const f = [...document.querySelectorAll('#atlas-pane .tops figure')];"
        " const c = f[4].querySelector('figcaption') || f[4].appendChild(document.createElement('figcaption'));"
        " c.textContent = 'a_very_long_dataset_file_name_without_any_break_in_it_at_all.jpeg';"
        " return f.map((x) => Math.round(x.getBoundingClientRect().width)); })()"
    )
    assert len(widths) == 9 and max(widths) - min(widths) <= 1, widths
    assert "whole input with the receptive field boxed" in page.inner_text("#atlas-pane")
    page.uncheck("#synth-whole")
    wait(page, loaded(first))
    assert page.locator("#atlas-pane .tops img.top-input").count() == 0
