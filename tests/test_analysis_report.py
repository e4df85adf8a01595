"""The summary over a dataset, the HTML/JSON report (valid, offline, every figure in the JSON) and `deepvis report`."""

from __future__ import annotations

import html
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deepvis.analysis import SummaryOptions, default_layers, report_paths, select_indices, summarize, write_report
from deepvis.cli import main
from deepvis.datasets import open_dataset
from deepvis.errors import DeepvisError, LayerError
from deepvis.models import Model, Preprocessing
from helpers import assert_unchanged, snapshot

ODD = '<img src=x onerror=alert(1)> & "q"'  # a class folder name that must come out escaped


def _tiny_model() -> Model:
    torch.manual_seed(0)
    module = nn.Sequential()
    module.add_module("conv1", nn.Conv2d(3, 8, 3, stride=2, padding=1))
    module.add_module("relu1", nn.ReLU())
    module.add_module("conv2", nn.Conv2d(8, 12, 3, stride=2, padding=1))
    module.add_module("relu2", nn.ReLU())
    module.add_module("pool", nn.AdaptiveAvgPool2d(1))
    module.add_module("flat", nn.Flatten())
    module.add_module("fc", nn.Linear(12, 3))
    pre = Preprocessing((32, 32), (0.5,) * 3, (0.5,) * 3, crop_pct=1.0)
    return Model(module, pre, name="tiny", class_names=["a", "b", "c"])


def _dataset(root: Path, labelled: bool = True) -> Path:
    rng = np.random.default_rng(0)
    colours = {"red": (200, 30, 30), "blue": (30, 30, 200), ODD: (30, 180, 30)}
    for c, rgb in colours.items():
        for i in range(5):
            arr = np.clip(np.array(rgb)[None, None] + rng.normal(0, 40, (24, 24, 3)), 0, 255).astype(np.uint8)
            folder = root / c if labelled else root
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(folder / f"{c[:4].strip('<')}_{i}.png")
    return root


@pytest.fixture(scope="module")
def tiny_summary(tmp_path_factory):
    model = _tiny_model()
    model.module.train()
    before = snapshot(model.module)
    ds = open_dataset(_dataset(tmp_path_factory.mktemp("data")))
    summary = summarize(
        model,
        ds,
        SummaryOptions(
            layers=("relu2", "conv1", "relu1", "fc"),
            epsilons=(1, 4),
            sensitivity_images=6,
            cluster_k=3,
            probe_folds=3,
            batch_size=4,
            decode_threads=0,
            embedding="pca",
        ),
        progress=False,
    )
    assert_unchanged(model.module, before)
    return summary


def test_summary_of_a_labelled_folder(tiny_summary):
    s = tiny_summary
    assert s.layer_names == ["conv1", "relu1", "relu2", "fc"]  # depth order
    assert len(s.samples) == 15 and s.skipped == [] and sorted(s.classes) == sorted(["red", "blue", ODD])
    assert set(s.activity) == {"conv1", "relu1", "relu2", "fc"} and set(s.locality) == {"conv1", "relu1", "relu2"}
    assert s.sensitivity is not None and s.sensitivity.layers == ["conv1", "relu1", "relu2", "fc", "logits"] and s.sensitivity.inputs == 6
    # solid colours: the classes are linearly separable from the first layer on
    assert all(s.probes[n].skipped is None and s.probes[n].accuracy > 0.9 for n in ("conv1", "relu1"))
    assert set(s.clusters) == set(s.layer_names) and s.clusters["conv1"].k == 3
    view = s.layer_summary("relu2")
    json.dumps(view, allow_nan=False)
    assert view["units"] == 12 and view["probe"]["accuracy"] == s.probes["relu2"].accuracy
    assert len(view["most_active_by_mean"]) == 8 and view["most_active_by_mean"][0]["top"][0]["key"]
    assert set(view["sensitivity"]["mean_change"]) == {"random", "adversarial"}
    with pytest.raises(LayerError):
        s.layer_summary("nope")


