"""Synthesized images for atlas units (the atlas's third phase), by :func:`deepvis.optimize.visualize`.

Each task's units are optimized together as one batch (the unit at the center of its map, the paper's
choice). Groups are fixed slices of a layer's unit list, so a unit is always optimized in the same
batch whatever engine runs it and wherever a job was interrupted.
"""

from __future__ import annotations

from ..capture import Unit
from ..models.model import Model
from ..optimize import canvas_size, get_preset, visualize
from .options import SynthesisOptions
from .tasks import UnitResult, UnitTask, png_bytes

__all__ = ["synthesize_units", "check_synthesis_options"]


def check_synthesis_options(model: Model, options: SynthesisOptions) -> None:
    """Raise a :class:`~deepvis.errors.DeepvisError` now (not after mining) for a bad preset, steps or size."""
    get_preset(options.preset).replace(steps=options.steps)
    canvas_size(model, options.size)


def synthesize_units(model: Model, task: UnitTask) -> list[UnitResult]:
    """Optimize every unit of a ``synth`` task in one batch; one result per unit (display and raw PNGs)."""
    o = task.opts
    results = visualize(
        model,
        [Unit(task.layer, u) for u in task.units],
        preset=o.get("preset", "3"),
        steps=o.get("steps"),
        size=o.get("size"),
        seed=int(o.get("seed", 0)),
        batch_size=max(1, len(task.units)),
    )
    return [
        UnitResult(
            "synth",
            task.layer,
            unit,
            image=png_bytes(r.display_image()),
            raw=png_bytes(r.raw_image()),
            value=r.value,
            info=r.to_dict(trace=False),
        )
        for unit, r in zip(task.units, results)
    ]
