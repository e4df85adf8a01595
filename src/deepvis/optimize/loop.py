"""The optimization loop: many units at once, each batch element with its own objective.

x* = argmax_x a_i(x) − R_θ(x), by gradient ascent with the regularization operator applied between
steps (Yosinski et al. 2015). Each step: forward (stopping at the deepest layer the objectives read),
the gradient of each element's objective with respect to its image, the update ``x ← x + lr·g``, then
decay, blur, small-norm clipping, small-contribution clipping, and the clip to valid pixels. The best
image seen (highest objective) is returned, not the last.

A batch of units is optimized together, but nothing couples the elements: every element has its own
random stream (seeded from the run's seed and its objective's name), its own percentiles, learning
rate and best-image tracking. So a unit's result does not depend on what else is in the batch or on
its position in it (up to float rounding: batched convolutions may sum in another order).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..capture.hooks import capture
from ..capture.layers import check_unit, get_layer
from ..capture.state import frozen
from ..capture.units import LOGITS, Unit, parse_unit
from ..errors import DeepvisError, UnitError
from ..models.model import Model
from .images import display_image, raw_image
from .objectives import OBJECTIVE_KINDS, BatchObjective, Neuron, Objective, objective_for_unit
from .param import ImageParam
from .presets import PAPER_SIZE, Settings, get_preset
from .regularizers import ClipRange, ClipSmallContribution, ClipSmallNorm, GaussianBlur, L2Decay, Regularizer, StepInfo
from .transforms import RandomAffine

__all__ = [
    "Result",
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

    def raw_image(self) -> Image.Image:
        """The image exactly as the model saw it (pixels rounded to whole levels)."""
        return raw_image(self.image)

    def display_image(self) -> Image.Image:
        """The contrast-stretched version for viewing (see :func:`deepvis.optimize.images.display_image`)."""
        return display_image(self.image, self.mean)

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
            "size": list(self.size),
            "seed": self.seed,
            "element_seed": self.element_seed,
            "settings": self.settings.to_dict(),
            "model_units": self.mapping,
            "mean_pixel": list(self.mean),
        }
        if trace:
            d["trace"] = self.trace
        return d


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
    model: Model, targets: Sequence[Target], *, kind: str = "neuron", size: int | tuple[int, int] | None = None
) -> list[Objective]:
    """Objectives for ``targets`` — :class:`Unit` s, unit strings (``blocks.3:7``, ``logits:281``) or
    objectives — checked against the model at the canvas ``size``: the layer exists, the channel and
    position are in range. A unit without a position becomes the neuron at the map's center
    (``kind="neuron"``) or the channel's mean (``kind="channel"``)."""
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
            label = model.short_label(t.channel) if t.layer == LOGITS and model.class_names else None
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
        return str(Unit(o.layer, o.channel, o.position)), o.label
    from .objectives import Channel

    if isinstance(o, Channel):
        return str(Unit(o.layer, o.channel)), None
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
) -> list[Result]:
    """Optimize one batch: element ``i`` maximizes ``objectives[i]``; one :class:`Result` per element.

    ``settings`` gives every θ; ``regularizers`` replaces the paper's operators built from it (the
    valid-range clip always runs last); ``on_step(t)`` is called after each step; ``should_stop`` (a
    callable or ``threading.Event``) cancels between steps; ``micro_batch``: elements per forward and
    backward pass (None: :func:`auto_micro_batch`). Objectives are not re-validated here (see
    :func:`resolve_targets`).
    """
    stop = _stop_fn(should_stop)
    prep = model.preprocessing
    device = model.device
    n, c = len(objectives), prep.channels
    h, w = size
    scale = spatial_scale(model)
    pixel_scale = prep.pixel_scale().to(device, torch.float32).view(1, c, 1, 1)
    low = prep.valid_range()[0].to(device, torch.float32).view(1, c, 1, 1)
    mean = -low / pixel_scale  # the mean image in 0–255 pixels, per channel
    clip = ClipRange(-mean.flatten(), 255.0 - mean.flatten())
    regs = list(build_regularizers(settings, scale) if regularizers is None else regularizers)
    param = ImageParam(fourier=settings.fourier, decorrelate=settings.decorrelate, decay_power=settings.decay_power)
    warp = RandomAffine(settings.jitter * scale, settings.scale, settings.rotate)
    mb = micro_batch or auto_micro_batch(device, size)
    if mb < 1:
        raise DeepvisError(f"micro batch must be at least 1, not {mb}")
    chunks = [slice(i, min(i + mb, n)) for i in range(0, n, mb)]
    chunk_objs = [BatchObjective(objectives[sl]) for sl in chunks]
    layers = chunk_objs[0].layers if len(chunks) == 1 else BatchObjective(objectives).layers
    seeds = [element_seed(seed, o.name) for o in objectives]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    x0 = torch.stack([torch.randn(c, h, w, generator=g) for g in gens]) * settings.start_std
    x = clip(x0.to(device))

    best_v = torch.full((n,), -math.inf, device=device)
    best_x = x.clone()
    best_step = torch.zeros(n, dtype=torch.long, device=device)
    active = torch.ones(n, dtype=torch.bool, device=device)
    dead_step = torch.full((n,), -1, dtype=torch.long, device=device)
    trace = torch.zeros(settings.steps, n, device=device)
    adam = settings.optimizer == "adam"
    p = param.from_image(x)
    m1 = torch.zeros_like(p) if adam else None
    m2 = torch.zeros_like(p) if adam else None
    steps_run = 0
    module = model.module
    with frozen(module), torch.enable_grad():
        for t in range(settings.steps):
            if stop():
                break
            wp = warp.sample(gens) if warp.active else None
            parts = [
                _forward_backward(model, param, warp, p[sl], None if wp is None else wp[sl], bo, layers, size, pixel_scale)
                for sl, bo in zip(chunks, chunk_objs)
            ]
            v, g_p, g_x, xd = (torch.cat(t_) if len(parts) > 1 else t_[0] for t_ in zip(*parts))
            trace[t] = v
            steps_run = t + 1
            better = active & (v > best_v)
            best_v = torch.where(better, v, best_v)
            best_step = torch.where(better, t, best_step)
            best_x = torch.where(better.view(-1, 1, 1, 1), xd, best_x)
            newly_dead = active & (g_x.flatten(1).abs().amax(1) == 0)
            dead_step = torch.where(newly_dead, t, dead_step)
            active = active & ~newly_dead
            if t < settings.steps - 1:
                with torch.no_grad():
                    p = _update(p.detach(), g_p, settings, t, m1, m2)
                    x_new = param.to_image(p, size)
                    info = StepInfo(t, g_x)
                    for r in regs:
                        x_new = r(x_new, info)
                    x_new = torch.where(active.view(-1, 1, 1, 1), clip(x_new), xd)
                    p = param.from_image(x_new)
            if on_step is not None:
                on_step(t)
    trace_cpu = trace[:steps_run].T.cpu()
    vals, bsteps, dsteps = best_v.cpu().tolist(), best_step.cpu().tolist(), dead_step.cpu().tolist()
    images = (best_x + mean).clamp(0, 255).cpu()
    mean_t = tuple(float(m) for m in mean.flatten().cpu())
    mapping = {"spatial_scale": scale, "blur_sigma_px": settings.blur_width * scale, "jitter_px": settings.jitter * scale}
    results = []
    for i, o in enumerate(objectives):
        unit, label = _unit_of(o)
        tr = trace_cpu[i].tolist()
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
                size=(h, w),
                model=model.name,
                mean=mean_t,
                mapping=dict(mapping),
            )
        )
    return results


