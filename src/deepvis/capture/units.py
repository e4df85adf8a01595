"""Unit addressing: ``LAYER:CHANNEL`` or ``LAYER:CHANNEL@Y,X``; unit sets like ``0-15`` or ``3,9,12``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UnitError

__all__ = ["Unit", "parse_unit", "parse_unit_set", "LOGITS"]

#: the pseudo-layer naming the model's output; class logits are its units (``logits:281``)
LOGITS = "logits"

_UNIT = re.compile(r"^(?P<layer>[^:@\s]+):(?P<channel>-?\d+)(?:@(?P<y>-?\d+),(?P<x>-?\d+))?$")


@dataclass(frozen=True, order=True)
class Unit:
    """One unit: a channel of a layer, optionally at one spatial position (row ``y``, column ``x``)."""

    layer: str
    channel: int
    position: tuple[int, int] | None = None

    def __str__(self) -> str:
        pos = f"@{self.position[0]},{self.position[1]}" if self.position is not None else ""
        return f"{self.layer}:{self.channel}{pos}"

    @property
    def is_class(self) -> bool:
        """True for a class score: a unit of the model output (:data:`LOGITS`, e.g. ``logits:281``)."""
        return self.layer == LOGITS


def parse_unit(text: str) -> Unit:
    """Parse ``LAYER:CHANNEL`` or ``LAYER:CHANNEL@Y,X`` (e.g. ``blocks.3:17@5,5``, ``logits:281``)."""
    m = _UNIT.match(text.strip())
    if not m:
        raise UnitError(f"bad unit {text!r}: write LAYER:CHANNEL or LAYER:CHANNEL@Y,X, e.g. blocks.3:17 or blocks.3:17@5,5")
    ch = int(m["channel"])
    if ch < 0:
        raise UnitError(f"bad unit {text!r}: the channel must be >= 0")
    pos = None
    if m["y"] is not None:
        pos = (int(m["y"]), int(m["x"]))
        if min(pos) < 0:
            raise UnitError(f"bad unit {text!r}: the position must be >= 0")
    return Unit(m["layer"], ch, pos)


def parse_unit_set(spec: str, count: int) -> list[int]:
    """Channels from ``7``, ``0-15``, ``3,9,12``, ``0-3,8`` or ``all``, checked against ``count`` units."""
    spec = spec.strip().lower()
    if spec == "all":
        return list(range(count))
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise UnitError(f"bad unit list {spec!r}: use N, A-B, a comma-separated list, or all")
        lo = int(m[1])
        hi = int(m[2]) if m[2] is not None else lo
        if hi < lo:
            raise UnitError(f"bad unit range {part!r}: the end is before the start")
        if hi >= count:
            raise UnitError(f"unit {hi} is out of range: the layer has {count} units (0-{count - 1})")
        out.extend(range(lo, hi + 1))
    return list(dict.fromkeys(out))
