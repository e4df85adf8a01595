"""Small, dependency-free SVG charts for the report: line charts and histograms.

A :class:`Figure` holds exactly the numbers it plots, so the report's JSON can carry every figure
(``Figure.to_dict``) and the HTML can carry its picture (:func:`render_svg`). The SVG is inline
markup with no external reference; every text is escaped. Each plotted series is drawn with
``data-series`` set to its index, one ``<polyline>`` per run of finite points (a line) or one
``<rect>`` per bin (a histogram), so the picture can be checked against the numbers.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TypeGuard

import numpy as np

__all__ = ["Series", "Figure", "render_svg", "histogram", "COLORS"]

#: series colours, cycled
COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")


@dataclass
class Series:
    """One plotted series: ``y`` values (None = missing) at ``x`` (numbers, or category indices)."""

    name: str
    x: Sequence[float]
    y: Sequence[float | None]
    dashed: bool = False

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "x": list(self.x), "y": list(self.y)}


@dataclass
class Figure:
    """A chart: ``kind`` ``"line"`` or ``"hist"``.

    A line chart's x axis is categorical when ``categories`` is given (series x are indices into it).
    A histogram has ``edges`` (bins + 1) and one series whose y are the bin counts (x: bin centres).
    ``hlines`` are labelled horizontal reference lines (e.g. chance level).
    """

    id: str
    title: str
    kind: str
    x_label: str
    y_label: str
    series: list[Series]
    categories: list[str] | None = None
    edges: list[float] | None = None
    hlines: list[tuple[str, float]] = field(default_factory=list)
    y_min: float | None = None
    y_max: float | None = None

    def to_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "title": self.title,
            "kind": self.kind,
            "x_label": self.x_label,
            "y_label": self.y_label,
            "categories": self.categories,
            "edges": self.edges,
            "hlines": [{"name": n, "y": y} for n, y in self.hlines],
            "series": [s.to_dict() for s in self.series],
        }


def _is_finite(v: object) -> TypeGuard[float]:
    """True for an int or float that is finite; False for None, NaN, infinities and anything else."""
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def histogram(
    fig_id: str,
    title: str,
    values: Sequence[float] | np.ndarray,
    *,
    x_label: str,
    bins: int = 20,
    lo: float | None = None,
    hi: float | None = None,
) -> Figure:
    """A histogram figure of the finite ``values`` (``bins`` equal bins over [lo, hi], default their range)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    a = float(v.min()) if lo is None and len(v) else (lo if lo is not None else 0.0)
    b = float(v.max()) if hi is None and len(v) else (hi if hi is not None else 1.0)
    if b <= a:
        a, b = a - 0.5, a + 0.5
    counts, edges = np.histogram(v, bins=bins, range=(a, b))
    centres = ((edges[:-1] + edges[1:]) / 2).tolist()
    return Figure(fig_id, title, "hist", x_label, "units", [Series("count", centres, [float(c) for c in counts])], edges=edges.tolist())


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step - 1e-9) * step
    ticks = []
    t = start
    while t <= hi + 1e-9 * step:
        ticks.append(round(t, 12))
        t += step
    return ticks


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000 or a < 0.01:
        return f"{v:.1e}"
    return f"{v:.3g}"


