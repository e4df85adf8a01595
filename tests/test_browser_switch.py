"""A unit switch in the real page (Playwright + Debian's Chromium): the new unit's map is drawn at once
from the grid the page holds (its tile stretched to its own range), then replaced by the server's
exact map; a gain or gamma boost turns the preview off (the grid is then no affine image of the map)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chromium import CHROMIUM, browser_context, wait, watch_problems
from test_server_utils import LiveServer

if not Path(CHROMIUM).exists():
    pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)


from deepvis.server import ServerConfig, create_app

pytestmark = [pytest.mark.browser, pytest.mark.timeout(300)]

TOKEN = "s" * 43

#: presses ``l`` (the next unit) and reads, in the same task (before any server message can be handled),
#: the unit map canvas's values (the gray colormap's red channel) and the last grid's bytes
PRESS_AND_READ = """(press) => {
  if (press) document.dispatchEvent(new KeyboardEvent('keydown', { key: 'l', bubbles: true }));
  const c = document.getElementById('unit-map');
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  const map = [];
  for (let i = 0; i < d.length; i += 4) map.push(d[i]);
  return { map, h: c.height, w: c.width, grid: Array.from(window.deepvis.lastGrid), shape: window.deepvis.last.grid.shape,
           unitMap: window.deepvis.unitMap, unit: window.deepvis.last.unit };
}"""


@pytest.fixture(scope="module")
def server(default_model):
    with LiveServer(create_app(ServerConfig(model=default_model, token=TOKEN, backprop=False, synthesis=False)), TOKEN) as srv:
        yield srv


def open_still(ctx, server, colormap: str | None = None):
    """A page on layer blocks.2.0.bn2.act, unit 3, showing the sample photo ``coffee`` (a still input:
    no new frame comes meanwhile); (page, its problems)."""
    page = ctx.new_page()
    errors = watch_problems(page)
    page.goto(server.url("/", test="1", layer="blocks.2.0.bn2.act", unit="3"))
    wait(page, "window.deepvis && window.deepvis.ready")
    if colormap:
        page.select_option("#colormap", colormap)
    page.select_option("#sample-select", "coffee")
    return page, errors


def test_a_unit_switch_draws_the_new_units_map_from_the_grid_at_once(server, tmp_path):
    with browser_context(tmp_path / "profile") as ctx:
        page, errors = open_still(ctx, server, colormap="gray")
        wait(
            page,
            "window.deepvis.frames > 0 && window.deepvis.unitMap && window.deepvis.unitMap.exact && window.deepvis.last.unit === 3",
        )
        page.wait_for_timeout(300)
        got = page.evaluate(PRESS_AND_READ, True)
        assert got["unitMap"] == {**got["unitMap"], "unit": 4, "exact": False} and got["unit"] == 3
        n, th, tw = got["shape"]
        tile = np.array(got["grid"], dtype=np.float64)[4 * th * tw : 5 * th * tw]
        lo, hi = tile.min(), tile.max()
        assert hi > lo
        want = np.floor((tile - lo) * 255 / (hi - lo) + 0.5)
        assert (got["h"], got["w"]) == (th, tw)
        assert np.array_equal(np.array(got["map"]), want)  # the gray colormap maps value v to grey level v
        # then the server's exact map of unit 4 (channel-normalized from the activations themselves)
        wait(page, "window.deepvis.unitMap.exact && window.deepvis.last.unit === 4")
        exact = page.evaluate(PRESS_AND_READ, False)
        diff = np.abs(np.array(exact["map"]) - want)
        assert diff.max() <= 255 / (hi - lo) + 1  # the preview differs by the grid's quantization only
        # with a gain boost the grid is no affine image of the map: no preview, the map waits for the server
        page.evaluate("(v) => { const g = document.getElementById('gain'); g.value = v; g.dispatchEvent(new Event('input')); }", "1")
        wait(page, "window.deepvis.last.unit === 4 && document.getElementById('gain-out').textContent === '×2.00'")
        page.wait_for_timeout(300)
        boosted = page.evaluate(PRESS_AND_READ, True)
        assert boosted["unitMap"]["unit"] == 4 and boosted["unitMap"]["exact"]
        wait(page, "window.deepvis.unitMap.unit === 5 && window.deepvis.unitMap.exact")
        assert errors == []


def test_the_next_layer_is_drawn_from_the_last_pass_and_the_page_records_the_switch(server, tmp_path):
    """``o`` shows the next layer of the list at once from the pass that computed the layer shown (which
    captured its neighbours): on a still input that result carries the pass's predictions, where a new
    pass for a newly selected layer would stop at it, without them. The page records the key's time
    and when the new layer was drawn (what benchmarks/bench_live.py times switches with)."""
    with browser_context(tmp_path / "profile") as ctx:
        page, errors = open_still(ctx, server)
        wait(page, "window.deepvis.frames > 0 && window.deepvis.last.layer === 'blocks.2.0.bn2.act' && window.deepvis.last.predictions")
        listed = page.evaluate("[...document.getElementById('layer-select').options].map((o) => o.value)")
        table = {i["name"]: i for i in server.app.state.toolbox.info()["layers"]}
        here = listed.index("blocks.2.0.bn2.act")
        # the next layer that shows other data (layers outputting the same tensor are passed over)
        nxt = next(n for n in listed[here + 1 :] if (table[n]["same_as"] or n) != (table[listed[here]]["same_as"] or listed[here]))
        seq = page.evaluate("window.deepvis.last.seq")
        page.wait_for_timeout(300)
        page.keyboard.press("o")
        wait(page, f"window.deepvis.last.layer === {nxt!r}")
        last = page.evaluate("window.deepvis.last")
        assert last["seq"] == seq and len(last["predictions"]) == 5 and last["unit"] == 3
        key, views = page.evaluate("[window.deepvis.lastKey, window.deepvis.viewChanges]")
        assert key["key"] == "o"
        assert [v["layer"] for v in views if v["at"] >= key["at"]] == [nxt]
        assert errors == []