class _Checker(HTMLParser):
    VOID = {"meta", "img", "br", "hr", "input", "link", "source", "wbr", "col", "area", "base", "embed", "param", "track"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: dict[str, int] = {}
        self.urls: list[str] = []
        self.figures: dict[str, dict[str, list[int]]] = {}
        self.current: str | None = None
        self.text: list[str] = []
        self.decl: list[str] = []

    def handle_decl(self, decl: str) -> None:
        self.decl.append(decl)

    def _attrs(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        self.tags[tag] = self.tags.get(tag, 0) + 1
        for k in ("src", "href", "xlink:href", "action", "data", "poster"):
            if a.get(k) is not None:
                self.urls.append(a[k])  # type: ignore[arg-type]
        if tag == "figure":
            self.current = a["data-figure"]
            self.figures[self.current] = {}  # type: ignore[index]
        if self.current and "data-series" in a:
            k = a["data-series"]
            counts = self.figures[self.current].setdefault(k, [0])  # type: ignore[arg-type]
            counts[0] += len(a["points"].split()) if tag == "polyline" else 1  # type: ignore[union-attr]

    def handle_starttag(self, tag, attrs):
        self._attrs(tag, attrs)
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self._attrs(tag, attrs)

    def handle_endtag(self, tag):
        if tag == "figure":
            self.current = None
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1] if self.stack else 'nothing'}")
            return
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def test_report_is_valid_offline_html_and_json_holds_every_figure(tiny_summary, tmp_path):
    html_path, json_path = write_report(tiny_summary, tmp_path / "out" / "r.html")
    assert (html_path, json_path) == (tmp_path / "out" / "r.html", tmp_path / "out" / "r.json")
    text = html_path.read_text(encoding="utf-8")
    p = _Checker()
    p.feed(text)
    p.close()
    assert p.decl == ["DOCTYPE html"] and p.errors == [] and p.stack == []
    assert p.tags["html"] == p.tags["head"] == p.tags["body"] == 1
    # offline: every reference is inline, nothing names a network location
    assert p.urls and all(u.startswith(("data:", "#")) for u in p.urls), [u[:40] for u in p.urls if not u.startswith(("data:", "#"))]
    assert not re.search(r"(?i)(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text.replace("data:", ""))
    assert all(u.startswith("data:") for u in re.findall(r'url\("?([^")]*)', text))
    assert "default-src 'none'" in text  # the CSP forbids fetches in browsers
    # text from the dataset is escaped
    assert ODD not in text and html.escape(ODD) in text and ODD in "".join(p.text)
    # every figure in the page is in the JSON with the numbers drawn
    data = json.loads(json_path.read_text(encoding="utf-8"), parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert set(p.figures) == set(data["figures"]) and len(p.figures) >= 10
    for fid, drawn in p.figures.items():
        fig = data["figures"][fid]
        for k, series in enumerate(fig["series"]):
            if fig["kind"] == "hist":
                assert drawn[str(k)][0] == len(series["y"]) == len(fig["edges"]) - 1, fid
            else:
                finite = [y for y in series["y"] if y is not None]
                assert drawn.get(str(k), [0])[0] == len(finite), fid
    assert data["figures"]["probe-depth"]["series"][0]["y"] == [tiny_summary.probes[n].accuracy for n in tiny_summary.layer_names]
    sens = data["figures"]["sensitivity-depth"]["series"]
    assert len(sens) == 4 and sens[0]["y"] == pytest.approx(tiny_summary.sensitivity.mean_change("random")[0].tolist())
    # and the full summary is there too
    assert data["activity"]["relu1"]["sparsity"] == pytest.approx(tiny_summary.activity["relu1"].sparsity.tolist())
    assert len(data["samples"]) == 15 and data["clusters"]["fc"]["k"] == 3


def test_report_output_is_all_or_nothing(tiny_summary, tmp_path, monkeypatch):
    assert report_paths(tmp_path / "folder") == (tmp_path / "folder" / "report.html", tmp_path / "folder" / "report.json")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DeepvisError):
        report_paths(tmp_path / "file")
    real = Path.write_text

    def failing(self, data, *a, **k):
        if self.suffix == ".html":
            raise OSError("disk full")
        return real(self, data, *a, **k)

    monkeypatch.setattr(Path, "write_text", failing)
    with pytest.raises(OSError):
        write_report(tiny_summary, tmp_path / "broken" / "r.html")
    assert list((tmp_path / "broken").iterdir()) == []


def test_unlabelled_dataset_skips_probes_and_big_datasets_load_thumbnails_later(tmp_path, monkeypatch):
    import deepvis.analysis.summary as summary_module

    monkeypatch.setattr(summary_module, "THUMBNAIL_CACHE_LIMIT", 5)  # 6 inputs: too many to keep every thumbnail
    ds = open_dataset(_dataset(tmp_path / "flat", labelled=False))
    s = summarize(
        _tiny_model(),
        ds,
        SummaryOptions(layers=("relu1",), max_images=6, epsilons=(), cluster_k=2, decode_threads=0, embedding="pca"),
        progress=False,
    )
    assert s.probes == {} and s.sensitivity is None and any("no labels" in n for n in s.notes)
    assert s.samples == select_indices(15, 6) == [0, 3, 6, 8, 11, 14]
    assert "relu1" in s.clusters and "fc" not in s.clusters
    assert s.thumbnails == {}
    html_path, _ = write_report(s, tmp_path / "r.html")
    text = html_path.read_text(encoding="utf-8")
    assert "Not run: the dataset has no labels" in text
    shown = {int(m) for m in re.findall(r'class="th s(\d+)"', text)}
    assert shown and shown <= set(s.samples) and shown <= set(s.thumbnails)  # loaded when the report needed them
    assert all(f".s{i}{{background-image:url(" in text for i in shown)
    assert s.thumbnails[min(shown)].size == (64, 64)


def test_default_layers_are_the_stage_outputs(default_model):
    assert default_layers(default_model) == ["blocks.0", "blocks.1", "blocks.2", "blocks.4", "bn2", "logits"]
    assert default_layers(_tiny_model()) == ["relu1", "relu2", "logits"]


def test_cli_report_on_demo_with_the_default_model(tmp_path, capsys):
    out = tmp_path / "rep" / "demo.html"
    args = [
        "report",
        "demo",
        "-o",
        out,
        "--max-images",
        "46",
        "--epsilons",
        "2",
        "--sensitivity-images",
        "4",
        "--clusters",
        "4",
        "--folds",
        "2",
        "--map",
        "pca",
        "--json",
        "--no-progress",
    ]
    code = main([str(a) for a in args])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    printed = json.loads(stdout)
    assert printed["images"] == 46 and [r["layer"] for r in printed["layers"]] == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
        "blocks.4",
        "bn2",
        "logits",
    ]
    data = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    assert out.stat().st_size > 50_000
    loc = data["figures"]["locality-depth"]["series"][0]["y"]
    assert loc[-1] > loc[0]  # the paper's claim on real photos: the last conv stage is more local than the first
    adv = data["sensitivity"]["mean_change"]["adversarial"][0]
    assert adv[-1] > adv[0]  # and the last layers move more than the first under an FGSM step
    probe = data["probes"]["bn2"]
    assert probe["classes"] == 23 and probe["accuracy"] > 3 * probe["chance"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--epsilons", "a,b"], "--epsilons"),
        (["--layers", "blocks.nope"], "no layer named"),
        (["--max-images", "0"], "--max-images"),
        (["--atlas", "nowhere"], "is not an atlas"),
        (["--cluster-layers", "blocks.3"], "not among the summarized layers"),
        (["--folds", "1"], "--folds"),
        (["--ray-address", "auto"], "--ray-address needs --engine ray"),
    ],
)
def test_cli_report_errors_exit_2_without_output(tmp_path, capsys, extra, message):
    out = tmp_path / "r.html"
    code = main(["report", "demo", "-o", str(out), "--no-progress", *extra])
    _, err = capsys.readouterr()
    assert code == 2 and message in err and err.count("\n") == 1
    assert not out.exists() and not out.with_suffix(".json").exists()


