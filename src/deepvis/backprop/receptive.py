"""Receptive fields for any architecture, and receptive-field crops.

The receptive field of a unit at (y, x) of a layer is the input region that can influence it. Two
ways to get it, tried in this order (``method="auto"``):

* **the graph** (:mod:`.graph_field`): kernel, stride, padding and dilation composed along the executed
  graph of one forward pass, branches united; exact, also when the field is larger than the input (a
  427-px field on a 224-px input is 427 px at stride 32). A global operation before the layer
  (attention, global pooling, a fully connected layer, normalization over the whole map) makes the field
  the whole image, with the reason in :attr:`LayerField.whole_image`.
* **the probe**, for what the graph does not compose (upsampling, slicing, reflection padding, windowed
  attention, layers that are not (N, C, H, W) maps), measured from the support of gradients, so any
  architecture is handled; its full field size is at most what the input shows (a field larger than the
  input is reported at the input's size there):

  * one probe forward pass on a fixed random input, in which every elementwise nonlinearity (ReLU,
    SiLU, clamp, ...) passes gradients straight through and every 2-D max pooling passes them to its
    whole window (the forward values are unchanged), so that no input-dependent mask hides a pixel;
  * one backward pass per output row (seeded on the whole row, all channels) and per output column,
    batched: the rows of the input whose gradient is non-zero are the field's rows at that output row
    (and likewise for columns). The field of (y, x) is the box rows(y) × cols(x).

A gradient counts as non-zero above a small relative threshold on accelerators (cuDNN's Winograd/FFT
backward algorithms leave tiny non-zeros); on the CPU exactly.

The field of a prefix token of a token layer (``blocks.5:17@cls``) is measured the same way, from the
support of the token's gradient: after the first attention block it is the whole image (with the
reason read from the graph), and before any attention a token that no input pixel reaches (the class
token at ``pos_drop``: a learned constant plus its position embedding) is reported as input-independent
(:attr:`ReceptiveField.input_independent`), with an empty box, rather than as a box.

The field of a layer is the union over its channels (channels of a concatenation may see less).
Results are cached on ``model.cache`` per (layer, input size) (:data:`LAYER_FIELDS`; dropped when the
module's structure changes). Near the borders the field is clipped by the image;
:attr:`ReceptiveField.field` is the unclipped box of the full field size, which the crop helpers use
to pad border crops to a common size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, overload

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.overrides import TorchFunctionMode

from ..capture.hooks import capture
from ..capture.layers import check_unit, get_layer, layer_table, resolve_module
from ..capture.state import eval_mode, frozen
from ..capture.units import Unit, parse_unit, split_token_layer, token_layer
from ..display import png_bytes
from ..errors import DeepvisError, LayerError, UnitError
from ..models.cache import CacheSlot
from ..models.model import Model, require_model
from ..runtime import choose_batch_size, halve_on_oom, item_bytes
from .graph_field import Spatial, Whole, graph_state
from .rules import OTHER_FUNCS, RELU_FUNCS

__all__ = [
    "AxisField",
    "LayerField",
    "ReceptiveField",
    "layer_field",
    "receptive_field",
    "crop",
    "crop_image",
    "LAYER_FIELDS",
]

Box = tuple[int, int, int, int]  # (top, left, bottom, right), half-open, in input pixels

#: memory budget for the stored activations of one batch of probes on the CPU (on a GPU: its free memory)
_PROBE_BYTES = 384 * 2**20
_PROBE_MAX_BATCH = 64
#: most probes per batch on a GPU
_PROBE_GPU_MAX_BATCH = 256
#: probes per batch when the layer table (the activation sizes) is not available at the input size
_PROBE_FALLBACK_BATCH = 8


@dataclass(frozen=True)
class AxisField:
    """The field along one axis for every output index: ``lo[i]..hi[i]`` (inclusive, clipped to the
    input), ``start[i]`` the unclipped start of the full field of ``size`` pixels (may be < 0 or run past
    the input), ``stride`` the mean step between neighbouring fields."""

    lo: tuple[int, ...]
    hi: tuple[int, ...]
    start: tuple[int, ...]
    size: int
    stride: float
    length: int  # input pixels along this axis

    @property
    def offset(self) -> int:
        """The start of the full field of index 0 (input pixels; negative when it begins in the padding)."""
        return self.start[0]


@dataclass(frozen=True)
class ReceptiveField:
    """The receptive field of one position of a layer (``position`` None: of the whole map), or of one
    prefix token of a token layer (``token``).

    ``box`` is the part inside the input, ``field`` the full field (top, left, bottom, right; half-open,
    may extend past the input at the borders), ``size`` (height, width) of the full field.
    ``whole_image`` says why the field is the whole image (e.g. attention), when it is and the reason is
    known; ``input_independent`` is True for a unit that no input pixel reaches (box and field are then
    the empty (0, 0, 0, 0)).
    """

    layer: str
    position: tuple[int, int] | None
    input_size: tuple[int, int]
    box: Box
    field: Box
    token: str | None = None
    whole_image: str | None = None
    input_independent: bool = False

    @property
    def size(self) -> tuple[int, int]:
        return (self.field[2] - self.field[0], self.field[3] - self.field[1])

    @property
    def clipped(self) -> bool:
        """True when the full field extends past the input (a border unit)."""
        return self.box != self.field

    def draw(self, image: Image.Image | None = None) -> Image.Image:
        """The field drawn on ``image`` (the input, resized to ``input_size``; None: a gray canvas): the box
        inside the input in yellow (dashed-looking double line when clipped at a border)."""
        h, w = self.input_size
        out = (image.convert("RGB").resize((w, h)) if image is not None else Image.new("RGB", (w, h), (90, 90, 90))).copy()
        d = ImageDraw.Draw(out)
        top, left, bottom, right = self.box
        d.rectangle((left, top, right - 1, bottom - 1), outline=(255, 220, 0), width=2)
        if self.clipped:
            d.rectangle((left + 3, top + 3, right - 4, bottom - 4), outline=(255, 120, 0), width=1)
        return out

    def _repr_png_(self) -> bytes:
        """:meth:`draw` on a gray canvas, as PNG (IPython's display protocol)."""
        return png_bytes(self.draw())

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "position": list(self.position) if self.position is not None else None,
            "input_size": list(self.input_size),
            "box": list(self.box),
            "field": list(self.field),
            "size": list(self.size),
            "clipped": self.clipped,
            "token": self.token,
            "whole_image": self.whole_image,
            "input_independent": self.input_independent,
        }


