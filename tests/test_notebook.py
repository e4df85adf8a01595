"""deepvis in Jupyter (issue 13): results show themselves, deepvis.show / layers / toolbox, progress in kernels,
and the example notebooks executed by a real kernel (nbclient) on small settings."""

from __future__ import annotations

import base64
import html.parser
import http.server
import io
import re
import socket
import threading
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image
from torch import nn

import deepvis
from deepvis import display
from deepvis.models import Preprocessing
from deepvis.notebook import LayerTable, as_model, show_report
from deepvis.notebook.live import _origins_of, notebook_origins
from deepvis.server.security import frame_ancestors
from test_server_utils import tiny_model

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# -- checking what a display method returns ----------------------------------------------------------------


def png_size(data: bytes) -> tuple[int, int]:
    """The (width, height) of PNG bytes, decoded in full by Pillow (not only the header)."""
    assert isinstance(data, bytes) and data[:8] == b"\x89PNG\r\n\x1a\n"
    im = Image.open(io.BytesIO(data))
    im.load()
    assert im.format == "PNG"
    return im.size


@dataclass
class Parsed:
    tags: list[str] = field(default_factory=list)
    images: list[tuple[int, int]] = field(default_factory=list)
    text: str = ""


class _Checker(html.parser.HTMLParser):
    """Checks that every element opened is closed, in order; collects tags, text and <img> sources."""

    VOID = {"img", "br", "hr", "meta", "input", "link", "source", "col"}

    def __init__(self) -> None:
        super().__init__()
        self.stack: list[str] = []
        self.sources: list[str] = []
        self.out = Parsed()

    def handle_starttag(self, tag, attrs):
        self.out.tags.append(tag)
        if tag == "img":
            self.sources.append(dict(attrs)["src"])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.out.tags.append(tag)

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()

    def handle_data(self, data):
        self.out.text += data


def parse_html(text: str) -> Parsed:
    """Parse an HTML fragment: balanced tags, every inline image a valid PNG (decoded; sizes kept)."""
    assert isinstance(text, str) and text.strip()
    p = _Checker()
    p.feed(text)
    p.close()
    assert p.stack == [], f"unclosed elements: {p.stack}"
    for src in p.sources:
        m = re.fullmatch(r"data:image/png;base64,([A-Za-z0-9+/=]+)", src)
        assert m, src[:60]
        p.out.images.append(png_size(base64.b64decode(m.group(1))))
    return p.out


def no_hooks(module: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks for m in module.modules())


@pytest.fixture(scope="module")
def coffee():
    return deepvis.load_image(deepvis.sample_path("coffee"))


# -- the display module ------------------------------------------------------------------------------------


def test_display_helpers_encode_png_and_escape_html():
    arr = (torch.arange(12 * 20 * 3) % 256).to(torch.uint8).reshape(12, 20, 3).numpy()
    assert png_size(display.png_bytes(arr)) == (20, 12)
    assert Image.open(io.BytesIO(display.png_bytes(arr))).convert("RGB").tobytes() == arr.tobytes()
    with pytest.raises(TypeError, match="uint8"):
        display.png_bytes(arr.astype("float32"))
    t = parse_html(display.html_table([("<b>", 1.234567, None)], ("a&b", "x", "y"), caption="c"))
    assert "<b>" in t.text and "1.235" in t.text and "b" not in t.tags
    svg = display.trace_svg([1.0, 2.0, float("nan"), 4.0])
    assert svg.count("<polyline") == 1 and len(re.search(r'points="([^"]+)"', svg).group(1).split()) == 3
    assert parse_html(display.panel(display.img_tag(arr), title="t<")).images == [(20, 12)]


