"""The report: one self-contained HTML file plus a JSON file with every number.

The HTML opens offline: charts are inline SVG (:mod:`.plots`), thumbnails and cluster maps are
``data:`` URIs, and a Content-Security-Policy forbids any network fetch. All text taken from the
model or the dataset (layer names, file names, labels) is HTML-escaped. Each chart is a
``<figure data-figure="ID">`` whose numbers are ``figures[ID]`` in the JSON, beside the full summary
(:meth:`DatasetSummary.to_dict`).
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import SupportsFloat

import numpy as np
from PIL import Image

from .._fs import atomic_path
from ..errors import InputError
from .clusters import PALETTE, cluster_map
from .plots import Figure, Series, histogram, render_svg
from .summary import DatasetSummary, _jsonable

__all__ = ["report_paths", "build_figures", "report_data", "render_html", "write_report"]

_UNITS_SHOWN = 6


def report_paths(output: str | os.PathLike[str]) -> tuple[Path, Path]:
    """(HTML, JSON) paths for ``-o OUTPUT``: ``x.html`` gives ``x.html`` and ``x.json``; a name without
    an .html/.htm suffix is a folder holding ``report.html`` and ``report.json``."""
    p = Path(output)
    if p.suffix.lower() in (".html", ".htm"):
        return p, p.with_suffix(".json")
    if p.exists() and not p.is_dir():
        raise InputError(f"report output {p} exists and is not a folder: give a .html file name or a folder")
    return p / "report.html", p / "report.json"


def _q(values: np.ndarray, q: float) -> float | None:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(np.quantile(v, q)) if len(v) else None


def build_figures(summary: DatasetSummary) -> list[Figure]:
    """Every chart of the report, in page order, each holding the numbers it plots."""
    figs: list[Figure] = []
    names = summary.layer_names
    cats = list(names)
    idx = list(range(len(names)))
    acts = [summary.activity[n] for n in names]
    figs.append(
        Figure(
            "activity-depth",
            "Sparsity and dead units by depth",
            "line",
            "layer (input → output)",
            "fraction",
            [
                Series("sparsity (fraction not active)", idx, [a.layer_sparsity for a in acts]),
                Series("dead units (fraction of units)", idx, [len(a.dead_units) / a.units if a.units else None for a in acts]),
                Series(
                    "units active on < 10% of inputs", idx, [float(np.mean(a.frac_inputs_active < 0.1)) if a.units else None for a in acts]
                ),
            ],
            categories=cats,
            y_min=0.0,
            y_max=1.0,
        )
    )
    for i, a in enumerate(acts):
        figs.append(histogram(f"activity-{i}-mean", f"{a.layer}: mean activation per unit", a.mean, x_label="mean activation"))
        figs.append(
            histogram(
                f"activity-{i}-sparsity",
                f"{a.layer}: sparsity per unit",
                a.sparsity,
                x_label="fraction of activations not active",
                lo=0.0,
                hi=1.0,
            )
        )
    loc_names = [n for n in names if n in summary.locality]
    if loc_names:
        li = list(range(len(loc_names)))
        locs = [summary.locality[n] for n in loc_names]
        figs.append(
            Figure(
                "locality-depth",
                "Locality of units by depth (quartiles over units)",
                "line",
                "layer (input → output)",
                "locality (1 = a point, 0 = uniform)",
                [
                    Series("median", li, [_q(loc.locality, 0.5) for loc in locs]),
                    Series("25th percentile", li, [_q(loc.locality, 0.25) for loc in locs], dashed=True),
                    Series("75th percentile", li, [_q(loc.locality, 0.75) for loc in locs], dashed=True),
                    Series("median entropy locality", li, [_q(loc.entropy_locality, 0.5) for loc in locs]),
                ],
                categories=loc_names,
            )
        )
        for n, loc in zip(loc_names, locs):
            i = names.index(n)
            figs.append(histogram(f"locality-{i}", f"{n}: locality per unit", loc.locality, x_label="locality", hi=1.0))
    s = summary.sensitivity
    if s is not None:
        series = []
        for kind in s.kinds:
            mean = s.mean_change(kind)
            for e, eps in enumerate(s.epsilons):
                series.append(Series(f"{kind} ε={eps:g}", list(range(len(s.layers))), [float(v) for v in mean[e]], dashed=kind == "random"))
        figs.append(
            Figure(
                "sensitivity-depth",
                f"Relative change ‖Δa‖/‖a‖ (mean over {s.inputs} inputs)",
                "line",
                "layer (input → output)",
                "relative change",
                series,
                categories=list(s.layers),
            )
        )
        figs.append(
            Figure(
                "sensitivity-flips",
                "Prediction flips",
                "line",
                "ε (0–255 pixel steps)",
                "fraction of inputs whose top class changed",
                [Series(kind, list(s.epsilons), [float(v) for v in s.flip_rate(kind)]) for kind in s.kinds],
                y_min=0.0,
                y_max=1.0,
            )
        )
    probed = [n for n in names if n in summary.probes and summary.probes[n].skipped is None]
    if probed:
        chance = max(summary.probes[n].chance for n in probed)
        figs.append(
            Figure(
                "probe-depth",
                "Linear probe accuracy by depth (cross-validated)",
                "line",
                "layer (input → output)",
                "accuracy",
                [Series("accuracy", list(range(len(probed))), [summary.probes[n].accuracy for n in probed])],
                categories=probed,
                hlines=[("chance (majority class)", chance)],
                y_min=0.0,
                y_max=1.0,
            )
        )
    clustered = [n for n in names if n in summary.clusters and summary.clusters[n].ari is not None]
    if clustered:
        figs.append(
            Figure(
                "clusters-agreement",
                "Agreement of k-means clusters with the labels",
                "line",
                "layer (input → output)",
                "score",
                [
                    Series("adjusted Rand index", list(range(len(clustered))), [summary.clusters[n].ari for n in clustered]),
                    Series("purity", list(range(len(clustered))), [summary.clusters[n].purity for n in clustered]),
                ],
                categories=clustered,
                y_max=1.0,
            )
        )
    return figs


def report_data(summary: DatasetSummary, figures: Sequence[Figure] | None = None) -> dict[str, object]:
    """The JSON document: the whole summary plus ``figures`` (id → the plotted numbers)."""
    figs = build_figures(summary) if figures is None else figures
    data = summary.to_dict()
    data["figures"] = _jsonable({f.id: f.to_dict() for f in figs})
    return data


# -- HTML -------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d1d1f;background:#fafafa}
header,main{max-width:1180px;margin:0 auto;padding:0 18px}
header{padding-top:18px}h1{font-size:22px;margin:.2em 0}h2{margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:4px}
h3{margin:1.1em 0 .3em;font-size:16px}p.note{color:#555;margin:.3em 0}
nav a{margin-right:14px}table{border-collapse:collapse;margin:.5em 0}td,th{padding:3px 8px;border-bottom:1px solid #e4e4e4;text-align:right}
td:first-child,th:first-child{text-align:left}figure{display:inline-block;margin:6px 10px 6px 0;vertical-align:top}
.chart{background:#fff;border:1px solid #e2e2e2}.ct{font-size:13px;font-weight:600}.tk{font-size:10px;fill:#444}.al{font-size:11px;fill:#333}
.lg{font-size:10px;fill:#222}.gr{stroke:#eee}.pa{fill:none;stroke:#ccc}.hl{stroke:#d62728;stroke-dasharray:4,3}
.unit{margin:4px 0;display:flex;align-items:center;gap:8px}.lab{flex:0 0 300px;font-size:12px;color:#333}.cl .lab{flex-basis:130px}
.th{display:inline-block;position:relative;width:64px;height:64px;background-size:cover;border:1px solid #bbb;margin-right:3px}
.th i{position:absolute;width:10px;height:10px;margin:-6px 0 0 -6px;border:2px solid #ff0;border-radius:50%;box-shadow:0 0 0 1px #000}
.cl{margin:4px 0;display:flex;align-items:center;gap:8px}.sw{display:inline-block;width:12px;height:12px;border-radius:2px}
details{margin:.4em 0}summary{cursor:pointer;font-weight:600}img.map{border:1px solid #ccc;max-width:100%}
"""