@dataclass(frozen=True)
class LayerField:
    """Receptive-field geometry of every position of a layer at one input size."""

    layer: str
    input_size: tuple[int, int]
    output_size: tuple[int, int] | None  # (h, w); None for a vector layer (N, C)
    rows: AxisField
    cols: AxisField
    #: why every position sees the whole image (e.g. "attention in blocks.0 (Attention)"); None otherwise
    whole_image: str | None = None
    #: how the field was found: "graph" (composed, exact) or "probe" (gradient supports)
    source: str = "probe"

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) of the full field."""
        return (self.rows.size, self.cols.size)

    @property
    def stride(self) -> tuple[float, float]:
        """Input pixels between the fields of neighbouring positions (rows, columns)."""
        return (self.rows.stride, self.cols.stride)

    @property
    def offset(self) -> tuple[int, int]:
        """(top, left) of the full field of position (0, 0), in input pixels (negative: in the padding)."""
        return (self.rows.offset, self.cols.offset)

    def at(self, position: tuple[int, int] | None) -> ReceptiveField:
        """The field of ``position`` (y, x); None: the whole map's field. Where every position sees the
        same field (``output_size`` None: a vector layer, or a token layer after attention) that field,
        for the position given (:func:`receptive_field` checks it against the layer's grid)."""
        r, c = self.rows, self.cols
        if position is None or self.output_size is None:
            box = (min(r.lo), min(c.lo), max(r.hi) + 1, max(c.hi) + 1)
            return ReceptiveField(self.layer, position, self.input_size, box, box, whole_image=self.whole_image)
        y, x = position
        h, w = self.output_size
        if not (0 <= y < h and 0 <= x < w):
            raise UnitError(f"position {y},{x} is outside the {h}x{w} map of {self.layer}")
        box = (r.lo[y], c.lo[x], r.hi[y] + 1, c.hi[x] + 1)
        field = (r.start[y], c.start[x], r.start[y] + r.size, c.start[x] + c.size)
        return ReceptiveField(self.layer, (y, x), self.input_size, box, field, whole_image=self.whole_image)

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "input_size": list(self.input_size),
            "output_size": list(self.output_size) if self.output_size else None,
            "size": list(self.size),
            "stride": [round(s, 4) for s in self.stride],
            "offset": list(self.offset),
            "whole_image": self.whole_image,
            "source": self.source,
        }