def test_import_deepvis_stays_light():
    import subprocess
    import sys

    code = "import sys, deepvis; deepvis.show; print(sorted(m for m in ('torch', 'IPython', 'fastapi') if m in sys.modules))"
    out = subprocess.run(
        [sys.executable, "-c", "import sys, deepvis; print('torch' in sys.modules)"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "IPython" not in out.stdout  # the display protocol needs no IPython


# -- every result shows itself -----------------------------------------------------------------------------


@pytest.fixture
def tiny():
    return tiny_model(32)


def test_optimization_results_show_the_image_the_trace_and_the_settings(tiny):
    results = deepvis.visualize(tiny, ["conv2:3", "fc:1"], steps=3, size=40)
    r = results[0]
    assert png_size(r._repr_png_()) == (40, 40)
    page = parse_html(r._repr_html_())
    assert page.images == [(40, 40)] and "svg" in page.tags and "polyline" in page.tags
    assert "conv2:3" in page.text and "decay" in page.text  # the settings table
    grid = parse_html(results._repr_html_())
    assert grid.images == [(40, 40), (40, 40)] and grid.tags.count("figcaption") == 2
    assert isinstance(results, list) and results == list(results)
    assert repr(results).startswith("[Result(objective='neuron(conv2:3@center)'")  # plain text as before


def test_activation_and_backprop_views_and_receptive_fields_show_themselves(default_model, coffee):
    from deepvis.activations import activation_views

    view = next(activation_views(default_model, [coffee], "blocks.2", highlight=3))
    w, h = png_size(view._repr_png_())
    assert w >= view.grid.shape[1] and h > view.grid.shape[0]
    x = default_model.preprocess(coffee)
    bp = deepvis.backprop_view(default_model, x, "blocks.3:7", mode="guided")
    assert png_size(bp._repr_png_()) == (224, 224)
    rf = deepvis.receptive_field(default_model, "blocks.3:7@3,3")
    data = rf._repr_png_()
    assert png_size(data) == (224, 224)
    im = Image.open(io.BytesIO(data)).convert("RGB")
    top, left, _, _ = rf.box
    assert im.getpixel((left, top)) == (255, 220, 0)  # the box's corner is drawn
    assert no_hooks(default_model.module)


def test_layer_tables_and_the_look(default_model, coffee):
    table = deepvis.layers(default_model, filter="blocks.3")
    assert isinstance(table, LayerTable) and all("blocks.3" in r.name for r in table)
    page = parse_html(table._repr_html_())
    assert page.tags.count("tr") == len(table) + 1 and "maps" in page.text
    look = deepvis.show(default_model, coffee, layer="blocks.3", unit=7)
    assert look.unit == 7 and look.view.layer.name == "blocks.3"
    w, h = png_size(look._repr_png_())
    assert w > 224 and h >= 224
    page = parse_html(look._repr_html_())
    assert len(page.images) == 2 and "espresso" in page.text
    # no unit: the most active channel on this image, framed in the grid
    look = deepvis.show(default_model, "sample:coffee", layer="blocks.3")
    a = look.view.activations
    assert look.unit == int(a.flatten(1).amax(1).argmax())


def test_show_takes_a_bare_module_with_stated_or_inferred_preprocessing():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 1000)).eval()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    look = deepvis.show(net, "sample:coffee")
    assert look.view.layer.name == "1" and look.model.startswith("custom")
    assert look.view.predictions and look.view.predictions[0].label != "class 0"  # 1000 logits: ImageNet names
    m = as_model(net, Preprocessing(input_size=(32, 32)))
    assert m.module is net and m.preprocessing.input_size == (32, 32)
    assert deepvis.show(m, "sample:coffee", layer="0", unit=1).view.activations.shape == (4, 32, 32)
    # timm's pretrained_cfg says the input
    net.pretrained_cfg = {"input_size": (3, 40, 40), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0}
    assert as_model(net).preprocessing.input_size == (40, 40)
    assert no_hooks(net) and all(torch.equal(before[k], v) for k, v in net.state_dict().items()) and not net.training


def test_atlas_unit_panes_and_report_summaries_show_themselves(default_model, tmp_path):
    import shutil

    from deepvis.analysis import SummaryOptions
    from deepvis.atlas import AtlasOptions, SynthesisOptions

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("coffee", "chelsea", "rocket", "astronaut"):
        p = deepvis.sample_path(name)
        shutil.copy(p, photos / p.name)
    opts = AtlasOptions(
        layers=("blocks.1",), top=2, batch_size=4, units="0-1", synthesis=SynthesisOptions(steps=2, size=32, units_per_batch=2)
    )
    deepvis.build_atlas(tmp_path / "atlas", default_model, str(photos), opts, progress=False)
    with deepvis.open_atlas(tmp_path / "atlas") as atlas:
        rec = atlas.unit("blocks.1", 1)
    page = parse_html(rec._repr_html_())
    assert len(page.images) == 1 + 2 * len(rec.top) and "blocks.1:1" in page.text and "mean of maxima" in page.text
    summary = deepvis.summarize(
        default_model,
        deepvis.open_dataset(str(photos)),
        SummaryOptions(layers=("blocks.1", "blocks.2"), epsilons=(), cluster_k=2),
        progress=False,
    )
    page = parse_html(summary._repr_html_())
    assert page.tags.count("tr") == 3 and page.tags.count("svg") == 2 and "blocks.2" in page.text
    html_path, _ = deepvis.write_report(summary, tmp_path / "report")
    frame = parse_html(show_report(html_path)._repr_html_())
    assert frame.tags[-1] == "iframe" and "a" in frame.tags