def render_svg(fig: Figure, *, width: int = 560, height: int = 280) -> str:
    """The figure as an inline ``<svg>`` element (a string)."""
    esc = html.escape
    left, right, top = 58, 14, 30
    bottom = 78 if fig.categories else 44
    pw, ph = width - left - right, height - top - bottom
    ys = [y for s in fig.series for y in s.y if _is_finite(y)] + [y for _, y in fig.hlines if _is_finite(y)]
    lo = min(ys) if ys else 0.0
    hi = max(ys) if ys else 1.0
    lo = min(lo, 0.0) if fig.y_min is None else fig.y_min
    hi = hi if fig.y_max is None else fig.y_max
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    pad = (hi - lo) * 0.05
    if fig.y_max is None:
        hi += pad
    if fig.kind == "hist":
        assert fig.edges is not None
        x0, x1 = fig.edges[0], fig.edges[-1]
    elif fig.categories:
        x0, x1 = -0.5, len(fig.categories) - 0.5
    else:
        xs = [x for s in fig.series for x in s.x]
        x0, x1 = (min(xs), max(xs)) if xs else (0.0, 1.0)
        if x1 <= x0:
            x0, x1 = x0 - 0.5, x0 + 0.5

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return top + ph - (y - lo) / (hi - lo) * ph

    out = [
        f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{esc(fig.title)}">',
        f'<text x="{left}" y="18" class="ct">{esc(fig.title)}</text>',
        f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" class="pa"/>',
    ]
    for t in _nice_ticks(lo, hi):
        y = sy(t)
        out.append(f'<line x1="{left}" x2="{left + pw}" y1="{y:.1f}" y2="{y:.1f}" class="gr"/>')
        out.append(f'<text x="{left - 5}" y="{y + 4:.1f}" class="tk" text-anchor="end">{esc(_fmt(t))}</text>')
    if fig.categories:
        for i, c in enumerate(fig.categories):
            x = sx(i)
            out.append(f'<text transform="translate({x + 4:.1f},{top + ph + 10}) rotate(-35)" class="tk" text-anchor="end">{esc(c)}</text>')
    else:
        for t in _nice_ticks(x0, x1):
            if x0 - 1e-12 <= t <= x1 + 1e-12:
                out.append(f'<text x="{sx(t):.1f}" y="{top + ph + 16}" class="tk" text-anchor="middle">{esc(_fmt(t))}</text>')
    out.append(f'<text x="{left + pw / 2:.1f}" y="{height - 6}" class="al" text-anchor="middle">{esc(fig.x_label)}</text>')
    out.append(f'<text transform="translate(14,{top + ph / 2:.1f}) rotate(-90)" class="al" text-anchor="middle">{esc(fig.y_label)}</text>')
    for k, (name, y) in enumerate(fig.hlines):
        if _is_finite(y):
            out.append(
                f'<line x1="{left}" x2="{left + pw}" y1="{sy(y):.1f}" y2="{sy(y):.1f}" class="hl" data-hline="{k}"><title>{esc(name)}: {esc(_fmt(y))}</title></line>'
            )
            out.append(f'<text x="{left + pw - 4}" y="{sy(y) - 4:.1f}" class="tk" text-anchor="end">{esc(name)}</text>')
    for k, s in enumerate(fig.series):
        color = COLORS[k % len(COLORS)]
        if fig.kind == "hist":
            assert fig.edges is not None
            for i, v in enumerate(s.y):
                count = v if _is_finite(v) else 0.0
                xa, xb = sx(fig.edges[i]), sx(fig.edges[i + 1])
                out.append(
                    f'<rect data-series="{k}" x="{xa:.1f}" y="{sy(count):.1f}" width="{max(0.5, xb - xa - 0.5):.1f}" height="{sy(lo) - sy(count):.1f}" fill="{color}">'
                    f"<title>{esc(_fmt(fig.edges[i]))}–{esc(_fmt(fig.edges[i + 1]))}: {esc(_fmt(count))}</title></rect>"
                )
            continue
        runs: list[list[tuple[float, float]]] = [[]]
        for px, py in zip(s.x, s.y):
            if _is_finite(py):
                runs[-1].append((px, py))
            elif runs[-1]:
                runs.append([])
        dash = ' stroke-dasharray="5,3"' if s.dashed else ""
        for run in runs:
            if not run:
                continue
            pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in run)
            out.append(f'<polyline data-series="{k}" points="{pts}" fill="none" stroke="{color}" stroke-width="2"{dash}/>')
            for x, y in run:
                label = fig.categories[int(x)] if fig.categories and 0 <= int(x) < len(fig.categories) else _fmt(x)
                out.append(
                    f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{color}"><title>{esc(s.name)} · {esc(label)}: {esc(_fmt(y))}</title></circle>'
                )
    if fig.kind == "line" and len(fig.series) > 1:
        lx, ly = left + 8, top + 6
        for k, s in enumerate(fig.series):
            color = COLORS[k % len(COLORS)]
            out.append(f'<rect x="{lx}" y="{ly + 14 * k}" width="10" height="3" fill="{color}"/>')
            out.append(f'<text x="{lx + 14}" y="{ly + 14 * k + 5}" class="lg">{esc(s.name)}</text>')
    out.append("</svg>")
    return "".join(out)
