"""Unit addressing: ``LAYER:CHANNEL``, ``LAYER:CHANNEL@Y,X`` (a map position or a patch of a token layer),
``LAYER:CHANNEL@TOKEN`` (a prefix token of a token layer by name, ``cls``/``dist``/``reg0``, or index, ``#0``);
unit sets like ``0-15`` or ``3,9,12``."""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import UnitError

__all__ = ["Unit", "parse_unit", "parse_unit_set", "LOGITS"]

#: the pseudo-layer naming the model's output; class logits are its units (``logits:281``)
LOGITS = "logits"

_UNIT = re.compile(r"^(?P<layer>[^:@\s]+):(?P<channel>-?\d+)(?:@(?:(?P<y>-?\d+),(?P<x>-?\d+)|(?P<token>[A-Za-z]+\d*|#\d+)))?$")


@dataclass(frozen=True, order=True)
class Unit:
    """One unit: a channel of a layer, optionally at one spatial position (row ``y``, column ``x`` of a
    map or of a token layer's patch grid) or at one prefix token (``token``: a name such as ``cls``, or ``#K``
    for the K-th prefix token)."""

    layer: str
    channel: int
    position: tuple[int, int] | None = None
    token: str | None = None

    def __str__(self) -> str:
        pos = f"@{self.position[0]},{self.position[1]}" if self.position is not None else ""
        tok = f"@{self.token}" if self.token is not None else ""
        return f"{self.layer}:{self.channel}{pos}{tok}"

    def no_token(self, tool: str) -> Unit:
        """This unit, or a one-line :class:`UnitError` when it names a prefix token (``@cls``): ``tool``
        (e.g. ``"deepvis optimize"``) reads map positions and patches only, and says so rather than
        silently reading the patch grid instead."""
        if self.token is not None:
            raise UnitError(f"unit {self}: {tool} does not read prefix tokens (@{self.token}) yet; use a patch (@Y,X) or the whole channel")
        return self

    @property
    def is_class(self) -> bool:
        """True for a class score: a unit of the model output (:data:`LOGITS`, e.g. ``logits:281``)."""
        return self.layer == LOGITS


def parse_unit(text: str) -> Unit:
    """Parse ``LAYER:CHANNEL``, ``LAYER:CHANNEL@Y,X`` or ``LAYER:CHANNEL@TOKEN`` (e.g. ``blocks.3:17@5,5``,
    ``blocks.5:17@cls``, ``logits:281``)."""
    m = _UNIT.match(text.strip())
    if not m:
        raise UnitError(
            f"bad unit {text!r}: write LAYER:CHANNEL, LAYER:CHANNEL@Y,X or LAYER:CHANNEL@TOKEN, e.g. blocks.3:17, blocks.3:17@5,5 or blocks.5:17@cls"
        )
    ch = int(m["channel"])
    if ch < 0:
        raise UnitError(f"bad unit {text!r}: the channel must be >= 0")
    pos = None
    if m["y"] is not None:
        pos = (int(m["y"]), int(m["x"]))
        if min(pos) < 0:
            raise UnitError(f"bad unit {text!r}: the position must be >= 0")
    token = m["token"].lower() if m["token"] is not None else None
    return Unit(m["layer"], ch, pos, token)


def parse_unit_set(spec: str, count: int) -> list[int]:
    """Channels from ``7``, ``0-15``, ``3,9,12``, ``0-3,8`` or ``all``, checked against ``count`` units.

    Returns the channel indices in the order given, each once (in ``0..count-1``); :class:`UnitError` otherwise.
    """
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
