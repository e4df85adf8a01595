"""The optimization loop: many units at once, each batch element with its own objective.

x* = argmax_x a_i(x) − R_θ(x), by gradient ascent with the regularization operator applied between
steps (Yosinski et al. 2015). Each step: forward (stopping at the deepest layer the objectives read),
the gradient of each element's objective with respect to its image, the update ``x ← x + lr·g``, then
decay, blur, small-norm clipping, small-contribution clipping, and the clip to valid pixels. The best
image seen (highest objective) is returned, not the last.

A batch of units is optimized together, but nothing couples the elements: every element has its own
random stream (seeded from the run's seed and its objective's name), its own percentiles, learning
rate and best-image tracking. So a unit's result does not depend on what else is in the batch or on
its position in it (up to float rounding: batched convolutions may sum in another order, and a large
constant lr or Adam's nearly sign-like first steps can amplify that rounding; in float64 batched and
single runs agree to ~1e-13 px).

The loop is made of small pieces: :class:`_PixelSpace` (where the image lives), :class:`_Passes` (the
micro-batched forward and backward passes), :class:`_Ascent` (SGD or Adam), :func:`_regularize` (r_θ),
:class:`_BestImages` (the bookkeeping of best images) and :class:`_DeadUnits` (the stopping rule).
"""

from __future__ import annotations

import hashlib
import html
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from PIL import Image

from .. import runtime
from .._progress import in_kernel, progress_bar
from ..capture.hooks import capture
from ..capture.layers import activation_bytes, check_unit, get_layer
from ..capture.state import frozen
from ..capture.units import Unit, parse_unit
from ..display import html_table, img_tag, panel, png_bytes, trace_svg
from ..errors import DeepvisError, UnitError
from ..models.model import Model, require_model
from .accentuate import Accentuation, FeatureAnchor, StartImage, start_tensor
from .calibrate import Calibrator, needs_calibration
from .images import contrast, contrast_text, display_image, raw_image
from .maco import AttributionMask, MacoParam, alpha_image, masked_image
from .objectives import OBJECTIVE_KINDS, BatchObjective, Channel, Neuron, Objective, objective_for_unit
from .param import ImageParam, make_param
from .presets import PAPER_SIZE, Settings, get_preset
from .regularizers import ClipRange, ClipSmallContribution, ClipSmallNorm, GaussianBlur, L2Decay, Regularizer, StayClose, StepInfo
from .transforms import RandomAffine

_T = TypeVar("_T")

__all__ = [
    "Result",
    "Results",
    "Target",
    "visualize",
    "optimize_batch",
    "resolve_targets",
    "element_seed",
    "spatial_scale",
    "build_regularizers",
    "canvas_size",
    "auto_micro_batch",
]

Target = Unit | str | Objective
StopSignal = Callable[[], bool] | threading.Event | None


