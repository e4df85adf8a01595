"""Class predictions: top-k classes with probabilities."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.model import Model

__all__ = ["Prediction", "top_k"]


@dataclass(frozen=True)
class Prediction:
    """One predicted class: logit ``index``, its ``label``, softmax ``probability`` and raw ``logit``."""

    index: int
    label: str
    probability: float
    logit: float

    def to_dict(self) -> dict[str, object]:
        return {"index": self.index, "label": self.label, "probability": self.probability, "logit": self.logit}


def top_k(model: Model, logits: torch.Tensor, k: int = 5) -> list[list[Prediction]]:
    """Top-``k`` predictions for each row of ``logits`` (N, classes)."""
    logits = logits.detach().float()
    if logits.ndim == 1:
        logits = logits[None]
    probs = logits.softmax(dim=1)
    k = min(k, logits.shape[1])
    p, idx = probs.topk(k, dim=1)
    out = []
    for row in range(logits.shape[0]):
        out.append(
            [
                Prediction(int(i), model.label(int(i)), float(pp), float(logits[row, int(i)]))
                for pp, i in zip(p[row].tolist(), idx[row].tolist())
            ]
        )
    return out