# -- progress in kernels -----------------------------------------------------------------------------------


def test_progress_bars_show_in_a_kernel(monkeypatch):
    import sys
    import types

    from deepvis import _progress

    assert not _progress.in_kernel()
    assert _progress.progress_bar(range(3)).disable  # not a terminal, not a kernel: hidden as before

    class ZMQInteractiveShell:  # what ipykernel's shell is called
        pass

    fake = types.SimpleNamespace(get_ipython=lambda: ZMQInteractiveShell())
    monkeypatch.setitem(sys.modules, "IPython", fake)
    assert _progress.in_kernel()
    monkeypatch.setattr(_progress.importlib.util, "find_spec", lambda name: None)  # no ipywidgets: the text bar
    bar = _progress.progress_bar(range(3))
    assert not bar.disable
    bar.close()


# -- the live toolbox in a cell ----------------------------------------------------------------------------


def test_frame_ancestors_accepts_only_plain_origins():
    assert frame_ancestors(()) == "frame-ancestors 'none'"
    assert frame_ancestors(("http://localhost:8888", "https://x.org")) == "frame-ancestors http://localhost:8888 https://x.org"
    for bad in ("*", "http://a.org/path", "http://a.org; script-src *", "'self'", "javascript:x", "http://a.org "):
        with pytest.raises(ValueError):
            frame_ancestors((bad,))
    assert _origins_of("http://localhost:8888/lab") == ["http://localhost:8888", "http://127.0.0.1:8888"]
    assert _origins_of("https://hub.example.org/") == ["https://hub.example.org"]


def test_notebook_origins_come_from_jupyters_runtime_files(monkeypatch, tmp_path):
    import json

    import jupyter_core.paths

    monkeypatch.delenv("DEEPVIS_NOTEBOOK_ORIGIN", raising=False)
    monkeypatch.setattr(jupyter_core.paths, "jupyter_runtime_dir", lambda: str(tmp_path))
    (tmp_path / "jpserver-1.json").write_text(json.dumps({"url": "http://localhost:8890/"}))
    (tmp_path / "jpserver-2.json").write_text("not json")
    assert notebook_origins() == ("http://localhost:8890", "http://127.0.0.1:8890")
    monkeypatch.setenv("DEEPVIS_NOTEBOOK_ORIGIN", "http://127.0.0.1:9999")
    assert notebook_origins() == ("http://127.0.0.1:9999",)