@dataclass
class Result:
    """One optimized unit.

    ``image`` (C, H, W): 0–255 pixels exactly as the model saw them at the best step (before any
    random transformation); ``value``: the objective there (``best_step``, 0-based); ``trace``: the
    objective at every step run; ``dead``: the gradient was exactly 0 (the element then stopped, at
    ``dead_step``); ``stopped``: the run was cancelled before its last step. ``seed`` is the run's seed,
    ``element_seed`` the seed of this element's own random stream.
    """

    objective: str
    unit: str | None
    label: str | None
    image: torch.Tensor = field(repr=False)
    value: float
    best_step: int
    start_value: float
    trace: list[float] = field(repr=False)
    dead: bool
    dead_step: int | None
    steps_run: int
    stopped: bool
    seed: int
    element_seed: int
    settings: Settings
    size: tuple[int, int]
    model: str
    mean: tuple[float, ...]
    mapping: dict[str, Any] = field(default_factory=dict, repr=False)
    #: where the model's weights came from (:attr:`deepvis.models.Model.weights`, e.g. ``"random (seed 0)"``)
    weights: str = ""
    #: MACO's alpha mask (H, W) in [0, 1]: where the image matters (:mod:`.maco`); None for other parameterizations
    alpha: torch.Tensor | None = field(default=None, repr=False)
    #: feature accentuation (a start image given): the anchors and the distances reached from the start
    #: (``pixel_rms``, ``pixel_max`` in 0–255 levels, ``feature`` relative; :mod:`.accentuate`); None otherwise
    distance: dict[str, Any] | None = None
    #: calibration (:mod:`.calibrate`): the unit's measured scale and the lr / desired_prog it ran with; None when off
    calibration: dict[str, float] | None = None

    def raw_image(self) -> Image.Image:
        """The image exactly as the model saw it (pixels rounded to whole levels)."""
        return raw_image(self.image)

    def display_image(self) -> Image.Image:
        """The contrast-stretched version for viewing (see :func:`deepvis.optimize.images.display_image`)."""
        return display_image(self.image, self.mean)

    def contrast(self) -> dict[str, Any]:
        """How far the raw image lies from the mean image (RMS and peak in levels, the display version's
        stretch, ``faint``): :func:`deepvis.optimize.images.contrast` of :meth:`raw_image`, as scored."""
        return contrast(self.raw_image(), self.mean)

    def alpha_image(self) -> Image.Image | None:
        """MACO's alpha mask as a grayscale picture (255: matters most), or None without one."""
        return None if self.alpha is None else alpha_image(self.alpha)

    def masked_image(self) -> Image.Image | None:
        """The display image with the alpha mask as its transparency (RGBA), or None without a mask."""
        return None if self.alpha is None else masked_image(self.display_image(), self.alpha)

    def to_dict(self, *, trace: bool = True) -> dict[str, Any]:
        """A JSON-ready record: objective, value, steps, dead flag, seeds, every setting and the model."""
        d: dict[str, Any] = {
            "objective": self.objective,
            "unit": self.unit,
            "label": self.label,
            "value": self.value,
            "start_value": self.start_value,
            "best_step": self.best_step,
            "steps_run": self.steps_run,
            "stopped": self.stopped,
            "dead": self.dead,
            "dead_step": self.dead_step,
            "model": self.model,
            "weights": self.weights,
            "size": list(self.size),
            "seed": self.seed,
            "element_seed": self.element_seed,
            "settings": self.settings.to_dict(),
            "model_units": self.mapping,
            "mean_pixel": list(self.mean),
        }
        if self.alpha is not None:
            d["alpha_mean"] = float(self.alpha.mean())
        if self.distance is not None:
            d["accentuation"] = self.distance
        if self.calibration is not None:
            d["calibration"] = self.calibration
        if trace:
            d["trace"] = self.trace
        return d

    def _repr_png_(self) -> bytes:
        """The display image as PNG (IPython's display protocol)."""
        return png_bytes(self.display_image())

    def _repr_html_(self) -> str:
        """The display image, the objective at every step and the settings (IPython's display protocol)."""
        facts = [
            ("value", self.value),
            ("best step", self.best_step),
            ("steps run", self.steps_run),
            ("dead", self.dead),
            ("seed", self.seed),
            ("contrast", contrast_text(self.contrast())),
        ]
        settings = html_table(sorted(self.settings.to_dict().items()), ("setting", "value"))
        trace = trace_svg(self.trace, title="objective per step")
        body = f"<div style='display:flex;gap:12px;align-items:flex-start'>{img_tag(self.display_image(), alt=self.objective)}<div>{trace}{html_table(facts)}</div>{settings}</div>"
        return panel(body, title=f"{self.objective} ({self.model}, {self.size[0]}x{self.size[1]})")


class Results(list[Result]):
    """The results of :func:`visualize`: a plain list, shown in a notebook as a labelled grid."""

    def _repr_html_(self) -> str:
        """Each result's display image over its label and value (IPython's display protocol)."""
        cells = [
            f"<figure style='margin:0;text-align:center'>{img_tag(r.display_image(), alt=r.objective, width=128)}"
            f"<figcaption>{html.escape(r.label or r.objective)}<br>{r.value:.4g}</figcaption></figure>"
            for r in self
        ]
        return panel("<div style='display:flex;flex-wrap:wrap;gap:8px'>" + "".join(cells) + "</div>", title=f"{len(self)} optimized units")


