"""The atlas's mining pass, on the one statistics engine (:mod:`deepvis.stats`): for every unit of each
atlas layer, a :class:`~deepvis.stats.LayerStats` (top-k inputs and statistics) over the whole dataset."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..stats import Accumulator, LayerStats

__all__ = ["MiningPlan"]


@dataclass(frozen=True)
class MiningPlan:
    """What to mine: ``layers`` maps a layer to (units, map size (H, W) or None), ``k`` entries per unit,
    ``batch_size`` inputs per batch, ``autocast`` the forward pass's autocast (``"bf16"``, ``"fp16"``;
    None: off; the top-k and statistics accumulate in float32 either way) (a :class:`~deepvis.stats.StatsPlan`)."""

    layers: dict[str, tuple[int, tuple[int, int] | None]]
    k: int
    batch_size: int
    autocast: str | None = None

    def empty_states(self, device: torch.device | str = "cpu", names: Iterable[str] | None = None) -> dict[str, Accumulator]:
        """Fresh states of the layers ``names`` (default: all), keyed by layer."""
        pick = self.layers if names is None else {n: self.layers[n] for n in names}
        return {name: LayerStats(name, units, self.k, ms, device) for name, (units, ms) in pick.items()}
