"""One frame of the live view: a forward pass, the layer's tiles as ``uint8``, the unit's map, the predictions.

Everything the page needs from one frame comes out of one forward pass (the selected layer and the
logits are captured together). The grid is sent as raw ``uint8`` values, one byte per activation,
already normalized and boosted; the page tiles them and applies the colormap. A token layer's prefix
tokens come apart (blob ``prefix``: (P, C) bytes on the grid's scale, header ``prefix``: their names;
the selected unit's values in ``unit_stats.prefix``); an attention layer is sent one tile per head, the
settings' query token's row over the key patches (header ``query``), its prefix keys as the strip.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..capture import LOGITS, LayerInfo, Unit, capture, check_unit, eval_mode, get_layer, layer_table, prefix_key
from ..choices import NORMALIZATIONS, Normalization
from ..errors import DeepvisError, InputError
from ..models.model import Model
from ..pixels import to_uint8
from ..predictions import class_scores_problem, predictions_from_table, top_k_table
from ..render import normalize_activations, strip_values
from ..runtime import Autocast, autocast_dtype, synchronize
from .protocol import ViewSettings, json_float

__all__ = [
    "FrameProcessor",
    "FrameOutput",
    "LayerActivations",
    "DiffState",
    "MAX_GRID_VALUES",
    "grid_factor",
    "quantize",
    "normalize_on_device",
    "scale_on_device",
    "device_uint8",
    "frame_image",
    "choose_memory_format",
]

#: a layer's tiles are average-pooled by an integer factor until they hold at most this many values
MAX_GRID_VALUES = 1 << 19
#: the running mean of the diff view: mean += DIFF_RATE * (activation - mean) per frame
DIFF_RATE = 0.1
#: largest frame a page may send, in pixels (the page sends frames at the model's input size)
MAX_FRAME_PIXELS = 4096 * 4096


def grid_factor(shape: tuple[int, ...], budget: int = MAX_GRID_VALUES) -> int:
    """The smallest integer pooling factor that brings a (C, H, W) layer under ``budget`` values (1 for vectors)."""
    if len(shape) != 3:
        return 1
    c, h, w = shape
    f = 1
    while c * math.ceil(h / f) * math.ceil(w / f) > budget and f < max(h, w):
        f += 1
    return f


def quantize(x01: np.ndarray) -> np.ndarray:
    """Values in [0, 1] → ``uint8`` 0–255, one byte per value as the page receives them
    (:func:`deepvis.pixels.to_uint8`: rounded half up, clipped)."""
    return to_uint8(x01)


def device_uint8(x01: torch.Tensor) -> torch.Tensor:
    """:func:`quantize` on the tensor's device: values in [0, 1] (float32) → ``uint8`` tensor of the same
    shape, rounded half up and clipped exactly as :func:`deepvis.pixels.to_uint8` does."""
    return (x01.float() * 255.0 + 0.5).clamp_(0, 255).to(torch.uint8)


def scale_on_device(acts: torch.Tensor, mode: Normalization = "layer") -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`deepvis.render.normalization_scale` on the tensor's device: ``(lo, span)`` of ``acts``
    (C, H, W) or (C,), scalars (``layer``) or shaped (C, 1, ...) (``channel``); ``none``: 0 and 1."""
    if mode == "none":
        return acts.new_zeros(()), acts.new_ones(())
    if mode not in NORMALIZATIONS:
        raise DeepvisError(f"unknown normalization {mode!r}: use one of {', '.join(NORMALIZATIONS)}")
    if mode == "channel" and acts.ndim > 1:
        axes = tuple(range(1, acts.ndim))
        lo, hi = acts.amin(dim=axes, keepdim=True), acts.amax(dim=axes, keepdim=True)
    else:
        lo, hi = acts.min(), acts.max()
    lo = lo.clamp(max=0)  # non-negative maps keep 0 as black
    return lo, hi - lo