def test_cli_report_missing_dataset(tmp_path, capsys):
    code = main(["report", str(tmp_path / "none"), "-o", str(tmp_path / "r.html")])
    assert code == 2 and "dataset not found" in capsys.readouterr().err


def test_atlas_statistics_are_reused(tmp_path):
    from deepvis.atlas import AtlasOptions, build_atlas

    model = _tiny_model()
    ds = open_dataset(_dataset(tmp_path / "data"))
    build_atlas(
        tmp_path / "atlas",
        model,
        ds,
        AtlasOptions(layers=("relu1",), top=4, batch_size=4, views=False, synthesis=None, decode_threads=0),
        progress=False,
    )
    opts = SummaryOptions(layers=("relu1", "relu2"), epsilons=(), cluster_layers=(), decode_threads=0, thumbnails=False)
    plain = summarize(model, ds, opts, progress=False)
    reused = summarize(model, ds, opts.replace(atlas=tmp_path / "atlas"), progress=False)
    a, b = plain.activity["relu1"], reused.activity["relu1"]
    assert b.source == "atlas" and reused.activity["relu2"].source == "computed"
    assert b.images == 15 and b.dead_units == a.dead_units
    for name in ("mean", "mean_max", "max", "sparsity", "frac_inputs_active"):
        assert getattr(b, name) == pytest.approx(getattr(a, name), rel=1e-6, abs=1e-9), name
    for u in b.most_active("max", 6):
        assert [t.sample for t in b.top_inputs(u)] == [t.sample for t in a.top_inputs(u)]
    assert any("read from atlas" in n for n in reused.notes)
    other = open_dataset(_dataset(tmp_path / "other", labelled=False))
    with pytest.raises(DeepvisError, match="dataset"):
        summarize(model, other, opts.replace(layers=("relu1",), atlas=tmp_path / "atlas"), progress=False)


