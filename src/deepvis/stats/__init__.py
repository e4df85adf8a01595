"""The one statistics engine: streaming per-unit statistics and top-k that merge exactly
(:mod:`.accumulators`), run over a dataset's batches locally or on Ray (:mod:`.engines`).

The atlas's mining pass and the report's scan are both built on it; it sits below them (it imports
capture, datasets and models, never the atlas, the analysis, the CLI or the server).

>>> from deepvis.stats import LayerStats, mine
>>> states = {"blocks.3": LayerStats("blocks.3", units=40, k=9, map_size=(14, 14))}   # doctest: +SKIP
>>> for step in mine(model, dataset, states, range(num_batches(len(dataset), 64)), 64):  # doctest: +SKIP
...     pass
>>> states["blocks.3"].top(7)        # doctest: +SKIP
"""

from .accumulators import (
    ACTIVE_THRESHOLD,
    EMPTY,
    INPUT,
    Accumulator,
    ExactSum,
    LayerStats,
    StatsAccumulator,
    TopK,
    UnitStats,
    pack_arrays,
    unpack_arrays,
)
from .engines import (
    ENGINES,
    Engine,
    LocalEngine,
    MiningProgress,
    MiningStep,
    RayEngine,
    StatsPlan,
    batch_indices,
    make_engine,
    mine,
    num_batches,
    update_states,
    worker_device,
)

__all__ = [
    "pack_arrays",
    "unpack_arrays",
    "ACTIVE_THRESHOLD",
    "EMPTY",
    "INPUT",
    "Accumulator",
    "ExactSum",
    "TopK",
    "UnitStats",
    "StatsAccumulator",
    "LayerStats",
    "ENGINES",
    "StatsPlan",
    "Engine",
    "LocalEngine",
    "RayEngine",
    "MiningStep",
    "MiningProgress",
    "make_engine",
    "mine",
    "update_states",
    "num_batches",
    "batch_indices",
    "worker_device",
]
