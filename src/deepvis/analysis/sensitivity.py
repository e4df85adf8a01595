"""Sensitivity to small input changes: how much each layer's activations move, and how often the prediction flips.

For each input ``x`` (in model-input units) and each size ``ε`` given in **0–255 pixel units**, two
perturbations are applied, each moving every input value by ``ε`` pixel steps (converted per channel
with :meth:`Preprocessing.pixel_scale`, so both have the same L∞ and L2 size):

* ``random``: a random sign (±1) per input value, drawn from a generator seeded by ``seed`` and the
  sample's index (the same direction for every ``ε``, so the results do not depend on batching);
* ``adversarial``: the sign of the gradient of the cross-entropy loss of the model's own predicted
  class (FGSM): the direction that lowers the predicted class's probability fastest, to first order.

The perturbed input is clipped to the valid pixel range (0–255) — but never beyond the clean input's
own values — so what the model sees is a real image. For every layer the **relative change**
``‖a(x') − a(x)‖₂ / ‖a(x)‖₂`` (over all of one input's activations of that layer) is recorded per input,
and the prediction **flips** when the top class of ``x'`` differs from that of ``x``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ..capture import LOGITS, forward_with_logits, frozen, get_layer
from ..errors import DeepvisError, LayerError
from ..models.model import Model

__all__ = ["KINDS", "SensitivityResult", "perturbation_directions", "measure_sensitivity"]

#: the perturbation kinds, in report order
KINDS = ("random", "adversarial")


@dataclass
class SensitivityResult:
    """Relative changes and prediction flips over a set of inputs.

    ``layers`` in depth order, ending with ``logits``; ``epsilons`` in 0–255 pixel units;
    ``change[kind]`` is (epsilons, layers, inputs) (NaN where a clean activation is all zero);
    ``flips[kind]`` is (epsilons, inputs) bool; ``samples`` the inputs' dataset indices.
    """

    layers: list[str]
    epsilons: list[float]
    kinds: list[str]
    samples: list[int]
    change: dict[str, np.ndarray]
    flips: dict[str, np.ndarray]

    @property
    def inputs(self) -> int:
        return len(self.samples)

    def mean_change(self, kind: str) -> np.ndarray:
        """Mean relative change over inputs, (epsilons, layers)."""
        return _nan_stat(np.nanmean, self.change[kind])

    def median_change(self, kind: str) -> np.ndarray:
        """Median relative change over inputs, (epsilons, layers)."""
        return _nan_stat(np.nanmedian, self.change[kind])

    def flip_rate(self, kind: str) -> np.ndarray:
        """Fraction of inputs whose top class changed, (epsilons,)."""
        f = self.flips[kind]
        return f.mean(axis=1) if f.shape[1] else np.full(f.shape[0], np.nan)

    def merge(self, other: SensitivityResult) -> SensitivityResult:
        """The result over both sets of inputs (same layers, epsilons and kinds)."""
        if (self.layers, self.epsilons, self.kinds) != (other.layers, other.epsilons, other.kinds):
            raise ValueError("cannot merge sensitivity results of different layers, epsilons or kinds")
        return SensitivityResult(
            self.layers,
            self.epsilons,
            self.kinds,
            self.samples + other.samples,
            {k: np.concatenate([self.change[k], other.change[k]], axis=2) for k in self.kinds},
            {k: np.concatenate([self.flips[k], other.flips[k]], axis=1) for k in self.kinds},
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "layers": self.layers,
            "epsilons": self.epsilons,
            "kinds": self.kinds,
            "samples": self.samples,
            "mean_change": {k: self.mean_change(k).tolist() for k in self.kinds},
            "median_change": {k: self.median_change(k).tolist() for k in self.kinds},
            "flip_rate": {k: self.flip_rate(k).tolist() for k in self.kinds},
            "change": {k: self.change[k].tolist() for k in self.kinds},
            "flips": {k: self.flips[k].astype(int).tolist() for k in self.kinds},
        }


def _nan_stat(fn, a: np.ndarray) -> np.ndarray:
    out = np.full(a.shape[:2], np.nan)
    for e in range(a.shape[0]):
        for l in range(a.shape[1]):  # noqa: E741
            row = a[e, l]
            if np.isfinite(row).any():
                out[e, l] = fn(row)
    return out


def _random_signs(shape: Sequence[int], samples: Sequence[int], seed: int) -> torch.Tensor:
    out = torch.empty((len(samples), *shape))
    for i, s in enumerate(samples):
        g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(s))
        out[i] = torch.randint(0, 2, tuple(shape), generator=g).float() * 2 - 1
    return out


def perturbation_directions(
    model: Model, x: torch.Tensor, samples: Sequence[int], *, kinds: Sequence[str] = KINDS, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Directions of one pixel step (model-input units, shaped like ``x`` (N, C, H, W)) for each kind.

    Adding ``ε · direction`` moves every input value by ``ε`` pixel steps of the 0–255 scale.
    """
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise DeepvisError(f"unknown perturbation kind {unknown[0]!r}: use {', '.join(KINDS)}")
    step = model.preprocessing.pixel_scale().to(x.device, x.dtype).view(1, -1, 1, 1)
    out: dict[str, torch.Tensor] = {}
    if "random" in kinds:
        out["random"] = _random_signs(x.shape[1:], samples, seed).to(x.device, x.dtype) * step
    if "adversarial" in kinds:
        with frozen(model.module):
            xg = x.detach().clone().requires_grad_(True)
            logits = model.module(xg)
            if not isinstance(logits, torch.Tensor) or logits.ndim != 2:
                raise LayerError("adversarial perturbations need a model whose output is (N, classes) logits")
            loss = F.cross_entropy(logits.float(), logits.detach().argmax(1), reduction="sum")
            (grad,) = torch.autograd.grad(loss, xg)
        out["adversarial"] = grad.sign() * step
    return out


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    return t.detach().float().reshape(t.shape[0], -1).norm(dim=1)