def auto_micro_batch(device: torch.device, size: tuple[int, int]) -> int:
    """Elements per forward/backward pass: all of them on an accelerator; on the CPU at most 32 at
    224 px or less, fewer for larger images. Measured on 2-core machines with the glibc settings of
    :mod:`deepvis.allocator`: a pass over 64 images of 128 px costs 2.5-3.5x more per image than two
    passes over 32 (large activation buffers fall out of the heap), while 16-32 cost the same."""
    if device.type != "cpu":
        return 1 << 30
    return int(max(1, min(32, 32 * 224 * 224 // (size[0] * size[1]))))


def _forward_backward(
    model: Model,
    param: ImageParam,
    warp: RandomAffine,
    p: torch.Tensor,
    warp_params: torch.Tensor | None,
    objective: BatchObjective,
    layers: tuple[str, ...],
    size: tuple[int, int],
    pixel_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One forward/backward pass of some elements: (values, gradient w.r.t. the parameters, gradient
    w.r.t. the image, the image), all detached."""
    p = p.detach().requires_grad_(True)
    xi = param.to_image(p, size)
    seen = warp(xi, warp_params) if warp_params is not None else xi
    z = seen * pixel_scale  # = (mean + x)·pixel_scale + low, as mean·pixel_scale = −low
    acts = capture(model, z, layers, grad=True)
    v = objective(acts)
    if param.identity:
        (g_p,) = torch.autograd.grad(v.sum(), [p])
        g_x = g_p
    else:
        g_p, g_x = torch.autograd.grad(v.sum(), [p, xi])
    return v.detach(), g_p, g_x, xi.detach()


def _update(p: torch.Tensor, g: torch.Tensor, s: Settings, t: int, m1: torch.Tensor | None, m2: torch.Tensor | None) -> torch.Tensor:
    """One ascent step on the parameters, per element: SGD (constant or progress lr) or Adam."""
    if s.optimizer == "adam":
        assert m1 is not None and m2 is not None
        b1, b2, eps = 0.9, 0.999, 1e-8
        m1.mul_(b1).add_(g, alpha=1 - b1)
        m2.mul_(b2).addcmul_(g, g, value=1 - b2)
        mhat = m1 / (1 - b1 ** (t + 1))
        vhat = m2 / (1 - b2 ** (t + 1))
        return p + s.lr * mhat / (vhat.sqrt() + eps)
    if s.lr_policy == "progress":
        g2 = g.flatten(1).pow(2).sum(1)
        lr = torch.where(g2 > 0, s.desired_prog / g2, torch.full_like(g2, s.lr)).clamp_max(s.lr)
        return p + lr.view(-1, *([1] * (g.ndim - 1))) * g
    return p + s.lr * g


def visualize(
    model: Model,
    targets: Sequence[Target],
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
    **overrides: Any,
) -> list[Result]:
    """Activation maximization of many units, ``batch_size`` at a time: one :class:`Result` per target.

    ``targets``: :class:`~deepvis.capture.Unit` s, unit strings (``"blocks.3:7"``, ``"logits:281"``) or
    :class:`~deepvis.optimize.objectives.Objective` s. ``preset``: ``1``–``4`` (the paper's Table 1),
    ``none`` (plain ascent), ``robust``, or a :class:`Settings`; ``steps`` and any other θ
    (``decay=``, ``blur_width=``, ``lr=``, ``jitter=``, … see :class:`Settings`) override it. ``size``:
    the canvas in pixels (default: the model's input size). ``kind``: ``neuron`` (the unit at the map's
    center, the paper's choice) or ``channel`` (the channel's mean) for units without a position.
    ``progress(done, total)`` is called after every step (``total`` = steps × batches);
    ``should_stop()`` (or a set ``threading.Event``) cancels after the current step: the results of
    finished batches and of the one in progress (best so far, ``stopped=True``) are returned, later
    targets are left out. Results do not depend on ``batch_size`` or on the order of ``targets``.
    ``micro_batch``: elements per forward/backward pass (default: :func:`auto_micro_batch`).
    """
    settings = get_preset(preset).replace(steps=steps, **overrides)
    if batch_size < 1:
        raise DeepvisError(f"batch size must be at least 1, not {batch_size}")
    hw = canvas_size(model, size)
    objectives = resolve_targets(model, targets, kind=kind, size=hw)
    stop = _stop_fn(should_stop)
    chunks = [objectives[i : i + batch_size] for i in range(0, len(objectives), batch_size)]
    total = settings.steps * len(chunks)
    results: list[Result] = []
    for k, chunk in enumerate(chunks):
        if k and stop():
            break
        base = k * settings.steps
        on_step = (lambda t, base=base: progress(base + t + 1, total)) if progress is not None else None
        results += optimize_batch(model, chunk, settings, size=hw, seed=seed, on_step=on_step, should_stop=stop, micro_batch=micro_batch)
        if results and results[-1].stopped:
            break
    return results
