"""Known answers for the atlas's crops and views, and no import cycle in the statistics stack."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

import deepvis
from deepvis.atlas import AtlasOptions, build_atlas, open_atlas
from deepvis.atlas.views import signed_display
from deepvis.models import Model, Preprocessing


def _box_model() -> Model:
    """One 3x3 conv unit (all weights 1, zero padding 1) on 8x8 gray inputs: the unit at (0, 0) sees input
    rows/cols -1..1, of which only (0..1, 0..1) exist; its gradient is 1 there."""
    conv = nn.Conv2d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    module = nn.Sequential()
    module.add_module("conv", conv)
    pre = Preprocessing((8, 8), mean=(0.5,), std=(0.5,), interpolation="nearest", crop_pct=1.0, channels=1)
    return Model(module, pre, name="box")


def test_crop_and_view_of_a_known_top_input_are_exact(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    bright = np.full((8, 8), 100, np.uint8)
    bright[0, 0] = 255  # the only bright pixel: the unit's map peaks at (0, 0), the first window that holds it
    Image.fromarray(bright, "L").save(data / "a_bright.png")
    Image.fromarray(np.full((8, 8), 100, np.uint8), "L").save(data / "b_flat.png")
    build_atlas(
        tmp_path / "atlas",
        _box_model(),
        str(data),
        AtlasOptions(layers=("conv",), top=2, batch_size=2, view_mode="gradient", synthesis=None, decode_threads=0),
        progress=False,
    )
    with open_atlas(tmp_path / "atlas") as atlas:
        top = atlas.unit("conv", 0).top
    assert [t.key for t in top] == ["a_bright.png", "b_flat.png"] and top[0].position == (0, 0)
    crop = np.asarray(Image.open(top[0].crop))
    view = np.asarray(Image.open(top[0].view))
    # the field is input rows/cols -1..1: row and column -1 lie outside the image (padded black)
    assert crop.tolist() == [[0, 0, 0], [0, 255, 100], [0, 100, 100]]
    # the view: gray (no influence) outside the image, full positive inside (gradient 1 = its own 99.5th percentile)
    assert view.tolist() == [[128, 128, 128], [128, 255, 255], [128, 255, 255]]


def test_signed_display_scales_by_the_percentile_or_the_maximum():
    g = torch.zeros(3, 10, 20)
    g[0, 0, 0] = 4.0  # one pixel of 200: the 99.5th percentile is 0, so the maximum scales the view
    g[2, 5, 5] = -2.0
    arr = np.asarray(signed_display(g, 3))
    assert arr.shape == (10, 20, 3) and arr[0, 0].tolist() == [255, 128, 128] and arr[5, 5].tolist() == [128, 128, 64]
    assert (arr[1:4, 1:4] == 128).all()
    assert (np.asarray(signed_display(torch.zeros(1, 4, 4), 1)) == 128).all()  # no gradient: all gray


def _imports(path: Path, package: str) -> set[str]:
    """The deepvis modules a module imports (any statement, at any depth), as dotted names."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
            out.add(f"{base}.{node.module}" if node.module else base)
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("deepvis"):
            out.add(node.module)
    return out


def test_no_import_cycle_in_the_statistics_stack():
    root = Path(deepvis.__file__).parent
    graph: dict[str, set[str]] = {}
    for sub in ("stats", "atlas", "analysis"):
        for p in (root / sub).glob("*.py"):
            name = f"deepvis.{sub}" if p.stem == "__init__" else f"deepvis.{sub}.{p.stem}"
            graph[name] = {m for m in _imports(p, f"deepvis.{sub}") if m.startswith(("deepvis.stats", "deepvis.atlas", "deepvis.analysis"))}
    # the statistics engine sits below the atlas and the analysis
    assert not any(
        m.startswith(("deepvis.atlas", "deepvis.analysis")) for n, ms in graph.items() if n.startswith("deepvis.stats") for m in ms
    )
    assert not any(m.startswith("deepvis.analysis") for n, ms in graph.items() if n.startswith("deepvis.atlas") for m in ms)

    def reach(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for m in graph.get(todo.pop(), ()):
                if m not in seen and m != start.rsplit(".", 1)[0]:  # a module may import its package's siblings
                    seen.add(m)
                    todo.append(m)
        return seen

    cyclic = [n for n in graph if "." in n.removeprefix("deepvis.") and n in reach(n)]
    assert cyclic == []