_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _png_uri(image: Image.Image, fmt: str = "PNG", **kw: object) -> str:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=fmt, **kw)
    mime = "image/png" if fmt == "PNG" else "image/jpeg"
    return f"data:{mime};base64,{base64.b64encode(buf.getvalue()).decode('ascii')}"


def _num(v: SupportsFloat | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not np.isfinite(v)):
        return "–"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.{digits}g}"


class _Page:
    """Accumulates HTML parts and the thumbnails they reference (one CSS class per input)."""

    def __init__(self, summary: DatasetSummary) -> None:
        self.s = summary
        self.parts: list[str] = []
        self.used: set[int] = set()

    def add(self, text: str) -> None:
        self.parts.append(text)

    def thumb(
        self, sample: int, value: float | None = None, position: tuple[int, int] | None = None, map_size: tuple[int, int] | None = None
    ) -> str:
        key = self.s.keys.get(sample, str(sample))
        label = self.s.label_of(sample)
        tip = key + (f" ({label})" if label else "") + (f" · {_num(value)}" if value is not None else "")
        marker = ""
        if position is not None and map_size is not None:
            y = (position[0] + 0.5) / map_size[0] * 100
            x = (position[1] + 0.5) / map_size[1] * 100
            marker = f'<i style="left:{x:.1f}%;top:{y:.1f}%"></i>'
        if self.s.thumbnail(sample) is None:
            return f'<span class="th" title="{_esc(tip)}" role="img" aria-label="{_esc(tip)}">{marker}</span>'
        self.used.add(sample)
        return f'<span class="th s{int(sample)}" title="{_esc(tip)}" role="img" aria-label="{_esc(tip)}">{marker}</span>'

    def thumb_css(self) -> str:
        rules = []
        for s in sorted(self.used):
            uri = _png_uri(self.s.thumbnails[s], "JPEG", quality=85)
            rules.append(f'.s{s}{{background-image:url("{uri}")}}')
        return "\n".join(rules)