def normalize_on_device(acts: torch.Tensor, mode: Normalization = "layer") -> torch.Tensor:
    """:func:`deepvis.render.normalize_activations` on the tensor's device (float32 in, float32 out,
    the same values): one example's activations (C, H, W) or (C,) scaled to [0, 1]."""
    if mode == "none":
        return acts.clamp(0, 1)
    lo, span = scale_on_device(acts, mode)
    safe = torch.where(span > 0, span, 1.0)
    return torch.where(span > 0, (acts - lo) / safe, 0.0)


Boosted = TypeVar("Boosted", torch.Tensor, np.ndarray)


def _boost(v: Boosted, s: ViewSettings) -> Boosted:
    """The toolbox's boost of normalized values (a tensor on any device, or a NumPy array on the CPU):
    times ``gain`` (clipped to [0, 1]), then ``** gamma``."""
    if s.gain != 1.0:
        v = (v * s.gain).clip(0.0, 1.0)
    if s.gamma != 1.0:
        v = v**s.gamma
    return v


def frame_image(pixels: memoryview | bytes, width: int, height: int, fmt: str, model: Model) -> Image.Image:
    """Turn raw RGBA/RGB bytes from the page into an image at the model's input size, in its mode."""
    channels = {"rgba": 4, "rgb": 3}.get(fmt)
    if channels is None:
        raise InputError(f"frame format {fmt!r} is not supported: send rgba or rgb")
    if not (isinstance(width, int) and isinstance(height, int)) or width < 1 or height < 1 or width * height > MAX_FRAME_PIXELS:
        raise InputError(f"frame size {width}x{height} is not allowed")
    if len(pixels) != width * height * channels:
        raise InputError(f"frame has {len(pixels)} bytes, expected {width}x{height}x{channels}")
    arr = np.frombuffer(pixels, dtype=np.uint8).reshape(height, width, channels)[:, :, :3]
    im = Image.fromarray(np.ascontiguousarray(arr), "RGB")
    if model.preprocessing.pil_mode != "RGB":
        im = im.convert(model.preprocessing.pil_mode)
    return fit_image(im, model)


def fit_image(im: Image.Image, model: Model) -> Image.Image:
    """An image as the model sees it: resized and center-cropped to the input size (unchanged if it already fits)."""
    h, w = model.preprocessing.input_size
    if im.size == (w, h):
        return im
    return model.preprocessing.fit(im)


def choose_memory_format(model: Model, *, repeats: int = 3, margin: float = 0.9) -> torch.memory_format:
    """Convert ``model``'s network to ``channels_last`` when that makes its forward pass faster.

    Times ``repeats`` batch-1 forward passes in each layout (after one warm-up) and keeps
    ``channels_last`` only when it takes less than ``margin`` times the default layout (for many
    convnets on the CPU it saves ~20%). The network is converted in place: call it on a private copy.
    """
    x = torch.zeros(1, *model.preprocessing.input_shape, device=model.device, dtype=model.dtype)
    seconds: dict[torch.memory_format, float] = {}
    with torch.no_grad(), eval_mode(model.module):
        for fmt in (torch.contiguous_format, torch.channels_last):
            model.module.to(memory_format=fmt)
            xx = x.contiguous(memory_format=fmt)
            model.module(xx)
            synchronize(x.device)  # CUDA runs asynchronously: time the kernels, not their launch
            start = time.perf_counter()
            for _ in range(repeats):
                model.module(xx)
            synchronize(x.device)
            seconds[fmt] = time.perf_counter() - start
    best = torch.channels_last if seconds[torch.channels_last] < margin * seconds[torch.contiguous_format] else torch.contiguous_format
    model.module.to(memory_format=best)
    return best


@dataclass
class DiffState:
    """The running mean of one layer's activations, for the diff view (one per page)."""

    layer: str | None = None
    mean: torch.Tensor | None = None
    frames: int = 0

    def reset(self) -> None:
        self.layer, self.mean, self.frames = None, None, 0

    def update(self, layer: str, acts: torch.Tensor) -> torch.Tensor:
        """Return ``acts`` minus the running mean before this frame, then fold ``acts`` into the mean."""
        if self.layer != layer or self.mean is None or self.mean.shape != acts.shape:
            self.layer, self.mean, self.frames = layer, acts.clone(), 0
        diff = acts - self.mean
        self.mean.add_(diff, alpha=DIFF_RATE)
        self.frames += 1
        return diff