def test_summary_options_are_checked_in_one_place_and_recorded(tiny_summary):
    with pytest.raises(DeepvisError) as err:
        SummaryOptions(top_k=0, locality_radius=2.0, perturbations=("nope",))
    assert all(w in str(err.value) for w in ("top_k", "locality_radius", "'nope'"))
    opts = SummaryOptions(layers=["a", "b", "a"], epsilons=[1, 2])
    assert opts.layers == ("a", "b") and opts.epsilons == (1.0, 2.0) and opts.replace(seed=3).seed == 3
    recorded = tiny_summary.settings
    assert recorded["layers"] == ["conv1", "relu1", "relu2", "fc"] and recorded["engine"] == "local"
    assert {k: v for k, v in recorded.items() if k not in ("layers", "input_size", "device", "engine")} == {
        k: v
        for k, v in SummaryOptions(
            **{
                k: recorded[k]
                for k in ("epsilons", "sensitivity_images", "cluster_k", "probe_folds", "batch_size", "decode_threads", "embedding")
            }
        )
        .to_dict()
        .items()
        if k != "layers"
    }


def test_the_report_json_records_the_model_identity(tmp_path):
    from deepvis.analysis import SummaryOptions, summarize
    from deepvis.datasets import open_dataset
    from deepvis.models import Model, Preprocessing, model_identity

    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3)
    )
    model = Model(net, Preprocessing((32, 32)))
    ds = open_dataset("demo")
    s = summarize(model, ds, SummaryOptions(layers=("1",), max_images=4, epsilons=(), cluster_layers=()))
    rec = s.to_dict()["identity"]
    assert rec == model_identity(model) and rec["input_size"] == [32, 32] and len(rec["model_hash"]) == 16


class _WithConstant(nn.Module):
    """A conv branch that sees the input and ``const``, a learned (N, 6) vector that does not (a class
    token before the first block is such a layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.token = nn.Parameter(torch.linspace(-1, 1, 6))
        self.const = nn.Identity()
        self.fc = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.const(self.token.expand(x.shape[0], -1))
        return self.fc(torch.cat([self.conv(x).mean((2, 3)), t], 1))


def test_a_layer_that_does_not_depend_on_the_input_is_said_so_and_not_probed_or_clustered(tmp_path, recwarn):
    torch.manual_seed(0)
    model = Model(
        _WithConstant().eval(), Preprocessing((32, 32), (0.5,) * 3, (0.5,) * 3, crop_pct=1.0), name="c", class_names=["a", "b", "c"]
    )
    ds = open_dataset(_dataset(tmp_path / "data"))
    opts = SummaryOptions(layers=("conv", "const"), epsilons=(), cluster_k=3, probe_folds=3, decode_threads=0, embedding="pca")
    s = summarize(model, ds, opts, progress=False)
    assert [n for n in s.notes if "does not depend on the input" in n] == [
        "const does not depend on the input (the same values for all 15 inputs, e.g. a class token before the first block): "
        "left out of the probes and clusters; its dead units and sparsity describe a constant"
    ]
    assert set(s.probes) == {"conv"} and set(s.clusters) == {"conv"}
    assert not [w for w in recwarn if "clusters" in str(w.message) or "invalid value" in str(w.message)]
    paths = write_report(s, tmp_path / "r.html")
    assert "does not depend on the input" in Path(paths[0]).read_text()
