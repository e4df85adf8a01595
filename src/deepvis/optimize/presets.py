"""Settings of the optimization: the paper's Table 1 presets and how they map onto any model.

**Units.** The paper's θ are for 0–255 pixels, mean-subtracted, at about 227 px (CaffeNet). deepvis
optimizes every model in those same units — the image ``x`` is 0–255 pixels measured from the mean
image — and feeds the model ``(mean + x) · pixel_scale + low`` (:meth:`Preprocessing.pixel_scale`,
:meth:`Preprocessing.valid_range`), i.e. exactly the normalization the model was trained with. So:

* ``decay`` (a fraction per step), ``norm_pct`` and ``contrib_pct`` (percentiles of the pixels) mean
  the same on every model;
* ``lr`` moves 0–255 pixels per unit of gradient (activation per pixel), as in the paper; the
  gradient is taken through the model's own normalization, so a model with ``std = 0.5`` sees the
  same pixel steps as one with ImageNet's std;
* the valid range is pixels 0–255, i.e. ``x ∈ [−mean·255, (1 − mean)·255]`` per channel;
* lengths in pixels (``blur_width``, ``jitter``) are multiplied by ``model input side / 227``: a model
  trained at 224 px sees objects at about the scale CaffeNet saw them at 227 px, so σ means the same
  fraction of an object. The canvas size (``size``) does not change them: a unit's receptive field
  has a fixed size in pixels.

What cannot be mapped: the activations' own scale differs between networks (CaffeNet's conv5 runs in
the hundreds, EfficientNet's bottlenecks near 1), so ``desired_prog`` (activation change per step)
and the balance between ``lr`` and ``decay`` still depend on the network.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ..choices import LR_POLICIES, OPTIMIZERS
from ..errors import DeepvisError

__all__ = ["Settings", "PRESETS", "get_preset", "preset_names", "PAPER_SIZE", "LR_POLICIES", "OPTIMIZERS"]

#: the input side (px) the paper's θ were chosen for
PAPER_SIZE = 227


@dataclass(frozen=True)
class Settings:
    """Every θ of one optimization run (paper units: 0–255 pixels from the mean, lengths at 227 px).

    The paper's regularizers: ``decay`` θ_decay; ``blur_width`` θ_b_width (σ, px) applied every
    ``blur_every`` steps θ_b_every (0: never); ``norm_pct`` θ_n_pct and ``contrib_pct`` θ_c_pct
    (percentiles, 0: off). Learning rate: ``lr_policy`` ``"constant"`` (step ``lr``) or ``"progress"``
    (step ``min(lr, desired_prog / ‖g‖²)``, so ``lr`` is the maximum). ``steps`` forward passes (the
    last one is only measured). ``start_std``: the start is the mean image plus N(0, start_std²) noise.

    Beyond the paper (off in its presets): ``optimizer`` ``"adam"`` (``lr`` is then Adam's step size,
    roughly pixels per step; ``lr_policy`` is ignored); ``fourier`` / ``decorrelate`` parameterizations
    and ``maco`` (phase only, natural magnitude: :mod:`.maco`; excludes the other two)
    (:mod:`.param`); ``jitter`` (px at 227), ``scale`` (factor range) and ``rotate`` (degrees)
    transformation robustness (:mod:`.transforms`).

    ``calibrate``: map ``lr`` and ``desired_prog`` onto the network's measured unit scale
    (:mod:`.calibrate`; on in the paper's presets and ``none``, off in a hand-made ``Settings``; only
    plain SGD is calibrated). Changing it keeps the preset's name: the θ are the same, read on another scale.
    """

    name: str = "custom"
    decay: float = 0.0
    blur_width: float = 0.0
    blur_every: int = 0
    norm_pct: float = 0.0
    contrib_pct: float = 0.0
    lr_policy: str = "constant"
    lr: float = 100.0
    desired_prog: float = 2.0
    steps: int = 500
    start_std: float = 10.0
    optimizer: str = "sgd"
    fourier: bool = False
    decay_power: float = 1.0
    decorrelate: bool = False
    maco: bool = False
    jitter: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    rotate: float = 0.0
    calibrate: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        problems = []
        if not 0 <= self.decay < 1:
            problems.append(f"decay must be in [0, 1), not {self.decay}")
        if self.blur_width < 0 or self.blur_every < 0:
            problems.append("blur width and blur period must be >= 0")
        for k in ("norm_pct", "contrib_pct"):
            if not 0 <= getattr(self, k) <= 100:
                problems.append(f"{k.replace('_', ' ')} must be a percentile in [0, 100]")
        if self.lr_policy not in LR_POLICIES:
            problems.append(f"lr policy must be one of {', '.join(LR_POLICIES)}, not {self.lr_policy!r}")
        if self.optimizer not in OPTIMIZERS:
            problems.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, not {self.optimizer!r}")
        if not self.lr > 0 or not self.desired_prog > 0:
            problems.append("lr and desired progress must be > 0")
        if self.steps < 1:
            problems.append(f"steps must be at least 1, not {self.steps}")
        if self.start_std < 0 or self.jitter < 0 or self.rotate < 0:
            problems.append("start std, jitter and rotate must be >= 0")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            problems.append(f"scale must be a range LOW,HIGH with 0 < LOW <= HIGH, not {self.scale}")
        if self.maco and (self.fourier or self.decorrelate):
            problems.append("maco replaces the Fourier and decorrelated parameterizations: switch them off")
        if problems:
            raise DeepvisError("bad optimization settings: " + "; ".join(problems))

    def replace(self, **changes: Any) -> Settings:
        """A copy with some θ changed (``None`` values are ignored); named ``custom`` unless given a name."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise DeepvisError(f"unknown optimization setting(s): {', '.join(unknown)}")
        if "scale" in changes:
            changes["scale"] = tuple(float(s) for s in changes["scale"])
        if changes and "name" not in changes and any(getattr(self, k) != v for k, v in changes.items() if k not in ("steps", "calibrate")):
            changes["name"] = f"{self.name}+custom" if self.name != "custom" else "custom"
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready record of every θ, plus ``beyond_paper`` (derived: see :attr:`beyond_paper`), so a
        stored image says whether it was made by the paper's method alone."""
        d = dataclasses.asdict(self)
        d["scale"] = list(self.scale)
        d["beyond_paper"] = self.beyond_paper
        return d

    @property
    def beyond_paper(self) -> bool:
        """True when any option outside the paper's method is on: Adam, a Fourier or decorrelated
        parameterization, MACO, or transformation robustness (jitter, scale, rotation)."""
        return (
            self.optimizer != "sgd"
            or self.fourier
            or self.decorrelate
            or self.maco
            or self.jitter > 0
            or self.scale != (1.0, 1.0)
            or self.rotate > 0
        )