def _port_free(port: int) -> bool:
    """Nothing listens on 127.0.0.1:``port`` any more, and a server may listen there again (connections the
    old server closed may linger in TIME_WAIT: servers bind with SO_REUSEADDR, as deepvis does)."""
    with socket.socket() as c:
        if c.connect_ex(("127.0.0.1", port)) == 0:
            return False
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_toolbox_serves_the_page_framed_only_for_the_notebook_and_stops_cleanly(tiny):
    default_model = tiny
    origin = "http://localhost:8888"
    tb = deepvis.toolbox(default_model, origin=origin, synthesis=False)
    try:
        assert tb.running and tb.model is default_model  # shared, not copied
        r = httpx.get(tb.url, timeout=30)
        assert r.status_code == 200
        assert "x-frame-options" not in r.headers
        assert r.headers["content-security-policy"].endswith(f"frame-ancestors {origin}")
        api = httpx.get(f"http://127.0.0.1:{tb.port}/api/health?token={tb.token}", timeout=30)
        assert api.status_code == 200 and "x-frame-options" not in api.headers
        assert api.headers["content-security-policy"] == f"frame-ancestors {origin}"
        # the checks of deepvis serve stay
        assert httpx.get(f"http://127.0.0.1:{tb.port}/", timeout=30).status_code == 403
        assert httpx.get(tb.url, headers={"host": "evil.example"}, timeout=30).status_code == 403
        page = parse_html(tb._repr_html_())
        assert "iframe" in page.tags
        # re-running the cell replaces the old toolbox
        second = deepvis.toolbox(default_model, origin=origin, synthesis=False)
        assert tb.stopped and _port_free(tb.port) and second.running
        assert "stopped" in parse_html(tb._repr_html_()).text
        tb = second
    finally:
        tb.stop()
    assert _port_free(tb.port) and not tb.running
    assert no_hooks(default_model.module)
    assert "stopped" in tb._repr_html_()
    # no origin known: served, not framable (as deepvis serve), shown as a link
    tb = deepvis.toolbox(default_model, origin=(), synthesis=False)
    try:
        r = httpx.get(tb.url, timeout=30)
        assert r.headers["x-frame-options"] == "DENY" and r.headers["content-security-policy"].endswith("frame-ancestors 'none'")
        assert "iframe" not in parse_html(tb._repr_html_()).tags
    finally:
        tb.stop()
    with pytest.raises(ValueError):
        deepvis.toolbox(default_model, origin="http://a.org/x")


# -- a real Chromium: framed from the notebook's origin, refused from another ------------------------------


class _Pages:
    """Static pages on 127.0.0.1:``port`` (one origin) served by http.server in a thread."""

    def __init__(self, root: Path) -> None:
        handler = lambda *a, **kw: http.server.SimpleHTTPRequestHandler(*a, directory=str(root), **kw)
        http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> _Pages:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.mark.browser
@pytest.mark.timeout(300)
def test_chromium_frames_the_toolbox_from_the_notebook_origin_only(tiny, tmp_path):
    default_model = tiny
    from chromium import CHROMIUM, launch

    if not Path(CHROMIUM).exists():
        pytest.skip(f"Debian's Chromium is not installed at {CHROMIUM}")
    from playwright.sync_api import sync_playwright

    from test_browser import wait

    with _Pages(tmp_path) as notebook, _Pages(tmp_path) as other:
        tb = deepvis.toolbox(default_model, origin=f"http://127.0.0.1:{notebook.port}", synthesis=False)
        try:
            src = tb.url + "&test=1"
            ws = f"ws://127.0.0.1:{tb.port}/ws?token={tb.token}"
            (tmp_path / "frame.html").write_text(
                f"<!doctype html><iframe id='tb' src='{src}' allow='camera' width='1200' height='800'></iframe>"
                f"<script>window.ws = 'pending'; const s = new WebSocket('{ws}');"
                "s.onopen = () => { window.ws = 'open'; }; s.onclose = (e) => { if (window.ws !== 'open') window.ws = 'refused ' + e.code; };</script>"
            )
            with sync_playwright() as p:
                ctx = launch(p, tmp_path / "profile")
                try:
                    page = ctx.new_page()
                    page.goto(f"http://127.0.0.1:{notebook.port}/frame.html")
                    frame = page.frame_locator("#tb")
                    inner = next(f for f in page.frames if f.url.startswith(tb.url))
                    wait(inner, "window.deepvis && window.deepvis.ready", 120)
                    frame.locator("#src-camera").click()
                    wait(inner, "window.deepvis.liveFrames >= 5", 120)  # live updates inside the frame
                    # another origin: the frame is blocked and its own WebSocket refused (Origin check)
                    bad = ctx.new_page()
                    bad.goto(f"http://127.0.0.1:{other.port}/frame.html")
                    wait(bad, "window.ws !== 'pending'", 60)
                    assert bad.evaluate("window.ws").startswith("refused")
                    blocked = [f for f in bad.frames if f is not bad.main_frame]
                    assert blocked and all(f.url.startswith("chrome-error://") for f in blocked)  # refused by frame-ancestors
                    # the notebook's own page may open the socket only as the framed page does: its origin differs too
                    assert page.evaluate("window.ws").startswith("refused")
                finally:
                    ctx.close()
        finally:
            tb.stop()
    assert _port_free(tb.port) and no_hooks(default_model.module)


# -- the example notebooks, executed by a real kernel ------------------------------------------------------

