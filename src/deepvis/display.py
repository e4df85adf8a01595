"""How results show themselves in Jupyter (IPython's display protocol), written once.

Every result class of the library (optimization results, backprop views, activation views, atlas unit
panes, receptive fields, layer tables, report summaries) has small ``_repr_png_`` / ``_repr_html_``
methods that build their picture or table with the library's own drawing and hand it to this module:
PNG encoding, ``<img>`` tags with data URIs, escaped HTML tables, a small SVG trace and the frame that
holds them. Nothing here imports IPython (the protocol is only method names) nor torch: this module sits
in the bottom row of docs/architecture.md (stdlib, numpy and Pillow), so every result class may use it.
Plain ``print``/``repr`` of the results is unchanged.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Sequence

import numpy as np
from PIL import Image

__all__ = ["png_bytes", "img_tag", "html_table", "trace_svg", "panel", "fmt"]

#: the frame of every result's HTML (a class name that front ends do not style)
_PANEL = '<div class="deepvis-result" style="display:inline-block;font:12px/1.4 system-ui,sans-serif;margin:2px 0">{}</div>'


def _image(image: Image.Image | np.ndarray) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    arr = np.asarray(image)
    if arr.dtype != np.uint8:
        raise TypeError(f"display pictures are uint8 arrays (H, W) or (H, W, 3|4); got {arr.dtype} (convert with deepvis.pixels.to_uint8)")
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    return Image.fromarray(arr)


def png_bytes(image: Image.Image | np.ndarray) -> bytes:
    """A picture as PNG file bytes.

    Args:
        image: a PIL image, or a uint8 array (H, W), (H, W, 1), (H, W, 3) or (H, W, 4).
    """
    im = _image(image)
    if im.mode not in ("1", "L", "LA", "P", "RGB", "RGBA"):
        im = im.convert("RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def img_tag(image: Image.Image | np.ndarray | bytes, *, alt: str = "", width: int | None = None) -> str:
    """An ``<img>`` with the picture inline (PNG data URI); ``width`` in CSS pixels (None: natural size).
    ``image`` may be PNG file bytes already. Pixel art (activation grids) stays sharp when enlarged."""
    data = base64.b64encode(image if isinstance(image, bytes) else png_bytes(image)).decode("ascii")
    w = f' width="{int(width)}"' if width else ""
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}"{w} style="image-rendering:pixelated;max-width:100%">'


def fmt(v: object, digits: int = 4) -> str:
    """A table cell's text: floats with ``digits`` significant digits, None as an empty cell."""
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.{digits}g}"
    if isinstance(v, (tuple, list)):
        return "x".join(fmt(x, digits) for x in v)
    return str(v)


def html_table(rows: Iterable[Sequence[object]], header: Sequence[str] | None = None, *, caption: str | None = None) -> str:
    """An HTML table; every cell is escaped (see :func:`fmt` for numbers). ``rows`` of equal length."""
    out = ['<table style="border-collapse:collapse;font-size:12px">']
    if caption:
        out.append(f'<caption style="text-align:left;font-weight:600">{html.escape(caption)}</caption>')
    cell = 'style="padding:1px 8px;border-bottom:1px solid #ddd;text-align:{}"'
    if header:
        out.append("<tr>" + "".join(f"<th {cell.format('left')}>{html.escape(h)}</th>" for h in header) + "</tr>")
    for row in rows:
        tds = []
        for v in row:
            align = "right" if isinstance(v, (int, float)) and not isinstance(v, bool) else "left"
            tds.append(f"<td {cell.format(align)}>{html.escape(fmt(v))}</td>")
        out.append("<tr>" + "".join(tds) + "</tr>")
    out.append("</table>")
    return "".join(out)


def trace_svg(values: Sequence[float], *, width: int = 200, height: int = 60, title: str = "") -> str:
    """A small line plot of ``values`` against their index (e.g. the objective at every step), as inline
    SVG: one ``<polyline>`` over the finite values, the first and last values written at the ends."""
    ys = [float(v) for v in values]
    finite = [v for v in ys if math.isfinite(v)]
    label = f"<title>{html.escape(title)}</title>" if title else ""
    if not finite:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{label}</svg>'
    lo, hi = min(finite), max(finite)
    span = (hi - lo) or 1.0
    n = max(1, len(ys) - 1)
    pad = 12
    pts = " ".join(
        f"{pad + (width - 2 * pad) * i / n:.1f},{height - pad - (height - 2 * pad) * (v - lo) / span:.1f}"
        for i, v in enumerate(ys)
        if math.isfinite(v)
    )
    text = 'font-size="9" fill="#555"'
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}">{label}'
        f'<polyline points="{pts}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>'
        f'<text x="{pad}" y="{height - 1}" {text}>{html.escape(fmt(ys[0], 3))}</text>'
        f'<text x="{width - pad}" y="9" text-anchor="end" {text}>{html.escape(fmt(ys[-1], 3))}</text></svg>'
    )


def panel(*parts: str, title: str | None = None) -> str:
    """The frame of a result's HTML: an optional bold title over ``parts`` (HTML fragments, already escaped)."""
    head = f"<div style='font-weight:600'>{html.escape(title)}</div>" if title else ""
    return _PANEL.format(head + "".join(parts))
