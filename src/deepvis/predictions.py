"""Class predictions: top-k classes with probabilities."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .errors import ModelError
from .models.model import Model

__all__ = ["Prediction", "top_k", "top_k_table", "predictions_from_table", "class_scores_problem"]


@dataclass(frozen=True)
class Prediction:
    """One predicted class: logit ``index``, its ``label``, softmax ``probability`` and raw ``logit``."""

    index: int
    label: str
    probability: float
    logit: float

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "label": self.label, "probability": self.probability, "logit": self.logit}


def top_k_table(logits: torch.Tensor, k: int = 5) -> torch.Tensor:
    """The top-``k`` of each row of ``logits`` (N, classes) or (classes,) as one float64 tensor
    (N, 3, k) on the logits' device: rows of probabilities, logits and class indices (exact as
    float64). Computed without any host sync; :func:`predictions_from_table` reads it in one copy."""
    logits = logits.detach().float()
    if logits.ndim == 1:
        logits = logits[None]
    k = min(k, logits.shape[1])
    p, idx = logits.softmax(dim=1).topk(k, dim=1)
    return torch.stack([p.double(), logits.gather(1, idx).double(), idx.double()], dim=1)


def predictions_from_table(model: Model, table: torch.Tensor | Sequence[Sequence[Sequence[float]]]) -> list[list[Prediction]]:
    """:class:`Prediction` s from a :func:`top_k_table` (a tensor, copied to the host once, or its ``tolist()``)."""
    rows = table.tolist() if isinstance(table, torch.Tensor) else table
    return [[Prediction(int(i), model.label(int(i)), float(p), float(v)) for p, v, i in zip(*row)] for row in rows]


def top_k(model: Model, logits: torch.Tensor, k: int = 5) -> list[list[Prediction]]:
    """Top-``k`` predictions for each row of ``logits`` (N, classes), with one device-to-host copy."""
    return predictions_from_table(model, top_k_table(logits, k))


def class_scores_problem(model: Model) -> str | None:
    """Why ``model``'s output is not class scores, so that no prediction may be read from it, or None.

    A timm model built without a head (``num_classes=0``: DINOv2 and CLIP towers, ``timm.create_model(...,
    num_classes=0)``) outputs its pooled features: a softmax over them would be printed as class
    probabilities that do not exist."""
    if getattr(model.module, "num_classes", None) == 0:
        width = getattr(model.module, "num_features", None)
        what = f"a {width}-d feature vector" if isinstance(width, int) else "a feature vector"
        return f"model {model.name} has no classifier head (num_classes=0): its output is {what}, not class scores"
    return None


def require_class_scores(model: Model) -> None:
    """A one-line :class:`~deepvis.errors.ModelError` when :func:`class_scores_problem` finds one."""
    problem = class_scores_problem(model)
    if problem is not None:
        raise ModelError(f"{problem}; predictions need a model with a classifier")