_PAPER = "Yosinski et al. 2015, Table 1"

PRESETS: Mapping[str, Settings] = MappingProxyType(
    {
        "1": Settings(
            "1", 0.0, 0.5, 4, 50, 0, "progress", 100.0, 2.0, 500, calibrate=True, description=f"{_PAPER}, row 1: blur + small-norm clipping"
        ),
        "2": Settings(
            "2",
            0.3,
            0.0,
            0,
            20,
            0,
            "constant",
            100.0,
            2.0,
            750,
            calibrate=True,
            description=f"{_PAPER}, row 2: strong decay + small-norm clipping",
        ),
        "3": Settings(
            "3", 0.0001, 1.0, 4, 0, 0, "constant", 100.0, 2.0, 1000, calibrate=True, description=f"{_PAPER}, row 3: weak decay + blur"
        ),
        "4": Settings(
            "4",
            0.0,
            0.5,
            4,
            0,
            90,
            "progress",
            1e8,
            2.0,
            1000,
            calibrate=True,
            description=f"{_PAPER}, row 4: blur + small-contribution clipping",
        ),
        "none": Settings(
            "none", lr_policy="constant", lr=100.0, steps=500, calibrate=True, description="unregularized gradient ascent (for contrast)"
        ),
        "robust": Settings(
            "robust",
            decay=0.0001,
            blur_width=1.0,
            blur_every=4,
            optimizer="adam",
            lr=2.0,
            steps=512,
            fourier=True,
            decorrelate=True,
            jitter=8,
            scale=(0.9, 1.1),
            rotate=10.0,
            description="beyond the paper: preset 3's regularizers + decorrelated Fourier parameterization, "
            "Adam and transformation robustness (jitter, scale, rotation)",
        ),
        "maco": Settings(
            "maco",
            optimizer="adam",
            lr=0.5,
            steps=256,
            start_std=10.0,
            maco=True,
            jitter=16,
            scale=(1.0, 1.6),
            description="beyond the paper: MACO (Fel et al. 2023): phase-only Fourier parameterization with a natural "
            "amplitude spectrum, Adam on the phase and MACO's random crops (zoom 1-1.6x, shift), alpha mask saved",
        ),
    }
)


def preset_names() -> list[str]:
    """The names :func:`get_preset` accepts."""
    return list(PRESETS)


def get_preset(preset: str | int | Settings) -> Settings:
    """A preset by name or number (``1``–``4``: the paper's; ``none``: plain ascent; ``robust``: beyond
    the paper), or a :class:`Settings` as is."""
    if isinstance(preset, Settings):
        return preset
    key = str(preset).strip().lower()
    if key not in PRESETS:
        raise DeepvisError(f"unknown preset {preset!r}: use one of {', '.join(PRESETS)}")
    return PRESETS[key]