def _figure(fig: Figure) -> str:
    return f'<figure data-figure="{_esc(fig.id)}">{render_svg(fig)}</figure>'


def _unit_row(page: _Page, layer: str, unit: int, text: str, marker: bool = False) -> str:
    act = page.s.activity[layer]
    map_size = (act.shape[1], act.shape[2]) if len(act.shape) == 3 else None
    thumbs = "".join(
        page.thumb(t.sample, t.value, t.position if marker else None, map_size if marker else None) for t in act.top_inputs(unit)
    )
    return f'<div class="unit"><span class="lab"><b>{_esc(layer)}:{unit}</b> {text}</span>{thumbs}</div>'


def render_html(summary: DatasetSummary, figures: Sequence[Figure] | None = None) -> str:
    """The report as one HTML document (a string)."""
    s = summary
    figs = {f.id: f for f in (build_figures(s) if figures is None else figures)}
    names = s.layer_names
    page = _Page(s)
    add = page.add
    add("<header><h1>deepvis report</h1>")
    add(
        f"<p>Model <b>{_esc(s.model)}</b> on dataset <b>{_esc(s.dataset)}</b>: {len(s.samples)} inputs analysed"
        + (f", {len(s.skipped)} unreadable and skipped" if s.skipped else "")
        + (f", {len(s.classes)} classes" if s.classes else ", no labels")
        + f". Layers: {_esc(', '.join(names))}.</p>"
    )
    if s.classes:
        shown = ", ".join(s.classes[:40]) + (f", … ({len(s.classes) - 40} more)" if len(s.classes) > 40 else "")
        add(f'<p class="note">Classes: {_esc(shown)}</p>')
    for note in s.notes:
        add(f'<p class="note">{_esc(note)}</p>')
    add(
        '<nav><a href="#activity">Unit activity</a><a href="#locality">Locality</a><a href="#sensitivity">Sensitivity</a>'
        '<a href="#transfer">Transferability</a><a href="#clusters">Clusters</a></nav></header><main>'
    )

    # 1. activity
    add('<section id="activity"><h2>1. Unit activity</h2>')
    add(
        '<p class="note">A unit is <em>active</em> where its activation is above 0. Sparsity: the fraction of a unit\'s '
        "activations (over all inputs and positions) that are not active. Dead: never active on any input. "
        "Thumbnails: each unit's top inputs by the maximum of its map, as the model saw them.</p>"
    )
    add("<table><tr><th>layer</th><th>shape</th><th>units</th><th>dead</th><th>sparsity</th><th>exact zeros</th><th>source</th></tr>")
    for n in names:
        a = s.activity[n]
        add(
            f"<tr><td>{_esc(n)}</td><td>{_esc('×'.join(map(str, a.shape)))}</td><td>{a.units}</td><td>{len(a.dead_units)}</td>"
            f"<td>{_num(a.layer_sparsity)}</td><td>{_num(float(np.nanmean(a.frac_zero)) if np.isfinite(a.frac_zero).any() else None)}</td><td>{_esc(a.source)}</td></tr>"
        )
    add("</table>")
    add(_figure(figs["activity-depth"]))
    for i, n in enumerate(names):
        a = s.activity[n]
        add(f"<details><summary>{_esc(n)} — {a.units} units, {len(a.dead_units)} dead, sparsity {_num(a.layer_sparsity)}</summary>")
        add(_figure(figs[f"activity-{i}-mean"]) + _figure(figs[f"activity-{i}-sparsity"]))
        if a.dead_units:
            shown = ", ".join(map(str, a.dead_units[:64])) + (" …" if len(a.dead_units) > 64 else "")
            add(f'<p class="note">Dead units: {_esc(shown)}</p>')
        for by, title in (("mean", "mean activation"), ("max", "maximum activation")):
            add(f"<h3>Most active by {title}</h3>")
            for u in a.most_active(by, _UNITS_SHOWN):
                add(_unit_row(page, n, u, f"mean {_num(a.mean[u])} · max {_num(a.max[u])} · sparsity {_num(a.sparsity[u])}"))
        add("</details>")
    add("</section>")

    # 2. locality
    add('<section id="locality"><h2>2. Locality</h2>')
    loc_names = [n for n in names if n in s.locality]
    if loc_names:
        r = s.settings.get("locality_radius")
        add(
            f'<p class="note">Locality of a unit on an input: the share of its positive activation within {_esc(r)} × the map side '
            "of the peak, rescaled so that a uniform map scores 0 and a single point 1; averaged per unit over inputs, weighted "
            "by the input's peak activation. Entropy locality: 1 − spatial entropy / log(positions). The paper's claim: later "
            "layers hold more local detectors. The ring marks each top input's peak (map cell centre).</p>"
        )
        add(_figure(figs["locality-depth"]))
        for n in loc_names:
            loc = s.locality[n]
            add(f"<details><summary>{_esc(n)} — median locality {_num(_q(loc.locality, 0.5))}</summary>")
            add(_figure(figs[f"locality-{names.index(n)}"]))
            add("<h3>Most local units</h3>")
            for u in loc.most_local(_UNITS_SHOWN):
                add(
                    _unit_row(
                        page,
                        n,
                        u,
                        f"locality {_num(loc.locality[u])} · entropy locality {_num(loc.entropy_locality[u])} · on {int(loc.inputs[u])} inputs",
                        marker=True,
                    )
                )
            add("</details>")
    else:
        add('<p class="note">None of the layers has a spatial map.</p>')
    add("</section>")

    # 3. sensitivity
    add('<section id="sensitivity"><h2>3. Sensitivity to small input changes</h2>')
    sens = s.sensitivity
    if sens is not None:
        add(
            f'<p class="note">Each input value is moved by ε steps of the 0–255 pixel scale: in a random sign direction (dashed) or '
            f"against the predicted class's gradient (FGSM, solid), clipped to valid pixels. Relative change ‖a(x′) − a(x)‖ / ‖a(x)‖ "
            f"per layer, mean over {sens.inputs} inputs. The paper's claim: the last layers are sensitive, the first ones robust.</p>"
        )
        add(_figure(figs["sensitivity-depth"]) + _figure(figs["sensitivity-flips"]))
        add("<table><tr><th>perturbation</th>" + "".join(f"<th>ε={e:g}</th>" for e in sens.epsilons) + "</tr>")
        for kind in sens.kinds:
            add(f"<tr><td>{_esc(kind)} flip rate</td>" + "".join(f"<td>{_num(v)}</td>" for v in sens.flip_rate(kind)) + "</tr>")
        add("</table>")
    else:
        add('<p class="note">Not measured (no perturbation sizes given).</p>')
    add("</section>")

    # 4. transfer
    add('<section id="transfer"><h2>4. Transferability: linear probes</h2>')
    if s.probes:
        add(
            '<p class="note">A logistic-regression probe on each layer\'s spatially averaged activations, standardized; '
            "stratified k-fold cross-validated accuracy. High accuracy early in the network means those layers already "
            "separate the classes — candidates to transfer.</p>"
        )
        if "probe-depth" in figs:
            add(_figure(figs["probe-depth"]))
        add("<table><tr><th>layer</th><th>accuracy</th><th>± std</th><th>chance</th><th>examples</th><th>classes</th><th>folds</th></tr>")
        for n in names:
            p = s.probes.get(n)
            if p is None:
                continue
            if p.skipped:
                add(f"<tr><td>{_esc(n)}</td><td colspan=6>not run: {_esc(p.skipped)}</td></tr>")
                continue
            add(
                f"<tr><td>{_esc(n)}</td><td>{_num(p.accuracy)}</td><td>{_num(p.std)}</td><td>{_num(p.chance)}</td><td>{p.examples}</td><td>{p.classes}</td><td>{p.folds}</td></tr>"
            )
        add("</table>")
    else:
        add('<p class="note">Not run: the dataset has no labels.</p>')
    add("</section>")

    # 5. clusters
    add('<section id="clusters"><h2>5. Clusters</h2>')
    if s.clusters:
        add(
            "<p class=\"note\">k-means on each layer's standardized, spatially averaged activations; each row shows a cluster's "
            "most central inputs. The map is a 2-D projection with a dot per input, coloured by cluster.</p>"
        )
        if "clusters-agreement" in figs:
            add(_figure(figs["clusters-agreement"]))
        for n in names:
            c = s.clusters.get(n)
            if c is None:
                continue
            extra = f", adjusted Rand index {_num(c.ari)}, purity {_num(c.purity)}" if c.ari is not None else ""
            add(f"<details><summary>{_esc(n)} — {c.k} clusters ({c.method.upper()} map){_esc(extra)}</summary>")
            add(f'<img class="map" alt="{_esc("2-D map of " + n)}" src="{_png_uri(cluster_map(c, s.thumbnail), "JPEG", quality=85)}">')
            for k, (reps, size) in enumerate(zip(c.representatives, c.sizes)):
                r, g, b = PALETTE[k % len(PALETTE)]
                thumbs = "".join(page.thumb(x) for x in reps)
                add(
                    f'<div class="cl"><span class="sw" style="background:rgb({r},{g},{b})"></span><span class="lab">cluster {k} · {size} inputs</span>{thumbs}</div>'
                )
            add("</details>")
    else:
        add('<p class="note">Not run.</p>')
    add("</section>")
    timing = ", ".join(f"{k} {v:.1f} s" for k, v in s.timings.items())
    add(
        f'<footer><p class="note">deepvis · {_esc(timing)} · every plotted number is in the JSON file beside this report.</p></footer></main>'
    )
    body = "".join(page.parts)
    title = f"deepvis report — {s.model} on {s.dataset}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{_CSS}\n{page.thumb_css()}</style></head><body>{body}</body></html>\n"
    )


def write_report(summary: DatasetSummary, output: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write the HTML report and its JSON (see :func:`report_paths`); returns their paths.

    Both files are complete or absent: they are written to temporary files and renamed only when
    both are done.
    """
    html_path, json_path = report_paths(output)
    figures = build_figures(summary)
    text = render_html(summary, figures)
    data = json.dumps(report_data(summary, figures), allow_nan=False)
    with atomic_path(json_path) as tj, atomic_path(html_path) as th:
        tj.write_text(data, encoding="utf-8")
        th.write_text(text, encoding="utf-8")
    return html_path, json_path
