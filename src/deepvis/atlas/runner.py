"""Running a unit task (:class:`~deepvis.atlas.tasks.UnitTask`) in whatever process an engine chose."""

from __future__ import annotations

from ..datasets import ImageDataset
from ..models.model import Model
from .synthesis import synthesize_units
from .tasks import UnitResult, UnitTask
from .views import unit_views

__all__ = ["run_task"]


def run_task(model: Model, dataset: ImageDataset, task: UnitTask) -> list[UnitResult]:
    """Run one task; the results come in the order of ``task.units``.

    ``views`` tasks read their top inputs from ``dataset``; ``synth`` tasks use only the model.
    """
    if task.kind == "views":
        return unit_views(model, dataset, task)
    if task.kind == "synth":
        return synthesize_units(model, task)
    raise ValueError(f"unknown task kind {task.kind!r}")
