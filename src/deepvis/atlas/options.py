"""What to put in an atlas: :class:`AtlasOptions` and its :class:`SynthesisOptions` (plain data, no work)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..runtime import Autocast, autocast_name

__all__ = ["SynthesisOptions", "AtlasOptions"]


@dataclass(frozen=True)
class SynthesisOptions:
    """How units are synthesized: a paper preset (1-4) with optional overrides (``steps``; ``size`` in
    pixels), ``units_per_batch`` units optimized together (a fixed grouping, so results do not depend
    on resumes or engines)."""

    preset: str = "3"
    steps: int | None = None
    size: int | None = None
    seed: int = 0
    units_per_batch: int = 16

    def params(self) -> dict[str, Any]:
        """The parameters an atlas records (and checks when it is continued)."""
        return {"preset": self.preset, "steps": self.steps, "size": self.size, "seed": self.seed, "units_per_batch": self.units_per_batch}


@dataclass(frozen=True)
class AtlasOptions:
    """What to put in an atlas.

    ``top``: inputs kept per unit; ``batch_size``: inputs per forward pass (part of the atlas's identity:
    results are reproduced bit for bit only with the same batches); ``units``: the units of each layer
    that get views and synthesized images (a unit set like ``0-15``; None = all; mining always covers
    every unit); ``views``: make crops and backprop views (``view_mode``: deconv, guided or gradient);
    ``synthesis``: None to skip it; ``decode_threads``: image decoding threads per process;
    ``checkpoint_seconds``: how often mining progress is saved. A prefix token of a token layer is mined
    as its own vector layer ``LAYER@TOKEN`` (``blocks.5@cls``) when ``layers`` names it, or for every
    prefix token of every token layer in ``layers`` with ``prefix_tokens``. ``autocast``: the mining
    pass's forward passes run under autocast (``"bf16"``, ``"fp16"`` or the torch dtype, kept as the
    word; None: off; see :func:`deepvis.runtime.autocast`); the top-k values and statistics still
    accumulate in float32, and the crops, backprop views and synthesis never run under it. The atlas
    records it: a resume with another setting is refused (see :func:`~deepvis.atlas.build_atlas`).
    """

    layers: tuple[str, ...]
    top: int = 9
    batch_size: int = 64
    units: str | None = None
    views: bool = True
    view_mode: str = "deconv"
    views_units_per_task: int = 4
    synthesis: SynthesisOptions | None = field(default_factory=SynthesisOptions)
    decode_threads: int = 4
    checkpoint_seconds: float = 30.0
    prefix_tokens: bool = False
    autocast: Autocast = None

    def __post_init__(self) -> None:
        # a bad word fails here, in one line; a dtype is kept as its word (what the atlas records)
        object.__setattr__(self, "autocast", autocast_name(self.autocast))

    def layer_params(self) -> dict[str, Any]:
        """The per-layer parameters an atlas records (and checks when it is continued)."""
        return {"top": self.top, "batch_size": self.batch_size, "view_mode": self.view_mode}