#: a Model's receptive-field geometry per (layer, input size (H, W))
LAYER_FIELDS: CacheSlot[tuple[str, tuple[int, int]], LayerField] = CacheSlot("layer_fields")


# -- the probe ---------------------------------------------------------------------------------------
class _Through(torch.autograd.Function):
    """Forward: the function unchanged (in place when it is); backward: the gradient passes unchanged."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, run: Any, inplace: bool) -> torch.Tensor:
        y = run()
        if inplace:
            ctx.mark_dirty(x)
        return y

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        return g, None, None


_INPLACE_METHODS = {
    torch.relu_,
    torch.Tensor.relu_,
    F.hardtanh_,
    F.leaky_relu_,
    F.elu_,
    torch.sigmoid_,
    torch.Tensor.sigmoid_,
    torch.tanh_,
    torch.Tensor.tanh_,
    torch.Tensor.clamp_,
    torch.clamp_,
}
_MASKING = {
    torch.clamp,
    torch.Tensor.clamp,
    torch.clamp_,
    torch.Tensor.clamp_,
    torch.clamp_min,
    torch.Tensor.clamp_min,
    torch.clamp_max,
    torch.Tensor.clamp_max,
}


def _window_sum(x: torch.Tensor, y: torch.Tensor, kernel: Any, stride: Any, padding: Any, dilation: Any) -> torch.Tensor | None:
    """A depthwise sum over each pooling window, shaped like the max-pool output ``y`` (gradient donor)."""
    pair = torch.nn.modules.utils._pair
    k, d, p = pair(kernel), pair(dilation), pair(padding)
    s = pair(stride if stride not in (None, [], ()) else kernel)
    if x.ndim not in (3, 4) or y.shape[-2:] == ():
        return None
    batched = x if x.ndim == 4 else x.unsqueeze(0)
    c, h, w = batched.shape[1:]
    oh, ow = y.shape[-2:]
    # pad so that the last (ceil-mode) window fits, then cut to the pooled shape
    need_h = (oh - 1) * s[0] + d[0] * (k[0] - 1) + 1 - (h + 2 * p[0])
    need_w = (ow - 1) * s[1] + d[1] * (k[1] - 1) + 1 - (w + 2 * p[1])
    xp = F.pad(batched, (p[1], p[1] + max(0, need_w), p[0], p[0] + max(0, need_h)))
    ones = torch.ones(c, 1, *k, dtype=x.dtype, device=x.device)
    out = F.conv2d(xp, ones, stride=s, dilation=d, groups=c)[..., :oh, :ow]
    if out.shape[-2:] != (oh, ow):
        return None
    return out if x.ndim == 4 else out.squeeze(0)


class _ProbeMode(TorchFunctionMode):
    """Structural gradients: nonlinearities and clamps pass gradients through; max pools spread them."""

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        x = args[0] if args else None
        if isinstance(x, torch.Tensor) and x.requires_grad:
            if func in RELU_FUNCS or (func in OTHER_FUNCS and OTHER_FUNCS[func] not in ("glu", "prelu")) or func in _MASKING:
                inplace = (
                    func in _INPLACE_METHODS
                    or bool(kwargs.get("inplace", False))
                    or (func in (F.relu, F.relu6) and len(args) > 1 and bool(args[1]))
                    or (func is F.leaky_relu and len(args) > 2 and bool(args[2]))
                    or (func is F.hardtanh and len(args) > 3 and bool(args[3]))
                )
                return _Through.apply(x, lambda: func(*args, **kwargs), inplace)
            if func is F.max_pool2d and not kwargs.get("return_indices", False) and not (len(args) > 6 and args[6]):
                y = func(*args, **kwargs)
                names = ("kernel_size", "stride", "padding", "dilation")
                defaults = (None, None, 0, 1)
                vals = [args[i + 1] if len(args) > i + 1 else kwargs.get(n, dflt) for i, (n, dflt) in enumerate(zip(names, defaults))]
                donor = _window_sum(x, y, *vals)
                if donor is not None:
                    return y.detach() + (donor - donor.detach())
                return y
            if func is F.adaptive_max_pool2d and not kwargs.get("return_indices", False) and not (len(args) > 2 and args[2]):
                y = func(*args, **kwargs)
                donor = F.adaptive_avg_pool2d(x, y.shape[-2:])
                return y.detach() + (donor - donor.detach())
        return func(*args, **kwargs)


def _probe_batch(model: Model, layer: str, input_shape: tuple[int, int, int]) -> int:
    """Probes per batch, from the size of the activations stored up to ``layer`` (one example).

    The sizes come from the layer table at ``input_shape``, which runs the whole network. A model may
    reach ``layer`` at this input size and still fail further on (a classifier head made for another
    size): :func:`layer_table` then raises :class:`LayerError`, and a small fixed batch is used. Any
    other error goes through. On the CPU the batch keeps the stored activations under ``_PROBE_BYTES``;
    on a GPU it fills its free memory (:func:`~deepvis.runtime.choose_batch_size`, the stored
    activations and their gradients per probe).
    """
    try:
        table = layer_table(model, input_shape)
    except LayerError:  # the network fails at this input size past ``layer`` (see above)
        return _PROBE_FALLBACK_BATCH
    order = {i.name: i.order for i in table}
    upto = order.get(layer, len(table))
    shapes = [i.shape for i in table if i.order <= upto and i.same_as is None] or [input_shape]
    stored = max(item_bytes(shapes), math.prod(input_shape) * 4)
    cpu = int(max(1, min(_PROBE_MAX_BATCH, _PROBE_BYTES // stored)))
    element = torch.finfo(model.dtype).bits // 8
    return choose_batch_size(model.device, lambda: item_bytes(shapes, element, backward=True), cpu_batch=cpu, upper=_PROBE_GPU_MAX_BATCH)


def _supports(model: Model, layer: str, x0: torch.Tensor, seeds: list[tuple[str, tuple[int, ...]]], batch: int) -> list[torch.Tensor]:
    """For each seed (axis, output indices), the boolean support of the input gradient along that axis.

    A ``row`` seed sets every channel and column of the given output rows to 1 and returns which input
    rows get a non-zero gradient (H,); ``col`` likewise for columns (W,); ``all`` seeds the whole
    output and returns the rows and then the columns. ``batch`` probes per pass, halved when the
    device runs out of memory (:func:`~deepvis.runtime.halve_on_oom`).
    """
    return halve_on_oom(lambda b: _supports_in(model, layer, x0, seeds, b), batch, what=f"the receptive-field probes of {layer}")


def _supports_in(model: Model, layer: str, x0: torch.Tensor, seeds: list[tuple[str, tuple[int, ...]]], batch: int) -> list[torch.Tensor]:
    module = model.module
    found: list[torch.Tensor] = []
    for start in range(0, len(seeds), batch):
        part = seeds[start : start + batch]
        xb = x0.expand(len(part), *x0.shape[1:]).clone().requires_grad_(True)
        with frozen(module), _ProbeMode():
            a = capture(model, xb, [layer], grad=True)[layer]
        seed = torch.zeros_like(a)
        for k, (axis, idx) in enumerate(part):
            if axis == "all":
                seed[k] = 1.0
            elif axis == "row":
                seed[k, :, list(idx), :] = 1.0
            else:
                seed[k, :, :, list(idx)] = 1.0
        (g,) = torch.autograd.grad(a, xb, grad_outputs=seed)
        support = _nonzero(g).any(dim=1).cpu()  # (B, H, W)
        for k, (axis, _idx) in enumerate(part):
            if axis in ("row", "all"):
                found.append(support[k].any(dim=1))
            if axis in ("col", "all"):
                found.append(support[k].any(dim=0))
    return found


def _nonzero(g: torch.Tensor) -> torch.Tensor:
    """Where the gradient ``g`` (B, C, H, W) is not zero: exactly on the CPU; elsewhere above a small
    fraction of each example's largest magnitude (cuDNN's Winograd/FFT backward leaves tiny non-zeros)."""
    if g.device.type == "cpu":
        return g != 0
    peak = g.detach().abs().flatten(1).amax(dim=1).view(-1, *([1] * (g.ndim - 1)))
    return g.abs() > peak * (torch.finfo(g.dtype).eps * 64)


def _decode(mask: torch.Tensor, rows: tuple[int, ...], centre: float, stride: float, size: int) -> list[tuple[int, int]] | None:
    """Split the support of several seeded output indices into one span each, or None when unsure.

    Each input index goes to the seeded output whose predicted field centre is nearest. The split is
    trusted only when every span is non-empty, no wider than ``size``, and neighbouring spans are
    separated by at least one input index outside the support.
    """
    idx = torch.nonzero(mask).flatten().tolist()
    if not idx:
        return None
    centres = [centre + (r - rows[0]) * stride for r in rows]
    bounds = [(centres[k] + centres[k + 1]) / 2 for k in range(len(rows) - 1)]
    spans: list[list[int]] = [[] for _ in rows]
    k = 0
    for i in idx:
        while k < len(bounds) and i > bounds[k]:
            k += 1
        spans[k].append(i)
    out: list[tuple[int, int]] = []
    for k, sp in enumerate(spans):
        if not sp or sp[-1] - sp[0] + 1 > size:
            return None
        if k and sp[0] - out[-1][1] < 2:
            return None
        out.append((sp[0], sp[-1]))
    return out


def _axis_spans(
    model: Model, layer: str, x0: torch.Tensor, h: int, w: int, batch: int
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The clipped span of every output row and column, with as few backward passes as it safely can.

    Three rows and three columns are probed alone; they give the field size and the stride. Rows far
    enough apart that their fields cannot touch are then probed together (one backward pass seeds a
    whole comb of rows) and the support is split between them; a comb whose split is not clean is
    probed again row by row.
    """
    result: dict[str, dict[int, tuple[int, int]]] = {"row": {}, "col": {}}
    lengths = {"row": h, "col": w}
    first: list[tuple[str, tuple[int, ...]]] = []
    for axis, n in lengths.items():
        mid = n // 2
        step = max(1, n // 4)
        first += [(axis, (i,)) for i in sorted({max(0, mid - step), mid, min(n - 1, mid + step)})]
    for (axis, (i,)), m in zip(first, _supports(model, layer, x0, first, batch)):
        result[axis][i] = _span(m)
    combs: list[tuple[str, tuple[int, ...]]] = []
    plan: dict[str, tuple[float, float, int]] = {}
    for axis, n in lengths.items():
        known = sorted(result[axis])
        size = max(hi - lo + 1 for lo, hi in result[axis].values())
        if len(known) < 2 or size <= 0:
            continue
        (y1, (l1, h1)), (y2, (l2, h2)) = (known[0], result[axis][known[0]]), (known[-1], result[axis][known[-1]])
        stride = ((l2 + h2) - (l1 + h1)) / 2 / (y2 - y1)
        if stride <= 0:
            continue
        spacing = int(math.ceil((size + 2) / stride)) + 1
        if spacing * 2 > n:
            continue  # combs would hold one or two rows: no gain
        mid = known[len(known) // 2]
        lo_m, hi_m = result[axis][mid]
        plan[axis] = ((lo_m + hi_m) / 2 + (0 - mid) * stride, stride, size)
        combs += [(axis, tuple(range(g, n, spacing))) for g in range(spacing)]
    retry: list[tuple[str, tuple[int, ...]]] = []
    if combs:
        for (axis, rows), m in zip(combs, _supports(model, layer, x0, combs, batch)):
            centre0, stride, size = plan[axis]
            spans = _decode(m, rows, centre0 + rows[0] * stride, stride, size)
            if spans is None or any(r in result[axis] and result[axis][r] != sp for r, sp in zip(rows, spans)):
                retry += [(axis, (r,)) for r in rows if r not in result[axis]]
                continue
            result[axis].update(zip(rows, spans))
    retry += [(axis, (i,)) for axis, n in lengths.items() for i in range(n) if i not in result[axis] and (axis, (i,)) not in retry]
    if retry:
        for (axis, (i,)), m in zip(retry, _supports(model, layer, x0, retry, batch)):
            result[axis][i] = _span(m)
    return [result["row"][i] for i in range(h)], [result["col"][i] for i in range(w)]


def _axis(lo: list[int], hi: list[int], n: int) -> AxisField:
    """Full-field starts and size along one axis from the clipped spans of every output index.

    The full field size is the largest span; positions with a smaller span were cut by the border (or,
    with dilation, lost taps in the padding). A span cut at one end only fixes its start from the other
    end; the remaining starts come from a straight-line fit of the known ones, so that they line up,
    and the full field always contains the clipped span. When every span is cut at both ends (a field
    larger than the input everywhere), the full field is the largest span seen at this input size.
    """
    lo_a, hi_a = np.array(lo, dtype=np.int64), np.array(hi, dtype=np.int64)
    extent = hi_a - lo_a + 1
    size = int(extent.max())
    idx = np.arange(len(lo))
    start = np.zeros(len(lo), dtype=np.int64)
    known = np.zeros(len(lo), dtype=bool)
    for i in idx:
        if extent[i] == size:
            start[i], known[i] = lo_a[i], True
        elif lo_a[i] == 0 and hi_a[i] < n - 1:  # cut at the start only
            start[i], known[i] = hi_a[i] - size + 1, True
        elif lo_a[i] > 0 and hi_a[i] == n - 1:  # cut at the end only
            start[i], known[i] = lo_a[i], True
    fit = np.polyfit(idx[known], start[known], 1) if known.sum() >= 2 and np.ptp(start[known]) > 0 else None
    for i in idx[~known]:
        lowest, highest = hi_a[i] - size + 1, lo_a[i]  # the full field must contain the clipped span
        guess = round(float(np.polyval(fit, i))) if fit is not None else lo_a[i] - (size - extent[i]) // 2
        start[i] = min(highest, max(lowest, guess))
    if fit is not None:
        stride = float(fit[0])
    elif len(lo) > 1:
        stride = float(np.polyfit(idx, (lo_a + hi_a) / 2, 1)[0])
    else:
        stride = float(n)
    return AxisField(tuple(int(v) for v in lo), tuple(int(v) for v in hi), tuple(int(v) for v in start), size, round(stride, 6), n)


def _span(mask: torch.Tensor) -> tuple[int, int]:
    nz = torch.nonzero(mask).flatten()
    if nz.numel() == 0:
        return 0, -1
    return int(nz[0]), int(nz[-1])


def layer_field(model: Model, layer: str, input_size: tuple[int, int] | None = None, *, method: str = "auto") -> LayerField:
    """The receptive-field geometry of every position of ``layer``.

    Args:
        model: the network (left as it was found).
        layer: a layer name (see :func:`deepvis.capture.layer_table`).
        input_size: the input (H, W) in pixels; default: the model's input size.
        method: ``"auto"`` (the graph where it composes, else the probe; see the module notes),
            ``"graph"`` (a :class:`DeepvisError` where it does not compose) or ``"probe"``.

    Returns:
        A :class:`LayerField` (fields in input pixels). The ``"auto"`` result is cached in
        :data:`LAYER_FIELDS` per layer and input size until the module's structure changes.
    """
    model = require_model(model)
    if method not in ("auto", "graph", "probe"):
        raise DeepvisError(f"unknown receptive-field method {method!r}: choose auto, graph or probe")
    split = split_token_layer(layer)
    if split is not None:
        raise LayerError(f"{layer} is a prefix token, not a map: use receptive_field(model, '{split[0]}:0@{split[1]}')")
    size = input_size if input_size is not None else model.preprocessing.input_size
    hw = (int(size[0]), int(size[1]))
    entries = model.cache.entries(model.module)
    if method == "auto":
        cached = entries.get(LAYER_FIELDS, (layer, hw))
        if cached is not None:
            return cached
    info = get_layer(model, layer)  # a clear error for an unknown layer
    if info.layout.kind == "attention" and len(info.shape) == 3:
        # every weight is normalized (softmax) over all keys, so each one depends on every input token
        grid = (int(info.shape[1]), int(info.shape[2]))
        why = f"attention weights of {layer}: each is normalized over every key token (softmax)"
        geo = LayerField(layer, hw, grid, _whole_axis(grid[0], hw[0]), _whole_axis(grid[1], hw[1]), whole_image=why, source="graph")
        return entries.put(LAYER_FIELDS, (layer, hw), geo) if method == "auto" else geo
    shape = (model.preprocessing.channels, int(hw[0]), int(hw[1]))
    dtype = model.dtype
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, *shape, generator=gen).to(device=model.device, dtype=dtype)
    composed = None if method == "probe" else _graph_field(model, layer, x0, hw, calls=info.calls, strict=method == "graph")
    found = composed if composed is not None else _probe_field(model, layer, x0, hw, shape)
    return entries.put(LAYER_FIELDS, (layer, hw), found) if method == "auto" else found


def _graph_field(model: Model, layer: str, x0: torch.Tensor, hw: tuple[int, int], *, calls: int, strict: bool) -> LayerField | None:
    """The field composed along the graph (:mod:`.graph_field`); None where it does not compose (a
    :class:`DeepvisError` saying why when ``strict``)."""
    module = model.module
    with eval_mode(module):
        state, out = graph_state(module, resolve_module(module, layer), x0, calls)
    h, w = hw
    if isinstance(state, Whole):
        grid = (int(out.shape[-2]), int(out.shape[-1])) if out.ndim == 4 else None
        rows = _whole_axis(grid[0] if grid else 1, h)
        cols = _whole_axis(grid[1] if grid else 1, w)
        return LayerField(layer, hw, grid, rows, cols, whole_image=state.reason, source="graph")
    if isinstance(state, Spatial) and out.ndim == 4 and (state.rdim, state.cdim) == (2, 3):
        r, c = state.rows, state.cols
        if (r.lo > r.hi).any() or (c.lo > c.hi).any():
            raise DeepvisError(f"layer {layer} has positions that see only padding: no receptive field there")
        rows = AxisField(
            tuple(int(v) for v in r.lo),
            tuple(int(v) for v in r.hi),
            tuple(r.offset + r.jump * i for i in range(len(r.lo))),
            r.size,
            float(r.jump),
            h,
        )
        cols = AxisField(
            tuple(int(v) for v in c.lo),
            tuple(int(v) for v in c.hi),
            tuple(c.offset + c.jump * i for i in range(len(c.lo))),
            c.size,
            float(c.jump),
            w,
        )
        return LayerField(layer, hw, (len(r.lo), len(c.lo)), rows, cols, source="graph")
    if strict:
        why = getattr(state, "reason", "its output is not an (N, C, H, W) map")
        raise DeepvisError(f"the receptive field of {layer} cannot be composed from the graph: {why}")
    return None


def _whole_axis(n: int, length: int) -> AxisField:
    """``n`` positions that each see all ``length`` input pixels."""
    return AxisField((0,) * n, (length - 1,) * n, (0,) * n, length, 0.0, length)


def _probe_field(model: Model, layer: str, x0: torch.Tensor, hw: tuple[int, int], shape: tuple[int, int, int]) -> LayerField:
    """The field measured from gradient supports (see the module notes)."""
    with torch.no_grad():
        out = capture(model, x0, [layer])[layer]
    batch = _probe_batch(model, layer, shape)
    if out.ndim == 4:
        h, w = out.shape[2:]
        rows, cols = _axis_spans(model, layer, x0, h, w, batch)
    else:
        h = w = 0
        rmask, cmask = _supports(model, layer, x0, [("all", ())], batch)
        rows, cols = [_span(rmask)], [_span(cmask)]
    if any(hi < lo for lo, hi in (*rows, *cols)):
        raise DeepvisError(f"layer {layer} does not depend on the input: it has no receptive field")
    row_field = _axis([lo for lo, _ in rows], [hi for _, hi in rows], shape[1])
    col_field = _axis([lo for lo, _ in cols], [hi for _, hi in cols], shape[2])
    return LayerField(layer, hw, (h, w) if out.ndim == 4 else None, row_field, col_field)


def receptive_field(
    model: Model,
    unit: Unit | str,
    position: tuple[int, int] | None = None,
    *,
    input_size: tuple[int, int] | None = None,
) -> ReceptiveField:
    """The receptive field of ``unit`` (``LAYER:C@Y,X``, ``LAYER:C@cls``, a :class:`Unit`, or a layer
    name (``blocks.5@cls`` for a prefix token) with ``position``).

    Without a position: the field of the whole map. The channel does not matter (see the module notes).
    A prefix token's field is measured (see the module notes): the whole image after attention (with
    ``whole_image`` saying why), or ``input_independent`` when no input pixel reaches it.
    """
    model = require_model(model)
    if isinstance(unit, str):
        unit = parse_unit(unit) if ":" in unit else Unit(unit, 0)
    layer, pos = unit.layer, unit.position
    if position is not None:
        if unit.token is not None:
            raise UnitError(f"unit {unit} is a prefix token: it has no position")
        pos = (int(position[0]), int(position[1]))
    size = input_size if input_size is not None else model.preprocessing.input_size
    if isinstance(size, int) or len(size) != 2:
        raise DeepvisError(f"input_size is (height, width), not {size!r}")
    hw = (int(size[0]), int(size[1]))
    # the layer, the channel, the position or token are checked against the layer at this input size
    check_unit(model, Unit(layer, unit.channel, pos, unit.token), (model.preprocessing.channels, *hw))
    if unit.token is not None:
        return _token_field(model, layer, unit.token, hw)
    return layer_field(model, layer, hw).at(pos)


def _token_field(model: Model, layer: str, token: str, hw: tuple[int, int]) -> ReceptiveField:
    """The field of prefix token ``token`` of token layer ``layer`` at input size ``hw``: the support of
    the gradient of the whole token (all channels, structural gradients as in the probe) on the input."""
    key = token_layer(layer, token)
    get_layer(model, key, (model.preprocessing.channels, *hw))  # a one-line error for a missing token
    shape = (model.preprocessing.channels, hw[0], hw[1])
    dtype = model.dtype
    x0 = torch.randn(1, *shape, generator=torch.Generator().manual_seed(0)).to(device=model.device, dtype=dtype)
    xb = x0.clone().requires_grad_(True)
    with frozen(model.module), _ProbeMode():
        a = capture(model, xb, [key], grad=True)[key]
    g = torch.autograd.grad(a, xb, grad_outputs=torch.ones_like(a), allow_unused=True)[0] if a.requires_grad else None
    support = _nonzero(g).any(dim=1)[0].cpu() if g is not None else torch.zeros(hw, dtype=torch.bool)
    if not bool(support.any()):
        empty = (0, 0, 0, 0)
        return ReceptiveField(key, None, hw, empty, empty, token=token, input_independent=True)
    (top, bottom), (left, right) = _span(support.any(dim=1)), _span(support.any(dim=0))
    box = (top, left, bottom + 1, right + 1)
    whole = None
    if box == (0, 0, hw[0], hw[1]):
        try:
            whole = layer_field(model, layer, hw).whole_image
        except DeepvisError:  # the token layer's grid has no composed field: the measured support says it
            whole = None
        whole = whole or "measured: every input pixel reaches the token"
    return ReceptiveField(key, None, hw, box, box, token=token, whole_image=whole)


# -- crops -------------------------------------------------------------------------------------------
@overload
def crop(array: np.ndarray, rf: ReceptiveField, *, fill: float | tuple[float, ...] = 0) -> np.ndarray: ...
@overload
def crop(array: torch.Tensor, rf: ReceptiveField, *, fill: float | tuple[float, ...] = 0) -> torch.Tensor: ...
def crop(array: np.ndarray | torch.Tensor, rf: ReceptiveField, *, fill: float | tuple[float, ...] = 0) -> np.ndarray | torch.Tensor:
    """The field of ``rf`` cut from ``array`` and padded with ``fill`` where it runs past the input.

    The window is the full field, except along an axis where the field is larger than the input (deep
    layers): there it is the input's size, centred on the field's centre, so a crop is never larger
    than the image it comes from and the unit's centre stays in the middle of it.

    Args:
        array: an image (H, W) or (H, W, C) numpy array, or a tensor (C, H, W) such as a backprop
            gradient, of the input size (H, W) the field was computed for.
        rf: the field (:func:`receptive_field`).
        fill: the value (or one value per channel) outside the input.

    Returns:
        The crop, the same kind as ``array``: (fh, fw[, C]) or (C, fh, fw), where (fh, fw) is the field's
        size capped at the input's.
    """
    H, W = rf.input_size
    hw = tuple(array.shape[-2:]) if isinstance(array, torch.Tensor) else tuple(array.shape[:2])
    if hw != (H, W):
        raise DeepvisError(f"cannot crop: the array is {hw[0]}x{hw[1]} but the field is for a {H}x{W} input")
    top, bottom = _window(rf.field[0], rf.field[2], H)
    left, right = _window(rf.field[1], rf.field[3], W)
    t0, l0, b0, r0 = max(top, 0), max(left, 0), min(bottom, H), min(right, W)
    fh, fw = bottom - top, right - left
    if isinstance(array, torch.Tensor):
        out_t = torch.empty((*array.shape[:-2], fh, fw), dtype=array.dtype, device=array.device)
        fill_t = torch.as_tensor(fill, dtype=array.dtype, device=array.device)
        out_t[...] = fill_t.view(-1, 1, 1) if fill_t.ndim == 1 else fill_t
        out_t[..., t0 - top : b0 - top, l0 - left : r0 - left] = array[..., t0:b0, l0:r0]
        return out_t
    out = np.empty((fh, fw, *array.shape[2:]), dtype=array.dtype)
    out[...] = fill
    out[t0 - top : b0 - top, l0 - left : r0 - left] = array[t0:b0, l0:r0]
    return out


def _window(lo: int, hi: int, n: int) -> tuple[int, int]:
    """The half-open span [lo, hi) of a field along one axis, shrunk to ``n`` pixels around its centre when longer."""
    if hi - lo <= n:
        return lo, hi
    start = (lo + hi - n) // 2
    return start, start + n


def crop_image(image: Image.Image, rf: ReceptiveField, *, fill: int | tuple[int, ...] = 0) -> Image.Image:
    """The receptive-field crop of a Pillow image (as the model sees it), padded at the borders."""
    arr = np.asarray(image)
    return Image.fromarray(crop(arr, rf, fill=fill), image.mode)
