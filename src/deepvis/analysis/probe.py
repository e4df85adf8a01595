"""Transferability: a linear probe on each layer's pooled activations.

For a labelled dataset, each layer's activations are averaged over space (a (C, H, W) map becomes C
numbers; a vector layer is used as is), standardized, and a multinomial logistic regression
(scikit-learn, L2, ``C=1``) is trained and scored by stratified k-fold cross-validation. The mean
accuracy per layer says how linearly decodable the dataset's classes are from that layer — "which
layers should be transferred". ``chance`` is the accuracy of always guessing the most frequent class.

Classes with fewer examples than folds cannot be stratified: the folds are reduced to the smallest
class count (at least 2), and classes with a single example are left out (counted in ``dropped``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch

__all__ = ["ProbeResult", "pool_features", "probe_accuracy"]


@dataclass(frozen=True)
class ProbeResult:
    """Cross-validated accuracy of a linear probe.

    ``accuracy``: mean over folds; ``fold_accuracy``: each fold's; ``chance``: majority-class rate;
    ``examples``/``classes``: what was used; ``dropped``: examples left out (classes with one example);
    ``skipped``: why no probe was run (None when it was).
    """

    accuracy: float
    fold_accuracy: tuple[float, ...]
    chance: float
    examples: int
    classes: int
    folds: int
    dropped: int = 0
    skipped: str | None = None

    @property
    def std(self) -> float:
        return float(np.std(self.fold_accuracy)) if self.fold_accuracy else float("nan")

    def to_dict(self) -> dict[str, object]:
        return {
            "accuracy": self.accuracy,
            "std": self.std,
            "fold_accuracy": list(self.fold_accuracy),
            "chance": self.chance,
            "examples": self.examples,
            "classes": self.classes,
            "folds": self.folds,
            "dropped": self.dropped,
            "skipped": self.skipped,
        }


def pool_features(acts: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, C, H, W) → (N, C) float32 by spatial mean; (N, C) unchanged (numpy or torch input)."""
    if hasattr(acts, "detach"):  # a tensor: pool on its device, copy only the (N, C) result
        t = acts.detach().float()
        a = (t.mean((2, 3)) if t.ndim == 4 else t).cpu().numpy()
    else:
        a = np.asarray(acts, dtype=np.float32)
    if a.ndim == 4:
        return a.mean(axis=(2, 3))
    if a.ndim == 2:
        return a
    raise ValueError(f"expected activations (N,C,H,W) or (N,C), got shape {a.shape}")


def _skipped(reason: str, examples: int, classes: int) -> ProbeResult:
    return ProbeResult(float("nan"), (), float("nan"), examples, classes, 0, 0, reason)


def probe_accuracy(features: np.ndarray, labels: np.ndarray, *, folds: int = 5, seed: int = 0, max_iter: int = 500) -> ProbeResult:
    """Stratified ``folds``-fold cross-validated accuracy of a logistic-regression probe on ``features`` (N, D) for ``labels`` (N,).

    Labels below 0 mark unlabelled examples (left out). Returns a result with ``skipped`` set when fewer
    than two classes have at least two examples.
    """
    # scikit-learn (heavy: about 1 s) is imported when a probe runs, not with deepvis.analysis
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    X = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels)
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError("features must be (N, D) with one label per row")
    keep = y >= 0
    X, y = X[keep], y[keep]
    classes, counts = np.unique(y, return_counts=True)
    single = classes[counts < 2]
    dropped = int(np.isin(y, single).sum())
    if dropped:
        keep = ~np.isin(y, single)
        X, y = X[keep], y[keep]
        classes, counts = classes[counts >= 2], counts[counts >= 2]
    if len(classes) < 2:
        return _skipped("fewer than two classes with at least two examples", int(len(y)), int(len(classes)))
    k = int(min(folds, counts.min()))
    if k < 2:
        return _skipped("too few examples per class for cross-validation", int(len(y)), int(len(classes)))
    X = np.nan_to_num(X, nan=0.0, posinf=0.0, neginf=0.0)
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    scores = []
    for train, test in cv.split(X, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=max_iter))
        # one BLAS/OpenMP thread: beside torch's thread pool, more threads made these small fits ~10x slower (measured)
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore", ConvergenceWarning)  # the score is still meaningful; max_iter bounds the time
            warnings.filterwarnings(
                "ignore", message="The number of unique classes is greater than 50%"
            )  # many classes, few examples: expected here
            clf.fit(X[train], y[train])
        scores.append(float(np.mean(clf.predict(X[test]) == y[test])))
    chance = float(counts.max() / counts.sum())
    return ProbeResult(float(np.mean(scores)), tuple(scores), chance, int(len(y)), int(len(classes)), k, dropped)
