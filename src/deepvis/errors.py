"""Errors that deepvis raises for bad input.

Every error a user can cause (a missing file, an unknown layer, a checkpoint that does not fit, ...)
is a :class:`DeepvisError` whose message is one line saying what is wrong and what to do. The CLI
prints that line and exits with status 2; anything else is a bug and is reported as such.
"""

from __future__ import annotations

__all__ = [
    "DeepvisError",
    "InputError",
    "ModelError",
    "WeightsError",
    "LayerError",
    "UnitError",
]


class DeepvisError(Exception):
    """Base class of every error caused by the user's input; ``str(err)`` is a one-line message."""


class InputError(DeepvisError):
    """An input file (image, video, dataset, labels) is missing, unreadable or too large."""


class ModelError(DeepvisError):
    """A model name cannot be resolved or the model cannot be built."""


class WeightsError(ModelError):
    """A checkpoint cannot be read or does not fit the model."""


class LayerError(DeepvisError):
    """A layer name does not exist in the model or does not produce a usable tensor."""


class UnitError(DeepvisError):
    """A unit address is malformed or out of range."""
