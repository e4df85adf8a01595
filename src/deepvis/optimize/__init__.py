"""Activation maximization (the paper's second tool): find the image that most excites a unit.

>>> from deepvis.optimize import visualize
>>> results = visualize(model, ["blocks.3:7", "logits:281"], preset=3, steps=200, size=128)
>>> results[0].display_image().save("unit.png")

What to maximize (:mod:`.objectives`), how the image is parameterized (:mod:`.param`), what happens
between steps (:mod:`.regularizers`, :mod:`.transforms`), the settings (:mod:`.presets`, the paper's
Table 1) and the batched loop (:mod:`.loop`) are separate pieces.
"""

from .calibrate import REFERENCE, Calibration, Reference
from .images import FAINT_RMS, contrast, contrast_text, display_image, raw_image
from .loop import (
    Result,
    Target,
    auto_micro_batch,
    build_regularizers,
    canvas_size,
    element_seed,
    optimize_batch,
    resolve_targets,
    spatial_scale,
    visualize,
)
from .objectives import (
    OBJECTIVE_KINDS,
    BatchObjective,
    Channel,
    CustomObjective,
    LinearCombination,
    Neuron,
    Objective,
    channel,
    class_logit,
    custom,
    neuron,
    objective_for_unit,
)
from .param import COLOR_CORRELATION_SQRT, ImageParam, fourier_scale
from .presets import LR_POLICIES, OPTIMIZERS, PAPER_SIZE, PRESETS, Settings, get_preset, preset_names
from .regularizers import (
    ClipRange,
    ClipSmallContribution,
    ClipSmallNorm,
    GaussianBlur,
    L2Decay,
    Regularizer,
    StepInfo,
    gaussian_blur_symmetric,
    gaussian_kernel,
    row_percentile,
)
from .transforms import RandomAffine

__all__ = [
    "visualize",
    "contrast",
    "contrast_text",
    "FAINT_RMS",
    "optimize_batch",
    "resolve_targets",
    "Result",
    "Target",
    "Settings",
    "PRESETS",
    "REFERENCE",
    "Reference",
    "Calibration",
    "get_preset",
    "preset_names",
    "PAPER_SIZE",
    "LR_POLICIES",
    "OPTIMIZERS",
    "element_seed",
    "spatial_scale",
    "canvas_size",
    "auto_micro_batch",
    "build_regularizers",
    "Objective",
    "Neuron",
    "Channel",
    "LinearCombination",
    "CustomObjective",
    "BatchObjective",
    "OBJECTIVE_KINDS",
    "neuron",
    "channel",
    "class_logit",
    "custom",
    "objective_for_unit",
    "Regularizer",
    "StepInfo",
    "L2Decay",
    "GaussianBlur",
    "ClipSmallNorm",
    "ClipSmallContribution",
    "ClipRange",
    "gaussian_blur_symmetric",
    "gaussian_kernel",
    "row_percentile",
    "ImageParam",
    "COLOR_CORRELATION_SQRT",
    "fourier_scale",
    "RandomAffine",
    "raw_image",
    "display_image",
]