def measure_sensitivity(
    model: Model,
    x: torch.Tensor,
    layers: Sequence[str],
    epsilons: Sequence[float],
    *,
    samples: Sequence[int] | None = None,
    kinds: Sequence[str] = KINDS,
    seed: int = 0,
    clip: bool = True,
) -> SensitivityResult:
    """Relative change of every layer in ``layers`` (plus ``logits``) and prediction flips, for a batch ``x`` (N, C, H, W).

    Layers are reported in depth order. ``epsilons`` are perturbation sizes in 0–255 pixel units;
    ``samples`` the inputs' dataset indices
    (they seed the random directions; default 0..N−1). See the module docs.
    """
    eps = [float(e) for e in epsilons]
    if not eps or any(not np.isfinite(e) or e <= 0 for e in eps):
        raise DeepvisError("perturbation sizes must be positive numbers of 0-255 pixel steps, e.g. 1,2,4,8")
    order = {n: get_layer(model, n).order for n in dict.fromkeys(layers) if n != LOGITS}
    names = sorted(order, key=order.__getitem__) + [LOGITS]
    n = x.shape[0]
    ids = list(range(n)) if samples is None else [int(s) for s in samples]
    if len(ids) != n:
        raise ValueError("samples must give one index per input")
    clean, logits = forward_with_logits(model, x, names[:-1])
    clean[LOGITS] = logits
    norms = {k: _flat_norm(v) for k, v in clean.items()}
    pred = logits.argmax(1)
    dirs = perturbation_directions(model, x, ids, kinds=kinds, seed=seed)
    lo, hi = (t.to(x.device, x.dtype).view(1, -1, 1, 1) for t in model.preprocessing.valid_range())
    lo, hi = torch.minimum(lo, x), torch.maximum(hi, x)  # never clip the clean input itself
    change = {k: np.full((len(eps), len(names), n), np.nan) for k in dirs}
    flips = {k: np.zeros((len(eps), n), dtype=bool) for k in dirs}
    for kind, d in dirs.items():
        for e, size in enumerate(eps):
            xp = x + size * d
            if clip:
                xp = torch.maximum(torch.minimum(xp, hi), lo)
            acts, out = forward_with_logits(model, xp, names[:-1])
            acts[LOGITS] = out
            for li, name in enumerate(names):
                delta = _flat_norm(acts[name].float() - clean[name].float())
                base = norms[name]
                rel = torch.where(base > 0, delta / torch.where(base > 0, base, torch.ones_like(base)), torch.full_like(base, float("nan")))
                change[kind][e, li] = rel.cpu().numpy()
            flips[kind][e] = (out.argmax(1) != pred).cpu().numpy()
    return SensitivityResult(names, eps, list(dirs), ids, change, flips)