@dataclass(frozen=True)
class LayerActivations:
    """One frame's forward pass as the view needs it again: the layer's activations (C, H, W) or (C,)
    and the predictions. A unit change on the same layer is redrawn from it without a forward pass."""

    layer: str
    acts: torch.Tensor
    predictions: list[dict[str, Any]] | None
    #: the prefix tokens (C, P) of a token layer (of an attention layer: the query's weights on the prefix keys)
    prefix: torch.Tensor | None = None
    #: the query an attention layer's ``acts`` are the row of (None for other layers)
    query: str | tuple[int, int] | None = None
    #: the layers next to ``layer`` in the page's list (:meth:`FrameProcessor.neighbours`), captured in
    #: the same pass: a switch to one of them is drawn from this pass at once
    neighbours: Mapping[str, LayerActivations] = field(default_factory=dict)

    def of(self, layer: str) -> LayerActivations | None:
        """This pass's activations of ``layer`` (its own layer's or a neighbour's), or None."""
        return self if layer == self.layer else self.neighbours.get(layer)


@dataclass
class FrameOutput:
    """What one frame produced: a JSON-able header and the binary payloads (``grid``, ``unit``)."""

    header: dict[str, Any]
    blobs: dict[str, bytes] = field(default_factory=dict)
    #: the model input (1, C, H, W) this frame was computed from, for the background unit view
    x: torch.Tensor | None = None
    #: the forward pass's results, to redraw another unit of the layer from
    activations: LayerActivations | None = None


