"""Model identity: which network (weights and input size) a stored result was computed with.

One policy, used wherever a stored result (an atlas, a report's reuse of an atlas, the live server's
atlas pane) meets a model: the result fits the model when its recorded **weights hash** and **input
size** equal the model's. The model's name is recorded too, for messages, but is not part of the
identity (the same weights loaded from a file and from a package are the same model).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ModelError
from .model import Model

__all__ = ["IDENTITY_KEYS", "model_hash", "model_identity", "identity_mismatch", "check_identity"]

#: the recorded facts that must equal the model's for a stored result to fit it
IDENTITY_KEYS = ("model_hash", "input_size")

_HASHED_DTYPES = (torch.int64, torch.int32, torch.uint8, torch.bool)


def model_hash(model: Model) -> str:
    """A short hash (16 hex digits) of the model's parameters and buffers: names, shapes, dtypes, values.

    The values are hashed as they are stored (any device; copied to the CPU), so moving a model between
    devices or loading the same checkpoint again gives the same hash.
    """
    h = hashlib.sha256()
    for name, t in model.module.state_dict().items():
        t = t.detach()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        if (t.is_floating_point() or t.dtype in _HASHED_DTYPES) and t.numel():
            h.update(t.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(model: Model) -> dict[str, Any]:
    """The facts a stored result records about its model: ``model`` (the spec it was loaded from, for
    messages), ``weights`` (where its weights came from, e.g. ``"pretrained"`` or ``"random (seed 0)"``:
    :class:`~deepvis.models.model.WeightsSource`; for messages), ``model_hash`` (:func:`model_hash`)
    and ``input_size`` ([H, W] in pixels)."""
    return {
        "model": model.name,
        "weights": model.weights.label,
        "model_hash": model_hash(model),
        "input_size": list(model.preprocessing.input_size),
    }


def identity_mismatch(recorded: Mapping[str, Any], model: Model, *, current: Mapping[str, Any] | None = None) -> str | None:
    """What differs between a stored result's recorded identity and ``model``, as a phrase, or None.

    Args:
        recorded: the stored facts (an atlas's metadata, say); a key it lacks counts as different.
        model: the model at hand.
        current: its :func:`model_identity`, when already computed (hashing reads every weight).

    Returns:
        e.g. ``"with other weights (model 'lite1')"`` or ``"at input size [240, 240], not [224, 224]"``;
        None when the result fits.
    """
    now = current if current is not None else model_identity(model)
    if recorded.get("model_hash") != now["model_hash"]:
        return f"with other weights (model {recorded.get('model', '?')!r})"
    if list(recorded.get("input_size") or []) != list(now["input_size"]):
        return f"at input size {recorded.get('input_size')}, not {now['input_size']}"
    return None


def check_identity(recorded: Mapping[str, Any], model: Model, *, what: str, fix: str, current: Mapping[str, Any] | None = None) -> None:
    """Raise :class:`~deepvis.errors.ModelError` (one line) unless the stored result fits ``model``.

    ``what`` names the stored result (``"atlas out/"``), ``fix`` says what the user can do
    (``"use the same model or drop --atlas"``); the message reads ``"{what} was made {difference}: {fix}"``.
    """
    diff = identity_mismatch(recorded, model, current=current)
    if diff is not None:
        raise ModelError(f"{what} was made {diff}: {fix}")
