"""Unit tasks: the per-unit work of an atlas after mining, as plain data that any process can run.

A :class:`UnitTask` names a fixed group of units of one layer and what to make for them:

* ``views`` — for each top-k input of each unit, the receptive-field crop of the input as the model saw
  it and the backprop view (deconv by default) of the unit at its maximum, cropped the same way;
* ``synth`` — the unit's synthesized image (activation maximization), the group optimized as one batch.

:func:`deepvis.atlas.runner.run_task` runs a task and returns PNG bytes, not files: the atlas writer
(in the driver process) writes them, so workers need no access to the atlas folder.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

from PIL import Image

__all__ = ["UnitTask", "UnitResult", "png_bytes"]


@dataclass(frozen=True)
class UnitTask:
    """Work for ``units`` of ``layer``.

    ``kind`` is ``"views"`` or ``"synth"``; ``entries`` (views only) holds, per unit, its top-k as
    ``(rank, sample index, (y, x) or None)``; ``options`` the kind's parameters as sorted (name, value)
    pairs.
    """

    kind: str
    layer: str
    units: tuple[int, ...]
    entries: tuple[tuple[tuple[int, int, tuple[int, int] | None], ...], ...] = ()
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass
class UnitResult:
    """What a task made for one unit: crops and views (rank order; None where an input could not be
    read again), or the synthesized display/raw images with the objective value reached."""

    kind: str
    layer: str
    unit: int
    crops: list[bytes | None] = field(default_factory=list)
    views: list[bytes | None] = field(default_factory=list)
    image: bytes | None = None
    raw: bytes | None = None
    value: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    skipped: list[tuple[int, str]] = field(default_factory=list)


def png_bytes(image: Image.Image) -> bytes:
    """Encode a Pillow image as PNG (deterministic bytes for equal pixels)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