#: the small settings injected after each notebook's "parameters" cell
SMALL = {
    "01_quickstart.ipynb": "STEPS = 3\nSIZE = 64",
    "02_your_own_model.ipynb": "SIZE = 32",
    "03_deep_visualization.ipynb": "STEPS = 2\nSIZE = 48\nUNITS = ['blocks.4:17', 'logits:281']\nPRESETS = ('3',)",
    "04_atlas_and_report.ipynb": "LAYERS = ('blocks.1',)\nUNITS = '0-1'\nSTEPS = 2\nSIZE = 32",
    "05_vit.ipynb": "SIZE = 224\nSTEPS = 2",
}


def _rich(cell) -> set[str]:
    return {k for o in cell.outputs for k in o.get("data", {}) if k != "text/plain"}


def test_every_example_notebook_is_stored_without_outputs():
    import nbformat

    names = sorted(p.name for p in EXAMPLES.glob("*.ipynb"))
    assert names == sorted(SMALL)
    for name in names:
        nb = nbformat.read(EXAMPLES / name, as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") and c.get("execution_count") is None for c in nb.cells if c.cell_type == "code"), name
        assert sum("parameters" in c.metadata.get("tags", []) for c in nb.cells) == 1, name


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """One IPython kernel for the example notebooks, started once: a kernel's start and its first
    ``import torch`` cost seconds per notebook. Each notebook then runs from an empty namespace (see
    :func:`_fresh_namespace`)."""
    from jupyter_client.manager import AsyncKernelManager
    from nbclient.util import run_sync

    km = AsyncKernelManager(kernel_name="python3")
    run_sync(km.start_kernel)(cwd=str(tmp_path_factory.mktemp("kernel")))
    try:
        yield km
    finally:
        run_sync(km.shutdown_kernel)(now=True)


def _fresh_namespace(cwd: Path) -> str:
    """The hidden first cell of a notebook run in the shared kernel: into its own folder, then ``%reset -f``
    (every name the notebooks run before defined is gone: a name a notebook uses without defining it fails as
    in a new kernel; the modules stay imported, which is the time saved: a new kernel imports torch again)."""
    return f"import os\nos.chdir({str(cwd)!r})\n%reset -f"


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", sorted(SMALL))
def test_example_notebook_runs_in_a_kernel(name, tmp_path, kernel):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(EXAMPLES / name, as_version=4)
    i = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    nb.cells.insert(i + 1, nbformat.v4.new_code_cell(SMALL[name]))
    nb.cells.insert(0, nbformat.v4.new_code_cell(_fresh_namespace(tmp_path)))
    client = NotebookClient(nb, km=kernel, timeout=300, resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    finally:
        if client.kc is not None:
            client.kc.stop_channels()
    reset, *rest = nb.cells
    assert reset.outputs == [], reset.outputs  # the reset itself ran cleanly
    nb.cells = rest
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    shows = [
        c
        for c in code
        if re.search(
            r"^(deepvis\.(show|layers|visualize|backprop_view|receptive_field)|results|atlas\.unit|summary|show_report|next)",
            c.source.splitlines()[-1],
        )
    ]
    assert shows, name
    for c in shows:
        assert _rich(c) & {"image/png", "text/html"}, c.source
    for c in code:
        for o in c.outputs:
            if "image/png" in o.get("data", {}):
                png_size(base64.b64decode(o["data"]["image/png"]))
            if "text/html" in o.get("data", {}):
                parse_html(o["data"]["text/html"])
    if name == "01_quickstart.ipynb":
        # progress in a kernel: tqdm's notebook widget (ipywidgets, in the test extra) or the text bar on stderr
        opt = next(c for c in code if c.source.startswith("results = deepvis.visualize"))
        assert any("application/vnd.jupyter.widget-view+json" in o.get("data", {}) or "optimize" in o.get("text", "") for o in opt.outputs)
        # the toolbox cell, then stopped: its cell says so
        tb_cell = next(c for c in code if c.source.startswith("tb = deepvis.toolbox"))
        texts = [o.get("data", {}).get("text/html", "") for o in tb_cell.outputs] + [
            o.get("data", {}).get("text/html", "") for o in code[-1].outputs
        ]
        assert any("deepvis toolbox" in t for t in texts) and "stopped" in texts[-1]
