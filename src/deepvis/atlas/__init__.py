"""The unit atlas: for every unit of chosen layers, its top-k dataset inputs (with receptive-field crops
and deconv views) and its synthesized image, in a resumable SQLite + PNG store, built locally or on Ray.

Mining runs on the one statistics engine (:mod:`deepvis.stats`: per-unit statistics, top-k, and the
local and Ray engines); this package adds the atlas's options, its unit tasks (views and synthesis)
and its store.

>>> from deepvis.atlas import AtlasOptions, build_atlas, open_atlas
>>> build_atlas("atlas", model, "demo", AtlasOptions(layers=("blocks.3",)))   # doctest: +SKIP
>>> with open_atlas("atlas") as atlas:                                         # doctest: +SKIP
...     rec = atlas.unit("blocks.3", 7)   # stats, top-9 with crop/view paths, synthesized image
"""

from ..stats import (
    ACTIVE_THRESHOLD,
    ENGINES,
    Engine,
    ExactSum,
    LayerStats,
    LocalEngine,
    MiningProgress,
    RayEngine,
    StatsAccumulator,
    TopK,
    UnitStats,
    batch_indices,
    make_engine,
    mine,
    num_batches,
)
from .build import AtlasSummary, build_atlas
from .mining import MiningPlan
from .options import AtlasOptions, SynthesisOptions
from .runner import run_task
from .show import unit_pane
from .store import ATLAS_IDENTITY_KEYS, Atlas, AtlasError, AtlasWriter, LayerRecord, SynthImage, TopImage, UnitRecord, open_atlas, unit_dir
from .tasks import UnitResult, UnitTask

__all__ = [
    "build_atlas",
    "AtlasOptions",
    "SynthesisOptions",
    "AtlasSummary",
    "ATLAS_IDENTITY_KEYS",
    "open_atlas",
    "Atlas",
    "AtlasWriter",
    "AtlasError",
    "LayerRecord",
    "UnitRecord",
    "TopImage",
    "SynthImage",
    "unit_dir",
    "unit_pane",
    "MiningPlan",
    "UnitTask",
    "UnitResult",
    "run_task",
    # the statistics engine the atlas mines with (defined in deepvis.stats)
    "UnitStats",
    "LayerStats",
    "TopK",
    "StatsAccumulator",
    "ExactSum",
    "ACTIVE_THRESHOLD",
    "batch_indices",
    "num_batches",
    "mine",
    "Engine",
    "LocalEngine",
    "RayEngine",
    "MiningProgress",
    "make_engine",
    "ENGINES",
]