class FrameProcessor:
    """Computes the live view of frames for one model; holds no per-page state (that is passed in)."""

    #: on the CPU, the grid, unit map and strip are made with numpy (no copy to save, and faster than
    #: torch's threads on busy cores); the device path gives the same pixels (the tests compare both)
    numpy_on_cpu = True

    def __init__(
        self, model: Model, *, k: int = 5, memory_format: torch.memory_format = torch.contiguous_format, autocast: Autocast = None
    ) -> None:
        self.model = model
        self.k = k
        #: the forward pass runs under this autocast (:func:`deepvis.runtime.autocast`; None: off)
        self.autocast = autocast
        autocast_dtype(autocast)  # a bad setting fails here, not on the first frame
        #: the layout of model inputs (``torch.channels_last`` when the network was converted to it)
        self.memory_format = memory_format
        self.table = layer_table(model)
        self._by_name = {info.name: info for info in self.table}
        # predictions need class scores: a model without a head outputs features (no predictions pane)
        self.has_logits = LOGITS in self._by_name and class_scores_problem(model) is None
        n = model.num_classes
        self._class_layers = {i.name for i in self.table if n is not None and i.shape == (n,)}
        self._checked: tuple[tuple[str, int, tuple[int, int] | None, object, str | None], LayerInfo] | None = None
        self._neighbours: dict[str, tuple[str, ...]] = {}

    def neighbours(self, name: str) -> tuple[str, ...]:
        """The layers before and after ``name`` in the page's layer list (the layers of the table that
        are :attr:`~LayerInfo.listed`, as the page lists them by default; its previous / next layer keys,
        which pass over the layers that output the same tensor as ``name``: ``same_as``), which a
        forward pass for ``name`` captures too, so that a switch to one of them is drawn from that pass
        at once. Attention layers are left out (their view depends on a query, and capturing one
        switches a fused attention to its explicit path), as are layers that cannot be viewed."""
        near = self._neighbours.get(name)
        if near is None:
            at = next((i for i, info in enumerate(self.table) if info.name == name), None)
            found: list[str] = []
            if at is not None:
                source = self.table[at].same_as or name
                for step in (-1, 1):
                    j = at + step
                    while 0 <= j < len(self.table) and (
                        not self.table[j].listed or (self.table[j].same_as or self.table[j].name) == source
                    ):
                        j += step
                    if 0 <= j < len(self.table):
                        lay = self.table[j].layout
                        if lay.kind != "attention" and (lay.kind in ("maps", "vector") or lay.viewable):
                            found.append(self.table[j].name)
            near = self._neighbours[name] = tuple(found)
        return near

    def layer(self, name: str) -> LayerInfo:
        info = self._by_name.get(name)
        return info if info is not None else get_layer(self.model, name)

    def check(self, settings: ViewSettings) -> LayerInfo:
        """Validate the settings' layer, unit and position against the model.

        The last answer is kept: the frame loop asks again on every frame, and its network (a
        private copy that nothing else changes) gives the same answer for the same unit.
        """
        key = (settings.layer, settings.unit, settings.position, settings.query, settings.token)
        if self._checked is not None and self._checked[0] == key:
            return self._checked[1]
        info = check_unit(self.model, Unit(settings.layer, settings.unit, settings.position, settings.token))
        if info.layout.kind == "attention":
            info.layout.query_index(settings.query)  # a query the layer lacks: one line
        self._checked = (key, info)
        return info

    def is_class_layer(self, name: str) -> bool:
        """True when the layer's units are the model's classes (so they have labels)."""
        return name in self._class_layers

    def to_input(self, image: Image.Image) -> torch.Tensor:
        """A fitted image → model input (1, C, H, W) on the model's device, in its floating dtype."""
        x = self.model.preprocessing.to_tensor(fit_image(image, self.model), crop=False)[None]
        x = x.to(self.model.device, self.model.dtype, non_blocking=True)
        return x.contiguous(memory_format=self.memory_format)

    def redrawable(self, cached: LayerActivations | None, settings: ViewSettings) -> bool:
        """True when ``settings``' view of a frame can be built from ``cached``, its earlier forward
        pass, with no new one: the same layer or one of its captured neighbours (and the query of an
        attention layer), and the diff view off (the diff's running mean takes each frame once)."""
        view = None if cached is None or settings.diff else cached.of(settings.layer)
        if view is None:
            return False
        info = self.check(settings)
        return view.query == (settings.query if info.layout.kind == "attention" else None)

    def process(
        self,
        x: torch.Tensor,
        settings: ViewSettings,
        diff: DiffState | None = None,
        cached: LayerActivations | None = None,
        cancel: Callable[[], bool] | None = None,
        predictions: bool = True,
    ) -> FrameOutput:
        """Run one frame (1, C, H, W) and build the page's view of it (see module docstring).

        ``cached``: this frame's earlier forward pass (:attr:`FrameOutput.activations`); when it can
        give the settings' view (:meth:`redrawable`: its layer, or a neighbour it captured), the view
        is built from it without a forward pass, and safely from any thread (nothing of the processor
        is changed), and it is returned as the output's ``activations``. A new forward pass captures
        the layer's :meth:`neighbours` too. ``cancel``: asked
        between the network's blocks during a forward pass; True abandons it
        (:class:`~deepvis.capture.CaptureCancelled`). ``predictions=False``: the forward pass stops at
        the layer (no logits, no ``predictions`` in the header: the page keeps the ones it shows), as
        for the first frame of a newly selected layer, shown sooner.
        """
        info = self.check(settings)
        header: dict[str, Any] = {"type": "frame", "layer": info.name, "unit": settings.unit, "token": settings.token}
        blobs: dict[str, bytes] = {}
        query = settings.query if info.layout.kind == "attention" else None
        pre: torch.Tensor | None = None
        table: torch.Tensor | None = None  # the top-k on the device, read with everything else
        top5: list[dict[str, Any]] | None = None
        near: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        view = cached.of(info.name) if cached is not None and self.redrawable(cached, settings) else None
        if view is not None:
            a, top5, pre = view.acts, view.predictions, view.prefix
        else:
            cached = None
            neighbours = self.neighbours(info.name)
            names = [info.name, *neighbours]
            logits = self.has_logits and (predictions or info.name == LOGITS)
            if logits and LOGITS not in names:
                names.append(LOGITS)
            with_prefix = any(self.layer(n).prefix for n in names)
            acts = capture(self.model, x, names, stop_early=True, prefix=with_prefix, query=query, autocast=self.autocast, cancel=cancel)
            a = acts[info.name][0].detach().float()
            if info.prefix:
                pre = acts[prefix_key(info.name)][0].detach().float()
            for n in neighbours:
                p = acts.get(prefix_key(n))
                near[n] = (acts[n][0].detach().float(), None if p is None else p[0].detach().float())
            if logits:
                table = top_k_table(acts[LOGITS], self.k)[0]

        shown = a
        if settings.diff and diff is not None:
            shown = diff.update(info.name, a)
        elif diff is not None and diff.layer is not None:
            diff.reset()
        factor = grid_factor(tuple(a.shape))
        if factor > 1:
            shown = F.avg_pool2d(shown[None], factor, ceil_mode=True)[0]
        # off the CPU everything the page gets is computed on the device and comes back in one copy: the
        # small numbers (float64, reinterpreted as bytes) first, then the uint8 grid, unit map and strip
        unit = a[settings.unit]
        numbers = [self._unit_numbers(unit, info, settings)]
        if table is not None:
            numbers.append(table.flatten())
        if pre is not None:
            numbers.append(pre[settings.unit].double())
        small = torch.cat(numbers)
        if a.device.type == "cpu" and self.numpy_on_cpu:
            blobs["grid"] = self._grid_bytes(shown, settings)
            if pre is not None and not settings.diff:
                blobs["prefix"] = self._prefix_bytes(pre, shown, settings)
            if info.spatial:
                blobs["unit"] = quantize(normalize_activations(unit[None], "channel")[0]).tobytes()
            values = small.tolist()
        else:
            parts = {"grid": self._grid_values(shown, settings)}
            if pre is not None and not settings.diff:
                parts["prefix"] = self._prefix_values(pre, shown, settings)
            if info.spatial:
                parts["unit"] = device_uint8(normalize_on_device(unit[None], "channel")[0])
            blob = torch.cat([small.view(torch.uint8), *(t.flatten() for t in parts.values())]).cpu().numpy()
            values = blob[: small.numel() * 8].view(np.float64).tolist()
            offset = small.numel() * 8
            for name, t in parts.items():
                blobs[name] = blob[offset : offset + t.numel()].tobytes()
                offset += t.numel()

        n_stats = len(numbers[0])
        header["unit_stats"] = self._unit_stats(values[:n_stats], unit, info, settings)
        rest = values[n_stats:]
        if table is not None:
            k = table.shape[1]
            rows = [rest[:k], rest[k : 2 * k], rest[2 * k : 3 * k]]
            top5 = [
                {"index": p.index, "label": p.label, "probability": round(p.probability, 5)}
                for p in predictions_from_table(self.model, [rows])[0]
            ]
            rest = rest[3 * k :]
        if top5 is not None:
            header["predictions"] = top5
        header["grid"] = {"shape": list(shown.shape), "factor": factor, "diff": bool(settings.diff)}
        if info.layout.kind == "attention":
            header["query"] = info.layout.query_name(query)
        if pre is not None and not settings.diff:
            header["prefix"] = {"names": list(info.prefix), "shape": [pre.shape[1], pre.shape[0]]}
        if pre is not None:
            header["unit_stats"]["prefix"] = [json_float(v) for v in rest]
        if info.spatial:
            header["unit_shape"] = list(unit.shape)
        if self.is_class_layer(info.name):
            header["unit_label"] = self.model.label(settings.unit)
        if cached is None:  # a new forward pass: what it captured, with the predictions
            others = {n: LayerActivations(n, t, top5, p) for n, (t, p) in near.items()}
            cached = LayerActivations(info.name, a, top5, pre, query, others)
        return FrameOutput(header, blobs, x, cached)

    @staticmethod
    def _prefix_bytes(pre: torch.Tensor, shown: torch.Tensor, s: ViewSettings) -> bytes:
        """The strip's (P, C) bytes on the CPU (numpy; :meth:`_prefix_values` on other devices)."""
        return quantize(_boost(strip_values(pre, shown, s.normalize), s)).tobytes()

    @staticmethod
    def _grid_bytes(shown: torch.Tensor, s: ViewSettings) -> bytes:
        """The grid's bytes on the CPU (numpy; :meth:`_grid_values` on other devices)."""
        if s.diff:
            d = shown.cpu().numpy()
            axes = tuple(range(1, d.ndim)) if (s.normalize == "channel" and d.ndim > 1) else None
            scale = np.abs(d).max(axis=axes, keepdims=True) if axes else np.array(np.abs(d).max())
            scale = np.where(scale > 0, scale, 1.0)
            v = 0.5 + 0.5 * np.clip(d * (s.gain / scale), -1.0, 1.0)
        else:
            v = _boost(normalize_activations(shown, s.normalize), s)
        return quantize(v).tobytes()

    @staticmethod
    def _prefix_values(pre: torch.Tensor, shown: torch.Tensor, s: ViewSettings) -> torch.Tensor:
        """The strip's (P, C) uint8 values: prefix tokens ``pre`` (C, P) on the grid's scale (``shown``),
        boosted alike (:func:`deepvis.render.strip_values`, on the device)."""
        lo, span = scale_on_device(shown, s.normalize)
        lo, span = (lo.reshape(-1, 1), span.reshape(-1, 1)) if lo.ndim else (lo, span)
        safe = torch.where(span > 0, span, 1.0)
        v = torch.where(span > 0, (pre - lo) / safe, 0.0).clamp(0.0, 1.0).T
        return device_uint8(_boost(v, s))

    @staticmethod
    def _grid_values(shown: torch.Tensor, s: ViewSettings) -> torch.Tensor:
        """The grid's uint8 values, shaped like ``shown``: normalized and boosted (or, in the diff view,
        centred on 0.5 and scaled by the largest magnitude), on the device."""
        if s.diff:
            axes = tuple(range(1, shown.ndim)) if (s.normalize == "channel" and shown.ndim > 1) else None
            mag = shown.abs()
            scale = mag.amax(dim=axes, keepdim=True) if axes else mag.max()
            scale = torch.where(scale > 0, scale, 1.0)
            return device_uint8(0.5 + 0.5 * (shown * (s.gain / scale)).clamp(-1.0, 1.0))
        return device_uint8(_boost(normalize_on_device(shown, s.normalize), s))

    @staticmethod
    def _unit_numbers(unit: torch.Tensor, info: LayerInfo, s: ViewSettings) -> torch.Tensor:
        """The unit's max, min, mean (and for maps its flat argmax and the pinned position's value) as
        float64 on the device (:meth:`_unit_stats` reads them)."""
        flat = unit.flatten()
        out = [flat.max(), flat.min(), flat.mean()]
        if info.spatial:
            out.append(flat.argmax().to(flat.dtype))
            if s.position is not None:
                out.append(unit[s.position[0], s.position[1]])
        return torch.stack([t.double() for t in out])

    @staticmethod
    def _unit_stats(values: list[float], unit: torch.Tensor, info: LayerInfo, s: ViewSettings) -> dict[str, Any]:
        stats: dict[str, Any] = {"max": values[0], "min": values[1], "mean": values[2]}
        if info.spatial:
            flat = int(values[3])
            w = unit.shape[1]
            stats["argmax"] = [flat // w, flat % w]
            if s.position is not None:
                stats["value"] = values[4]
        return {k: ((round(v, 6) if math.isfinite(v) else None) if isinstance(v, float) else v) for k, v in stats.items()}
