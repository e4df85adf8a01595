"""The wire format between the page and the server.

Binary WebSocket messages (both directions) are ``[u32 little-endian header length][header JSON
(UTF-8)][payload bytes]``. The header's ``blobs`` lists ``[name, offset, length]`` of each payload
inside the bytes that follow it, so one message carries e.g. a whole layer's activations as raw
``uint8`` and the selected unit's map without any base64 or image encoding. Text messages are plain
JSON objects with a ``type``.

Client → server:

* binary ``{"type": "frame", "seq": N, "w": W, "h": H, "format": "rgba"|"rgb", "source": "camera"|"video"|"image"}``
  + pixels: a video or camera frame, already cropped and resized by the page to the model's input size.
* text ``{"type": "settings", "req": N, ...}`` (see :class:`ViewSettings`), ``{"type": "sample", "name": ...}``,
  ``{"type": "synthesize", "layer": ..., "unit": ...}``, ``{"type": "video_frame", "index": I, "seq": N}``
  (a frame of a video the server decoded), ``{"type": "ping", "t": ...}``.

Server → client: text ``hello`` (the model, its layers, the lists the page builds its controls from:
see :meth:`~deepvis.server.app.Toolbox.info`), ``settings`` (what is shown, answering ``req``), ``rf``
(a layer's receptive fields), ``synthesis`` (progress), ``error`` and ``pong``; binary ``frame``,
``backprop`` and ``input``.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, TypeVar

from ..backprop import MODES
from ..errors import DeepvisError
from ..render import NORMALIZATIONS, Normalize

__all__ = [
    "json_float",
    "pack",
    "unpack",
    "text",
    "ViewSettings",
    "ProtocolError",
    "BACKPROP_MODES",
    "MAX_HEADER_BYTES",
]

#: a binary message's JSON header may not be larger than this
MAX_HEADER_BYTES = 16_384


#: the ``backprop`` setting: ``off`` (no view) or one of the library's modes (:data:`deepvis.backprop.MODES`)
BACKPROP_MODES: tuple[str, ...] = ("off", *MODES)


_Name = TypeVar("_Name", bound=str)

#: a query token's name as the page may send it (``cls``, ``reg0``, ``#0``)
_QUERY_TOKEN = re.compile(r"[A-Za-z]{1,12}\d{0,3}|#\d{1,3}")


class ProtocolError(DeepvisError):
    """A message from the page is malformed (wrong type, missing field, out-of-range value)."""


def pack(header: Mapping[str, Any], blobs: Mapping[str, bytes | memoryview] | None = None) -> bytes:
    """One binary message: the header (with a ``blobs`` index added) followed by the payloads."""
    index = []
    pos = 0
    parts: list[bytes | memoryview] = []
    for name, data in (blobs or {}).items():
        n = len(data) if isinstance(data, bytes) else data.nbytes
        index.append([name, pos, n])
        parts.append(data)
        pos += n
    head = json.dumps({**header, "blobs": index}, separators=(",", ":"), allow_nan=False).encode()
    return b"".join([struct.pack("<I", len(head)), head, *parts])


def unpack(data: bytes) -> tuple[dict[str, Any], memoryview]:
    """Split a binary message into (header dict, payload view). Raises :class:`ProtocolError`."""
    if len(data) < 4:
        raise ProtocolError("binary message too short")
    (n,) = struct.unpack_from("<I", data)
    if n > MAX_HEADER_BYTES or 4 + n > len(data):
        raise ProtocolError("binary message header is too large or truncated")
    try:
        header = json.loads(bytes(data[4 : 4 + n]))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProtocolError(f"binary message header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError("binary message header must be a JSON object")
    return header, memoryview(data)[4 + n :]


def text(type_: str, **fields: Any) -> str:
    """A text message ``{"type": type_, **fields}``."""
    return json.dumps({"type": type_, **fields}, separators=(",", ":"), allow_nan=False)


def json_float(x: float | None) -> float | None:
    """A statistic as JSON can carry it to the page: rounded to 6 decimals; None for a missing, NaN or
    infinite value (JSON has no NaN)."""
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


def _num(d: Mapping[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    v = d.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise ProtocolError(f"setting {key!r} must be a number, got {v!r}")
    if not lo <= v <= hi:
        raise ProtocolError(f"setting {key!r} must be between {lo} and {hi}, got {v}")
    return float(v)


def _int(d: Mapping[str, Any], key: str, default: int | None) -> int | None:
    v = d.get(key, default)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ProtocolError(f"setting {key!r} must be a whole number >= 0, got {v!r}")
    return v


def _choice(d: Mapping[str, Any], key: str, default: _Name, allowed: tuple[_Name, ...]) -> _Name:
    v = d.get(key, default)
    if v not in allowed:
        raise ProtocolError(f"setting {key!r} must be one of {', '.join(allowed)}, got {v!r}")
    return allowed[allowed.index(v)]


@dataclass(frozen=True)
class ViewSettings:
    """What one page wants to see: the typed form of a ``settings`` message.

    ``layer``/``unit`` select the layers pane and the selected unit; ``position`` (row, column in the
    layer's map) pins the unit view to one spatial position (None: the unit's strongest position);
    ``normalize`` is the grid's scaling (see :func:`deepvis.render.normalize_activations`); ``gain``
    multiplies the normalized values and ``gamma`` is applied after it (the toolbox's boost);
    ``diff`` shows activation minus its running mean; ``backprop`` is the unit view computed in the
    background (``off`` for none) with display filter ``filter``, its magnitudes divided by their
    ``percentile``-th percentile (100: the maximum; lower saturates the strongest values for contrast:
    :func:`deepvis.backprop.backprop_image`). ``query`` is the query token of an attention layer: a
    prefix token name (``"cls"``, ``"#0"``), a patch [row, column] of its grid, or None (the first prefix
    token); other layers ignore it. ``token`` selects the unit's prefix token instead of its channel
    map (``blocks.5:17@cls``, a strip cell); ``position`` and ``token`` exclude each other: the one a
    message sets clears the other.
    """

    layer: str
    unit: int = 0
    position: tuple[int, int] | None = None
    normalize: Normalize = "layer"
    gain: float = 1.0
    gamma: float = 1.0
    diff: bool = False
    backprop: str = "off"
    filter: str = "raw"
    percentile: float = 100.0
    query: str | tuple[int, int] | None = None
    token: str | None = None

    @classmethod
    def parse(cls, d: Mapping[str, Any], base: ViewSettings, filters: tuple[str, ...]) -> ViewSettings:
        """Validate a ``settings`` message; fields it leaves out keep their value from ``base``.

        Only types and ranges are checked here; the layer and unit are checked against the model by
        the caller.
        """
        merged = {**asdict(base), **{k: v for k, v in d.items() if k != "type"}}
        if "filter" not in d and filters and base.filter not in filters:
            merged["filter"] = filters[0]  # a server that offers fewer filters than the default view's
        unknown = set(merged) - set(asdict(base))
        if unknown:
            raise ProtocolError(f"unknown setting {sorted(unknown)[0]!r}")
        layer = merged["layer"]
        if not isinstance(layer, str) or not layer or len(layer) > 512:
            raise ProtocolError("setting 'layer' must be a layer name")
        pos = merged["position"]
        if pos is not None:
            if (
                not isinstance(pos, (list, tuple))
                or len(pos) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in pos)
            ):
                raise ProtocolError("setting 'position' must be [row, column] or null")
            pos = (int(pos[0]), int(pos[1]))
        query = merged["query"]
        if isinstance(query, str):
            if not _QUERY_TOKEN.fullmatch(query):
                raise ProtocolError("setting 'query' must be a prefix token name (cls, reg0, #0), [row, column] or null")
            query = query.lower()
        elif query is not None:
            if (
                not isinstance(query, (list, tuple))
                or len(query) != 2
                or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in query)
            ):
                raise ProtocolError("setting 'query' must be a prefix token name (cls, reg0, #0), [row, column] or null")
            query = (int(query[0]), int(query[1]))
        token = merged["token"]
        if token is not None and (not isinstance(token, str) or not _QUERY_TOKEN.fullmatch(token)):
            raise ProtocolError("setting 'token' must be a prefix token name (cls, reg0, #0) or null")
        if d.get("token") is not None:
            pos = None
        elif d.get("position") is not None or "layer" in d or "unit" in d:
            token = None
        diff = merged["diff"]
        if not isinstance(diff, bool):
            raise ProtocolError("setting 'diff' must be true or false")
        return replace(
            base,
            layer=layer,
            unit=_int(merged, "unit", 0) or 0,
            position=pos,
            normalize=_choice(merged, "normalize", "layer", NORMALIZATIONS),
            gain=_num(merged, "gain", 1.0, 0.01, 1000.0),
            gamma=_num(merged, "gamma", 1.0, 0.05, 20.0),
            diff=diff,
            backprop=_choice(merged, "backprop", "off", BACKPROP_MODES),
            filter=_choice(merged, "filter", filters[0] if filters else "raw", filters or ("raw",)),
            percentile=_num(merged, "percentile", 100.0, 50.0, 100.0),
            query=query,
            token=token.lower() if token is not None else None,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["position"] = list(self.position) if self.position is not None else None
        d["query"] = list(self.query) if isinstance(self.query, tuple) else self.query
        return d
