"""Unit addressing: ``LAYER:CHANNEL``, ``LAYER:CHANNEL@Y,X`` (a map position or a patch of a token layer),
``LAYER:CHANNEL@TOKEN`` (a prefix token of a token layer by name, ``cls``/``dist``/``reg0``, or index, ``#0``);
unit sets like ``0-15`` or ``3,9,12``.

A prefix token of a token layer is a vector of C units: ``blocks.5:17@cls`` is unit 17 of the class
token's (N, C) vector, which :func:`~deepvis.capture.capture` returns under the pseudo-layer name
``blocks.5@cls`` (:func:`token_layer`; :attr:`Unit.layer_key`). :func:`unit_activation` is the one place
that turns captured activations into the (N,) values a unit names (a map position, a patch, a prefix
token, a whole channel); every tool reads units through it or :func:`unit_index`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import UnitError

__all__ = [
    "Unit",
    "parse_unit",
    "parse_unit_set",
    "LOGITS",
    "token_layer",
    "split_token_layer",
    "unit_index",
    "unit_activation",
]

#: the pseudo-layer naming the model's output; class logits are its units (``logits:281``)
LOGITS = "logits"

_TOKEN = r"[A-Za-z]+\d*|#\d+"
_UNIT = re.compile(rf"^(?P<layer>[^:@\s]+):(?P<channel>-?\d+)(?:@(?:(?P<y>-?\d+),(?P<x>-?\d+)|(?P<token>{_TOKEN})))?$")
_TOKEN_LAYER = re.compile(rf"^(?P<layer>[^:@\s]+)@(?P<token>{_TOKEN})$")
#: the suffix of :func:`~deepvis.capture.prefix_key` (all prefix tokens as (N, C, P)); not a token name
_PREFIX = "prefix"


def token_layer(layer: str, token: str) -> str:
    """The pseudo-layer name of prefix token ``token`` of token layer ``layer``: ``blocks.5@cls``. Its
    output is that token's (N, C) vector (see :func:`~deepvis.capture.capture`)."""
    return f"{layer}@{token}"


def split_token_layer(name: str) -> tuple[str, str] | None:
    """``(layer, token)`` for a prefix-token pseudo-layer name (``blocks.5@cls`` -> ``("blocks.5", "cls")``,
    the token lower-cased), None for any other layer name."""
    if "@" not in name:  # the common case, without a regex (capture asks this of every layer it is given)
        return None
    m = _TOKEN_LAYER.match(name)
    if m is None or m["token"].lower() == _PREFIX:
        return None
    return m["layer"], m["token"].lower()


@dataclass(frozen=True, order=True)
class Unit:
    """One unit: a channel of a layer, optionally at one spatial position (row ``y``, column ``x`` of a
    map or of a token layer's patch grid) or at one prefix token (``token``: a name such as ``cls``, or ``#K``
    for the K-th prefix token).

    A prefix-token pseudo-layer is read as its token: ``Unit("blocks.5@cls", 17)`` is
    ``Unit("blocks.5", 17, token="cls")``."""

    layer: str
    channel: int
    position: tuple[int, int] | None = None
    token: str | None = None

    def __post_init__(self) -> None:
        split = split_token_layer(self.layer)
        if split is not None:
            if self.token is not None:
                raise UnitError(f"unit {self.layer}:{self.channel}@{self.token}: the layer already names a prefix token")
            object.__setattr__(self, "layer", split[0])
            object.__setattr__(self, "token", split[1])
        if self.token is not None and self.position is not None:
            raise UnitError(f"unit {self.layer}:{self.channel}: give a position (@Y,X) or a prefix token (@{self.token}), not both")

    def __str__(self) -> str:
        pos = f"@{self.position[0]},{self.position[1]}" if self.position is not None else ""
        tok = f"@{self.token}" if self.token is not None else ""
        return f"{self.layer}:{self.channel}{pos}{tok}"

    @property
    def layer_key(self) -> str:
        """The name :func:`~deepvis.capture.capture` returns this unit's tensor under: the layer, or for a
        prefix token its pseudo-layer ``LAYER@TOKEN`` (an (N, C) vector)."""
        return token_layer(self.layer, self.token) if self.token is not None else self.layer

    @property
    def is_class(self) -> bool:
        """True for a class score: a unit of the model output (:data:`LOGITS`, e.g. ``logits:281``)."""
        return self.layer == LOGITS


def unit_index(unit: Unit, shape: Sequence[int]) -> tuple[int | slice, ...]:
    """Where ``unit`` lies in one example's canonical output of ``unit.layer_key``.

    Args:
        unit: the unit.
        shape: one example's shape of the tensor captured under ``unit.layer_key``: (C, H, W) for maps and
            patch grids, (C,) for vectors and prefix tokens.

    Returns:
        ``(c,)`` on a vector (a prefix token's, too), ``(c, y, x)`` at a position, ``(c, :, :)`` for a
        whole channel map. A one-line :class:`UnitError` when the channel or position is out of range.
    """
    c = unit.channel
    if not 0 <= c < shape[0]:
        raise UnitError(f"unit {unit} is out of range: layer {unit.layer_key} has {shape[0]} units (0-{shape[0] - 1})")
    if len(shape) == 1:
        if unit.position is not None:
            raise UnitError(f"unit {unit}: layer {unit.layer_key} has no spatial map, so a position does not apply")
        return (c,)
    if unit.position is None:
        return (c, slice(None), slice(None))
    y, x = unit.position
    h, w = shape[1], shape[2]
    if not (0 <= y < h and 0 <= x < w):
        raise UnitError(f"unit {unit}: position is outside the {h}x{w} map of {unit.layer_key}")
    return (c, y, x)


def unit_activation(acts: Mapping[str, torch.Tensor], unit: Unit | str, *, reduce: Literal["mean", "max"] = "mean") -> torch.Tensor:
    """The (N,) values ``unit`` names in captured activations ``acts`` (``{layer: (N, C, H, W) or (N, C)}``,
    as :func:`~deepvis.capture.capture` returns them; ``acts[unit.layer_key]`` is read).

    A position, a patch, a prefix token or a vector unit gives its value; a whole channel map is reduced
    over its positions by ``reduce`` (``mean`` or ``max``). Differentiable (no copy of the activations).
    """
    if isinstance(unit, str):
        unit = parse_unit(unit)
    if unit.layer_key not in acts:
        raise UnitError(f"unit {unit}: its layer {unit.layer_key} is not among the activations ({', '.join(acts) or 'none'})")
    a = acts[unit.layer_key]
    v = a[(slice(None), *unit_index(unit, tuple(a.shape[1:])))]
    if v.ndim == 1:
        return v
    flat = v.flatten(1)
    return flat.mean(1) if reduce == "mean" else flat.amax(1)


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
    if token == _PREFIX:
        raise UnitError(f"bad unit {text!r}: @prefix is not a token; name one (cls, dist, reg0) or its index (#0)")
    return Unit(m["layer"], ch, pos, token)


def parse_unit_set(spec: str, count: int, layer: str | None = None) -> list[int]:
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
            raise UnitError(f"unit {hi} is out of range: {f'layer {layer}' if layer else 'the layer'} has {count} units (0-{count - 1})")
        out.extend(range(lo, hi + 1))
    return list(dict.fromkeys(out))
