"""The unit atlas: for every unit of chosen layers, its top-k dataset inputs (with receptive-field crops
and deconv views) and its synthesized image, in a resumable SQLite + PNG store, built locally or on Ray.

>>> from deepvis.atlas import AtlasOptions, build_atlas, open_atlas
>>> build_atlas("atlas", model, "demo", AtlasOptions(layers=("blocks.3",)))   # doctest: +SKIP
>>> with open_atlas("atlas") as atlas:                                         # doctest: +SKIP
...     rec = atlas.unit("blocks.3", 7)   # stats, top-9 with crop/view paths, synthesized image
"""

from .build import AtlasOptions, AtlasSummary, SynthesisOptions, build_atlas, model_hash
from .engines import ENGINES, Engine, LocalEngine, MiningPlan, MiningProgress, RayEngine, make_engine
from .mining import ACTIVE_THRESHOLD, ExactSum, LayerMining, StatsAccumulator, TopK, UnitStats, batch_indices, mine, num_batches
from .show import unit_pane
from .store import Atlas, AtlasError, AtlasWriter, LayerRecord, SynthImage, TopImage, UnitRecord, open_atlas, unit_dir
from .tasks import UnitResult, UnitTask, run_task

__all__ = [
    "build_atlas",
    "AtlasOptions",
    "SynthesisOptions",
    "AtlasSummary",
    "model_hash",
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
    "UnitStats",
    "LayerMining",
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
    "MiningPlan",
    "MiningProgress",
    "make_engine",
    "ENGINES",
    "UnitTask",
    "UnitResult",
    "run_task",
]