def element_seed(seed: int, name: str) -> int:
    """The seed of one element's random stream: a hash of the run's seed and the objective's name."""
    digest = hashlib.blake2b(f"{int(seed)}|{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def spatial_scale(model: Model) -> float:
    """How much longer a pixel length of the paper (at 227 px) is on this model: input side / 227."""
    h, w = model.preprocessing.input_size
    return (h + w) / 2 / PAPER_SIZE


def canvas_size(model: Model, size: int | tuple[int, int] | None) -> tuple[int, int]:
    """The optimized image's (H, W): ``size`` (square when one number) or the model's input size."""
    if size is None:
        return tuple(model.preprocessing.input_size)  # type: ignore[return-value]
    hw = (size, size) if isinstance(size, int) else tuple(size)
    if len(hw) != 2 or min(hw) < 8:
        raise DeepvisError(f"image size must be at least 8 px, not {size}")
    return int(hw[0]), int(hw[1])


def build_regularizers(settings: Settings, scale: float) -> list[Regularizer]:
    """The paper's operators in its order (those switched on), lengths scaled by ``scale``."""
    regs: list[Regularizer] = []
    if settings.decay > 0:
        regs.append(L2Decay(settings.decay))
    if settings.blur_width > 0 and settings.blur_every > 0:
        regs.append(GaussianBlur(settings.blur_width * scale, settings.blur_every))
    if settings.norm_pct > 0:
        regs.append(ClipSmallNorm(settings.norm_pct))
    if settings.contrib_pct > 0:
        regs.append(ClipSmallContribution(settings.contrib_pct))
    return regs


def resolve_targets(
    model: Model, targets: Sequence[Target] | Target, *, kind: str = "neuron", size: int | tuple[int, int] | None = None
) -> list[Objective]:
    """Objectives for ``targets`` — :class:`Unit` s, unit strings (``blocks.3:7``, ``logits:281``,
    ``blocks.5:17@cls``) or objectives — checked against the model at the canvas ``size``: the layer
    exists, the channel, position and prefix token are in range. A unit without a position becomes the
    neuron at the map's center (``kind="neuron"``) or the channel's mean (``kind="channel"``); a
    prefix-token unit is that token's channel value."""
    if isinstance(targets, (str, Unit, Objective)):  # one target, not a sequence of them
        targets = [targets]
    if not targets:
        raise UnitError("no units to optimize")
    if kind not in OBJECTIVE_KINDS:
        raise DeepvisError(f"objective kind must be one of {', '.join(OBJECTIVE_KINDS)}, not {kind!r}")
    hw = canvas_size(model, size)
    shape = (model.preprocessing.channels, *hw)
    out: list[Objective] = []
    for t in targets:
        if isinstance(t, str):
            t = parse_unit(t)
        if isinstance(t, Unit):
            check_unit(model, t, shape)
            label = model.short_label(t.channel) if t.is_class and model.class_names else None
            out.append(objective_for_unit(t, kind, label))
        elif isinstance(t, Objective):
            for layer in t.layers:
                get_layer(model, layer, shape)
            out.append(t)
        else:
            raise TypeError(f"a target is a Unit, a unit string or an Objective, not {type(t).__name__}")
    return out


def _unit_of(o: Objective) -> tuple[str | None, str | None]:
    if isinstance(o, Neuron):
        return str(o.unit), o.label
    if isinstance(o, Channel):
        return str(o.unit), None
    return None, None


def _stop_fn(should_stop: StopSignal) -> Callable[[], bool]:
    if should_stop is None:
        return lambda: False
    if isinstance(should_stop, threading.Event):
        return should_stop.is_set
    return should_stop


def optimize_batch(
    model: Model,
    objectives: Sequence[Objective],
    settings: Settings,
    *,
    size: tuple[int, int],
    seed: int = 0,
    regularizers: Sequence[Regularizer] | None = None,
    on_step: Callable[[int], None] | None = None,
    should_stop: StopSignal = None,
    micro_batch: int | None = None,
    start: torch.Tensor | None = None,
    accentuation: Accentuation | None = None,
    param: ImageParam | MacoParam | None = None,
) -> list[Result]:
    """Optimize one batch: element ``i`` maximizes ``objectives[i]``; one :class:`Result` per element.

    Args:
        model: the network; left as it was found (training flags, ``requires_grad``, no hooks).
        objectives: one per element, already checked (see :func:`resolve_targets`).
        settings: every θ (see :class:`Settings`).
        size: the canvas (H, W) in pixels.
        seed: the run's seed; each element's own random stream is :func:`element_seed` of it.
        regularizers: replaces the paper's operators built from ``settings`` (the valid-range clip
            always runs last).
        on_step: called with the 0-based step after each step.
        should_stop: a callable or ``threading.Event``; cancels between steps.
        micro_batch: elements per forward and backward pass (None: :func:`auto_micro_batch`). A pass
            that runs out of device memory is retried with half as many elements per pass
            (:func:`deepvis.runtime.halve_on_oom`), and the size it settles on is kept for the rest of
            the run, with one note on stderr; results do not change (each element's result does not
            depend on its batch companions).
        start: feature accentuation (:mod:`.accentuate`): the start images (N, C, H, W) in 0–255 pixels
            instead of noise; the change from them is regularized and kept within ``accentuation``.
        accentuation: the anchors of a run with ``start`` (None: :class:`Accentuation` ()).
        param: replaces the parameterization built from ``settings`` (:func:`.param.make_param`).

    Returns:
        One :class:`Result` per element, in the order of ``objectives``.
    """
    model = require_model(model)
    stop = _stop_fn(should_stop)
    space = _PixelSpace.of(model)
    scale = spatial_scale(model)
    regs = list(build_regularizers(settings, scale) if regularizers is None else regularizers)
    param = make_param(settings) if param is None else param
    warp = RandomAffine(settings.jitter * scale, settings.scale, settings.rotate)
    mb = micro_batch or auto_micro_batch(model.device, size, model)
    if mb < 1:
        raise DeepvisError(f"micro batch must be at least 1, not {mb}")
    seeds = [element_seed(seed, o.name) for o in objectives]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    passes = _Passes(model, objectives, mb, param, warp, size, space.pixel_scale, space.clip)
    x0 = close = None
    if start is not None:  # feature accentuation: start from the images, anchored to them
        if not param.exact_inverse:
            raise DeepvisError("a start image needs the pixel or Fourier parameterization, not MACO (it fixes the magnitude)")
        acc = accentuation or Accentuation()
        x0 = space.clip(start.to(model.device, torch.float32) - space.mean)
        close = StayClose(x0, acc.radius)
        passes.anchor_to(x0, acc, FeatureAnchor.layers_for(objectives, acc.feature_layer))
        x = x0.clone()
    else:
        x = space.clip(_start_images(gens, model.preprocessing.channels, size, settings.start_std).to(model.device))
    best = _BestImages(x, settings.steps)
    alive = _DeadUnits(len(objectives), x.device)
    mask = AttributionMask(len(objectives), size, x.device) if isinstance(param, MacoParam) else None
    p = param.from_image(x)
    ascent = _Ascent(settings, p)
    calib = Calibrator(model, objectives, settings, size) if needs_calibration(settings) else None
    with frozen(model.module), torch.enable_grad():
        for t in range(settings.steps):
            if stop():
                break
            v, g_p, g_x, xd = passes.run(p, warp.sample(gens) if warp.active else None)
            if t == 0 and calib is not None:  # the first step's gradient sets each unit's scale
                ascent.lr, ascent.desired_prog = calib.rates(g_p)
            best.record(t, v, xd, alive.active)
            alive.record(t, g_x)
            if mask is not None:
                mask.record(xd, g_x, alive.active)
            if t < settings.steps - 1:  # the last step is only measured
                with torch.no_grad():
                    p = _next_params(param, ascent(p.detach(), g_p, t), p, xd, alive.active, regs, StepInfo(t, g_x), space, size, x0, close)
            if on_step is not None:
                on_step(t)
    results = _results(model, objectives, settings, best, alive, space, seed, seeds, scale, size)
    alphas = mask.mask().cpu() if mask is not None else None
    for i, r in enumerate(results):
        r.mapping["param"] = param.name
        if alphas is not None:
            r.alpha = alphas[i]
    if calib is not None:
        for r, c in zip(results, calib.records):
            r.calibration = c.to_dict()
    if x0 is not None:
        for r, d in zip(results, passes.distances(best.image, x0, accentuation or Accentuation())):
            r.distance = d
    return results


def auto_micro_batch(device: torch.device, size: tuple[int, int], model: Model | None = None) -> int:
    """Elements per forward/backward pass. On the CPU at most 32 at 224 px or less, fewer for larger
    images. Measured on 2-core machines with the glibc settings of :mod:`deepvis.allocator`: a pass
    over 64 images of 128 px costs 2.5-3.5x more per image than two passes over 32 (large activation
    buffers fall out of the heap), while 16-32 cost the same. On a GPU: as many as its free memory
    holds (:func:`deepvis.runtime.choose_batch_size`, from ``model``'s activations at the canvas
    size, at most 256); all of them without a ``model``."""
    cpu = int(max(1, min(32, 32 * 224 * 224 // (size[0] * size[1]))))
    if model is None:
        return cpu if device.type == "cpu" else 1 << 30
    shape = (model.preprocessing.channels, *size)
    return runtime.choose_batch_size(device, lambda: activation_bytes(model, shape, backward=True), cpu_batch=cpu)


# -- the pieces of optimize_batch: where the image lives, how a step is taken, what is kept ----------
@dataclass(frozen=True)
class _PixelSpace:
    """Where the optimized image lives: 0–255 pixels measured from the mean image, fed to the model as
    ``x · pixel_scale`` (= ``(mean + x)·pixel_scale + low``, as ``mean·pixel_scale = −low``)."""

    pixel_scale: torch.Tensor  # (1, C, 1, 1)
    mean: torch.Tensor  # (1, C, 1, 1): the mean image in 0–255 pixels
    clip: ClipRange  # the valid pixels 0–255, from the mean

    @classmethod
    def of(cls, model: Model) -> _PixelSpace:
        prep, c = model.preprocessing, model.preprocessing.channels
        pixel_scale = prep.pixel_scale().to(model.device, torch.float32).view(1, c, 1, 1)
        mean = prep.mean_pixel().to(model.device, torch.float32).view(1, c, 1, 1)
        return cls(pixel_scale, mean, ClipRange(-mean.flatten(), 255.0 - mean.flatten()))


def _start_images(gens: Sequence[torch.Generator], channels: int, size: tuple[int, int], std: float) -> torch.Tensor:
    """The start (N, C, H, W): the mean image plus N(0, std²) noise, each element from its own stream."""
    return torch.stack([torch.randn(channels, *size, generator=g) for g in gens]) * std


class _Passes:
    """One step's forward and backward passes, in micro-batches: each pass reads the layers the whole
    batch needs and evaluates its own elements' objectives. Work that runs out of device memory is
    redone in micro-batches half as large (:meth:`fitting`), which then stay."""

    def __init__(
        self,
        model: Model,
        objectives: Sequence[Objective],
        micro_batch: int,
        param: ImageParam | MacoParam,
        warp: RandomAffine,
        size: tuple[int, int],
        pixel_scale: torch.Tensor,
        clip: ClipRange | None = None,
    ) -> None:
        self._all = list(objectives)
        self.split(micro_batch)
        self.layers = self.objectives[0].layers if len(self.chunks) == 1 else BatchObjective(objectives).layers
        self.model, self.param, self.warp, self.size, self.pixel_scale = model, param, warp, size, pixel_scale
        # a parameterization without an exact inverse (MACO) cannot be clipped: the model sees the clipped image
        self.clip = clip if not param.exact_inverse else None
        self.anchor: FeatureAnchor | None = None

    def split(self, micro_batch: int) -> None:
        """Run ``micro_batch`` elements per pass from now on."""
        n = len(self._all)
        self.micro_batch = micro_batch = max(1, min(micro_batch, n))
        self.chunks = [slice(i, min(i + micro_batch, n)) for i in range(0, n, micro_batch)]
        self.objectives = [BatchObjective(self._all[sl]) for sl in self.chunks]

    def fitting(self, work: Callable[[], _T]) -> _T:
        """``work()`` (passes over :attr:`chunks`), redone in micro-batches half as large each time the
        device runs out of memory; a smaller size that worked is kept, with one note on stderr."""

        def attempt(micro_batch: int) -> _T:
            if micro_batch != self.micro_batch:
                self.split(micro_batch)
            return work()

        note = runtime.oom_note("the optimized images' forward and backward passes")
        return runtime.halve_on_oom(attempt, self.micro_batch, what="an optimized image's forward and backward pass", on_smaller=note)

    def _forward(self, x: torch.Tensor, layers: Sequence[str], grad: bool) -> dict[str, torch.Tensor]:
        # the image stays float32; capture casts it for a half-precision model, the objectives read float32
        return {k: v.float() for k, v in capture(self.model, x * self.pixel_scale, list(layers), grad=grad).items()}

    def _measure(self, x: torch.Tensor, layers: Sequence[str]) -> dict[str, torch.Tensor]:
        """A forward pass outside the loop (the model in eval mode, no gradients), as the loop sees it."""
        with frozen(self.model.module), torch.no_grad():
            return self._forward(x, layers, grad=False)

    def anchor_to(self, x0: torch.Tensor, acc: Accentuation, element_layers: Sequence[str]) -> None:
        """Feature accentuation: read the start images ``x0`` (N, C, H, W, from the mean) once and anchor
        every element to its features (``acc.feature_weight`` 0: the values are still read, no anchor)."""
        layers = tuple(dict.fromkeys([*self.layers, *element_layers]))

        def read() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
            refs: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
            values = []
            for sl, objective in zip(self.chunks, self.objectives):
                acts = self._measure(x0[sl], layers)
                values.append(objective(acts))
                for k in layers:
                    refs[k].append(acts[k])
            return {k: torch.cat(v) for k, v in refs.items()}, torch.cat(values)

        reference, values = self.fitting(read)
        self.anchor = FeatureAnchor(acc.feature_weight, element_layers, reference, values)
        self.layers = layers

    def distances(self, x: torch.Tensor, x0: torch.Tensor, acc: Accentuation) -> list[dict[str, Any]]:
        """Per element, how far images ``x`` are from the starts ``x0`` (both (N, C, H, W), from the mean):
        ``pixel_rms`` / ``pixel_max`` (0–255 levels), ``feature`` (relative, in its feature layer), beside the anchors."""
        d = (x - x0).flatten(1)
        rms, mx = d.pow(2).mean(1).sqrt().tolist(), d.abs().amax(1).tolist()
        feats: list[float] = []
        anchor = self.anchor
        if anchor is not None:
            feats = self.fitting(
                lambda: [f for sl in self.chunks for f in anchor.distance(self._measure(x[sl], anchor.layers), sl).tolist()]
            )
        layers = self.anchor.element_layers if self.anchor is not None else [None] * len(rms)
        return [
            {**acc.to_dict(), "feature_layer": layers[i], "pixel_rms": rms[i], "pixel_max": mx[i], "feature": feats[i] if feats else None}
            for i in range(len(rms))
        ]

    def run(self, p: torch.Tensor, warp_params: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(values (N,), gradient w.r.t. the parameters, gradient w.r.t. the image, the image), detached.
        Redone in smaller micro-batches when the device runs out of memory (:meth:`fitting`)."""

        def step() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
            parts = [
                self._one(p[sl], None if warp_params is None else warp_params[sl], objective, sl)
                for sl, objective in zip(self.chunks, self.objectives)
            ]
            if len(parts) == 1:
                return parts[0]
            v, g_p, g_x, xd = (torch.cat(t) for t in zip(*parts))
            return v, g_p, g_x, xd

        return self.fitting(step)

    def _one(
        self, p: torch.Tensor, warp_params: torch.Tensor | None, objective: BatchObjective, sl: slice
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        p = p.detach().requires_grad_(True)
        xi = self.param.to_image(p, self.size)
        shown = self.clip(xi) if self.clip is not None else xi
        seen = self.warp(shown, warp_params) if warp_params is not None else shown
        acts = self._forward(seen, self.layers, grad=True)
        v = objective(acts)
        loss = v if self.anchor is None else v - self.anchor.penalty(acts, sl)
        if self.param.identity:
            (g_p,) = torch.autograd.grad(loss.sum(), [p])
            g_x = g_p
        else:
            g_p, g_x = torch.autograd.grad(loss.sum(), [p, xi])
        return v.detach(), g_p, g_x, shown.detach()


class _Ascent:
    """One ascent step on the parameters, per element: SGD (constant or progress lr) or Adam (with
    its moment estimates)."""

    def __init__(self, settings: Settings, p: torch.Tensor) -> None:
        self.s = settings
        self.adam = settings.optimizer == "adam"
        self.m1 = torch.zeros_like(p) if self.adam else None
        self.m2 = torch.zeros_like(p) if self.adam else None
        #: calibrated SGD (:mod:`.calibrate`): per element (N,) lr and desired_prog; None: the settings' own
        self.lr: torch.Tensor | None = None
        self.desired_prog: torch.Tensor | None = None

    def __call__(self, p: torch.Tensor, g: torch.Tensor, t: int) -> torch.Tensor:
        s = self.s
        if self.m1 is not None and self.m2 is not None:
            b1, b2, eps = 0.9, 0.999, 1e-8
            self.m1.mul_(b1).add_(g, alpha=1 - b1)
            self.m2.mul_(b2).addcmul_(g, g, value=1 - b2)
            mhat = self.m1 / (1 - b1 ** (t + 1))
            vhat = self.m2 / (1 - b2 ** (t + 1))
            return p + s.lr * mhat / (vhat.sqrt() + eps)
        per = (-1, *([1] * (g.ndim - 1)))
        if s.lr_policy == "progress":
            g2 = g.flatten(1).pow(2).sum(1)
            if self.lr is not None and self.desired_prog is not None:
                lr = torch.where(g2 > 0, self.desired_prog / g2, self.lr).minimum(self.lr)
            else:
                lr = torch.where(g2 > 0, s.desired_prog / g2, torch.full_like(g2, s.lr)).clamp_max(s.lr)
            return p + lr.view(per) * g
        if self.lr is not None:
            return p + self.lr.view(per) * g
        return p + s.lr * g


def _next_params(
    param: ImageParam | MacoParam,
    p_new: torch.Tensor,
    p: torch.Tensor,
    xd: torch.Tensor,
    active: torch.Tensor,
    regs: Sequence[Regularizer],
    info: StepInfo,
    space: _PixelSpace,
    size: tuple[int, int],
    x0: torch.Tensor | None,
    close: StayClose | None,
) -> torch.Tensor:
    """The parameters after a step: the ascent's ``p_new`` made an image, regularized (for accentuation:
    the change from the start ``x0``, bounded by ``close``), clipped to valid pixels, and back; dead
    elements keep their image ``xd``. MACO with nothing to apply to the image keeps the phase itself (no
    image round trip: the model sees the clipped image anyway)."""
    if not param.exact_inverse and not regs and x0 is None:
        return torch.where(active.view(-1, *([1] * (p.ndim - 1))), p_new, p)
    x_new = param.to_image(p_new, size)
    if x0 is not None and close is not None:
        x_new = close(x0 + _regularize(x_new - x0, regs, info))
    else:
        x_new = _regularize(x_new, regs, info)
    if param.exact_inverse:
        x_new = space.clip(x_new)
    return param.from_image(torch.where(active.view(-1, 1, 1, 1), x_new, xd))


def _regularize(x: torch.Tensor, regs: Sequence[Regularizer], info: StepInfo) -> torch.Tensor:
    """The regularization operator r_θ: each regularizer in turn (the paper's order)."""
    for r in regs:
        x = r(x, info)
    return x


class _BestImages:
    """Per element: the objective at every step, and the best value, step and image seen so far."""

    def __init__(self, x: torch.Tensor, steps: int) -> None:
        n = x.shape[0]
        self.value = torch.full((n,), -math.inf, device=x.device)
        self.image = x.clone()
        self.step = torch.zeros(n, dtype=torch.long, device=x.device)
        self.trace = torch.zeros(steps, n, device=x.device)
        self.steps_run = 0

    def record(self, t: int, v: torch.Tensor, x: torch.Tensor, active: torch.Tensor) -> None:
        """Step ``t`` measured ``v`` (N,) on images ``x``; only ``active`` elements can improve."""
        self.trace[t] = v
        self.steps_run = t + 1
        better = active & (v > self.value)
        self.value = torch.where(better, v, self.value)
        self.step = torch.where(better, t, self.step)
        self.image = torch.where(better.view(-1, 1, 1, 1), x, self.image)


class _DeadUnits:
    """The stopping rule per element: an element whose image gradient is exactly 0 is dead from that
    step on (its image is kept, it can no longer improve)."""

    def __init__(self, n: int, device: torch.device) -> None:
        self.active = torch.ones(n, dtype=torch.bool, device=device)
        self.dead_step = torch.full((n,), -1, dtype=torch.long, device=device)

    def record(self, t: int, g_x: torch.Tensor) -> None:
        newly_dead = self.active & (g_x.flatten(1).abs().amax(1) == 0)
        self.dead_step = torch.where(newly_dead, t, self.dead_step)
        self.active = self.active & ~newly_dead


def _results(
    model: Model,
    objectives: Sequence[Objective],
    settings: Settings,
    best: _BestImages,
    alive: _DeadUnits,
    space: _PixelSpace,
    seed: int,
    seeds: Sequence[int],
    scale: float,
    size: tuple[int, int],
) -> list[Result]:
    """One :class:`Result` per element from what the loop kept (copied to the CPU)."""
    steps_run = best.steps_run
    trace = best.trace[:steps_run].T.cpu()
    vals, bsteps, dsteps = best.value.cpu().tolist(), best.step.cpu().tolist(), alive.dead_step.cpu().tolist()
    images = (best.image + space.mean).clamp(0, 255).cpu()
    mean = tuple(float(m) for m in space.mean.flatten().cpu())
    mapping = {"spatial_scale": scale, "blur_sigma_px": settings.blur_width * scale, "jitter_px": settings.jitter * scale}
    results = []
    for i, o in enumerate(objectives):
        unit, label = _unit_of(o)
        tr = trace[i].tolist()
        results.append(
            Result(
                objective=o.name,
                unit=unit,
                label=label,
                image=images[i],
                value=vals[i] if steps_run else math.nan,
                best_step=bsteps[i],
                start_value=tr[0] if tr else math.nan,
                trace=tr,
                dead=dsteps[i] >= 0,
                dead_step=dsteps[i] if dsteps[i] >= 0 else None,
                steps_run=steps_run,
                stopped=steps_run < settings.steps,
                seed=int(seed),
                element_seed=seeds[i],
                settings=settings,
                size=(size[0], size[1]),
                model=model.name,
                mean=mean,
                mapping=dict(mapping),
                weights=model.weights.label,
            )
        )
    return results


def visualize(
    model: Model,
    targets: Sequence[Target] | Target,
    *,
    preset: str | int | Settings = "3",
    steps: int | None = None,
    size: int | tuple[int, int] | None = None,
    seed: int = 0,
    batch_size: int = 32,
    kind: str = "neuron",
    progress: Callable[[int, int], None] | None = None,
    should_stop: StopSignal = None,
    micro_batch: int | None = None,
    start: StartImage | None = None,
    accentuation: Accentuation | None = None,
    **overrides: Any,
) -> Results:
    """Activation maximization of many units, ``batch_size`` at a time: one :class:`Result` per target.

    ``targets``: :class:`~deepvis.capture.Unit` s, unit strings (``"blocks.3:7"``, ``"logits:281"``) or
    :class:`~deepvis.optimize.objectives.Objective` s. ``preset``: ``1``–``4`` (the paper's Table 1),
    ``none`` (plain ascent), ``robust``, or a :class:`Settings`; ``steps`` and any other θ
    (``decay=``, ``blur_width=``, ``lr=``, ``jitter=``, … see :class:`Settings`) override it. ``size``:
    the canvas in pixels (default: the model's input size). ``kind``: ``neuron`` (the unit at the map's
    center, the paper's choice) or ``channel`` (the channel's mean) for units without a position.
    ``progress(done, total)`` is called after every step (``total`` = steps × batches; None: a progress bar
    in a Jupyter kernel, nothing elsewhere);
    ``should_stop()`` (or a set ``threading.Event``) cancels after the current step: the results of
    finished batches and of the one in progress (best so far, ``stopped=True``) are returned, later
    targets are left out. Results do not depend on ``batch_size`` or on the order of ``targets``.
    ``micro_batch``: elements per forward/backward pass (default: :func:`auto_micro_batch`).
    ``start``: feature accentuation (:mod:`.accentuate`): a Pillow image, or 0–255 pixels (C, H, W) or
    one per target (N, C, H, W), resized to the canvas: every unit starts there and stays within
    ``accentuation`` (default :class:`Accentuation` (): RMS radius 24 levels, feature weight 1); each
    result's ``distance`` says how far it went.
    """
    model = require_model(model)
    settings = get_preset(preset).replace(steps=steps, **overrides)
    if batch_size < 1:
        raise DeepvisError(f"batch size must be at least 1, not {batch_size}")
    hw = canvas_size(model, size)
    objectives = resolve_targets(model, targets, kind=kind, size=hw)
    starts = None if start is None else start_tensor(start, len(objectives), model.preprocessing.channels, hw)
    stop = _stop_fn(should_stop)
    chunks = [objectives[i : i + batch_size] for i in range(0, len(objectives), batch_size)]
    total = settings.steps * len(chunks)
    results: list[Result] = []
    bar = progress_bar(total=total, desc="optimize", unit="step", enabled=False if progress is not None else in_kernel())
    report = progress if progress is not None else (lambda done, _total: bar.update(done - bar.n))
    try:
        for k, chunk in enumerate(chunks):
            if k and stop():
                break
            base = k * settings.steps
            on_step = (lambda t, base=base: report(base + t + 1, total)) if progress is not None or not bar.disable else None
            results += optimize_batch(
                model,
                chunk,
                settings,
                size=hw,
                seed=seed,
                on_step=on_step,
                should_stop=stop,
                micro_batch=micro_batch,
                start=None if starts is None else starts[k * batch_size : k * batch_size + len(chunk)],
                accentuation=accentuation,
            )
            if results and results[-1].stopped:
                break
    finally:
        bar.close()
    return Results(results)
