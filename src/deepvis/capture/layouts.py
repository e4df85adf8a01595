"""Layer layouts: how a layer's output tensor maps onto channels, rows and columns.

Every layer of the layer table gets one :class:`Layout`:

- ``maps``: (N, C, H, W) feature maps (convolutions, torchvision CNNs);
- ``maps-last``: (N, H, W, C) feature maps (Swin, timm stages with NHWC output, user models that permute);
- ``tokens``: (N, L, C) with L = P prefix tokens (class, distillation, register tokens) + an H x W patch grid;
- ``attention``: (N, heads, Lq, Lk) attention weights over the model's tokens (timm's fused attention and
  torchvision's ``nn.MultiheadAttention`` are made to produce them: :mod:`.attention`);
- ``vector``: (N, C);
- ``none``: anything else, with the reason (windowed batches, per-head features, 3-D outputs that are not
  tokens of the patch grid, a layout that cannot be told).

Every tool reads the canonical form: (C, H, W) per example for ``maps``, ``maps-last`` and the patch tokens
of ``tokens`` (prefix tokens apart, (C, P)), (C,) for ``vector``. :meth:`Layout.to_canonical` makes the
canonical tensor as a view (no copy).

An ``attention`` layer's unit is a **head**: its canonical form is one query token's row of the weights
over the key patch grid, (heads, H, W), the prefix keys apart, (heads, P). The query is a prefix token
(``cls``, ``#0``) or a patch (row, column); by default the first prefix token (the class token where
there is one), or the mean over all queries for a model without prefix tokens (:meth:`Layout.query_index`).

Detection, in order: what the user declared (``Model.layouts``, ``--layout LAYER=KIND``); what the model
says (timm: ``num_prefix_tokens``, ``patch_embed`` patch size and grid, ``cls_token``/``dist_token``/
``reg_token``, ``output_fmt``; torchvision ``VisionTransformer``: ``class_token``, ``patch_size``); the
module's own contract (convolutions, batch norms and 2-D pools output (N, C, H, W)); a second probe at
another input size (the axes that scale with H and W are the spatial ones); the shape itself (the spatial
pair has the input's aspect ratio). When none of these tells, the layout is ``none`` and the reason says
how to declare it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LayerError, UnitError

__all__ = [
    "Layout",
    "KINDS",
    "VIEWABLE",
    "Query",
    "parse_query",
    "parse_layout",
    "parse_layout_options",
    "TokenGeometry",
    "token_geometry",
    "detect_layout",
]

#: every layout kind
KINDS = ("maps", "maps-last", "tokens", "attention", "vector", "none")
#: the kinds every tool can show through the canonical (C, H, W) / (C,) form (attention: when its
#: patch grid is known)
VIEWABLE = ("maps", "maps-last", "tokens", "attention", "vector")

#: the query token of an attention layer: a prefix token name (``cls``, ``reg0``, ``#K``), a patch
#: (row, column) of the grid, or None for the default (see :meth:`Layout.query_index`)
Query = str | tuple[int, int] | None

#: the names a declaration may use for each kind
_ALIASES = {
    "maps": "maps",
    "nchw": "maps",
    "maps-last": "maps-last",
    "nhwc": "maps-last",
    "tokens": "tokens",
    "nlc": "tokens",
    "attention": "attention",
    "vector": "vector",
    "nc": "vector",
    "none": "none",
}

#: the reason of a layout read from the shape alone (the aspect ratio of the spatial pair)
GUESSED = "guessed from the shape (the map has the input's aspect ratio)"

#: modules whose 4-D output is (N, C, H, W) by torch's own contract
_NCHW_MODULES = (
    nn.Conv2d,
    nn.ConvTranspose2d,
    nn.BatchNorm2d,
    nn.InstanceNorm2d,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.LPPool2d,
    nn.Dropout2d,
    nn.Upsample,
    nn.PixelShuffle,
    nn.LocalResponseNorm,
)


@dataclass(frozen=True)
class Layout:
    """How one layer's output (N, ...) is read.

    ``kind`` is one of :data:`KINDS`; ``prefix`` names the prefix tokens of a ``tokens`` (or ``attention``)
    layer in order (``cls``, ``dist``, ``reg0`` ...), ``grid`` its patch grid (rows, columns); ``reason``
    says how the layout was found, or why the layer is not viewable.
    """

    kind: str
    prefix: tuple[str, ...] = ()
    grid: tuple[int, int] | None = None
    reason: str = ""

    @property
    def viewable(self) -> bool:
        """True when every tool can show the layer (through the canonical form)."""
        return self.kind in VIEWABLE and (self.kind != "attention" or self.grid is not None)

    def canonical_shape(self, raw: tuple[int, ...]) -> tuple[int, ...]:
        """The canonical per-example shape, (C, H, W) or (C,), from the raw per-example shape ``raw``
        (without N); the raw shape itself for kinds that are not viewable."""
        if self.kind == "maps-last":
            return (raw[2], raw[0], raw[1])
        if self.kind == "tokens" and self.grid is not None:
            return (raw[1], *self.grid)
        if self.kind == "attention" and self.grid is not None:
            return (raw[0], *self.grid)
        return tuple(raw)

    def to_canonical(self, t: torch.Tensor, query: Query = None) -> torch.Tensor:
        """The canonical (N, C, H, W) or (N, C) view of an output ``t`` (no copy): maps-last permuted,
        tokens' patch part reshaped to the grid, an attention layer's ``query`` row over the key patches
        (N, heads, H, W) (a copy only for the mean over queries); other kinds unchanged."""
        if self.kind == "maps-last":
            return t.permute(0, 3, 1, 2)
        if self.kind == "tokens" and self.grid is not None:
            n, _, c = t.shape
            return t[:, len(self.prefix) :].reshape(n, *self.grid, c).permute(0, 3, 1, 2)
        if self.kind == "attention" and self.grid is not None:
            row = self.query_row(t, query)
            return row[:, :, len(self.prefix) :].reshape(row.shape[0], row.shape[1], *self.grid)
        return t

    def prefix_tokens(self, t: torch.Tensor, query: Query = None) -> torch.Tensor:
        """The prefix tokens of a ``tokens`` output ``t`` (N, L, C) as (N, C, P) (a view); for an
        ``attention`` output (N, heads, Lq, Lk), the ``query`` row's weights on the prefix keys (N, heads, P)."""
        if self.kind == "attention":
            return self.query_row(t, query)[:, :, : len(self.prefix)]
        return t[:, : len(self.prefix)].transpose(1, 2)

    def query_index(self, query: Query = None) -> int | None:
        """The position along the queries axis of an attention layer's ``query``: a prefix token by name
        or ``#K``, a patch (row, column) of the grid; None (the default) is the first prefix token, or,
        without prefix tokens, no single query (the mean over all queries: returns None).

        Raises:
            UnitError: a prefix token the layer does not have, or a patch outside the grid (one line).
        """
        if query is None:
            return 0 if self.prefix else None
        if isinstance(query, str):
            try:
                return self.token_index(query)
            except ValueError as exc:
                raise UnitError(f"query {query!r}: {exc}") from None
        y, x = query
        gh, gw = self.grid if self.grid is not None else (0, 0)
        if not (0 <= y < gh and 0 <= x < gw):
            raise UnitError(f"query patch {y},{x} is outside the {gh}x{gw} patch grid")
        return len(self.prefix) + y * gw + x

    def query_name(self, query: Query = None) -> str:
        """An attention layer's query as text: a prefix token's name, ``"Y,X"`` for a patch, ``mean`` for
        the mean over queries (see :meth:`query_index`)."""
        index = self.query_index(query)
        if index is None:
            return "mean"
        p = len(self.prefix)
        if index < p:
            return self.prefix[index]
        y, x = divmod(index - p, self.grid[1] if self.grid is not None else 1)
        return f"{y},{x}"

    def query_row(self, t: torch.Tensor, query: Query = None) -> torch.Tensor:
        """One query's attention weights over every key, (N, heads, Lk), from attention weights ``t``
        (N, heads, Lq, Lk): a view, or the mean over queries (see :meth:`query_index`)."""
        q = self.query_index(query)
        return t.mean(2) if q is None else t[:, :, q]

    def token_index(self, token: str) -> int:
        """The position of prefix token ``token`` (a name such as ``cls``/``reg0``, or ``#K``) among the
        prefix tokens; a ``ValueError`` naming the choices when there is no such token."""
        if token.startswith("#") and token[1:].isdigit() and int(token[1:]) < len(self.prefix):
            return int(token[1:])
        if token in self.prefix:
            return self.prefix.index(token)
        choices = ", ".join(self.prefix) if self.prefix else "none"
        raise ValueError(f"no prefix token {token!r} (this layer has {len(self.prefix)}: {choices}; or #0-#{len(self.prefix) - 1})")

    def describe(self) -> str:
        """A short text for tables: ``maps-last``, ``tokens 1+14x14`` ..."""
        if self.kind in ("tokens", "attention") and self.grid is not None:
            return f"{self.kind} {len(self.prefix)}+{self.grid[0]}x{self.grid[1]}"
        return self.kind


@dataclass(frozen=True)
class TokenGeometry:
    """The token layout a model states: prefix token names and the patch grid at one input size."""

    prefix: tuple[str, ...]
    grid: tuple[int, int]

    @property
    def length(self) -> int:
        """Tokens in all: prefix + patches."""
        return len(self.prefix) + self.grid[0] * self.grid[1]


def _pair(v: object) -> tuple[int, int] | None:
    if isinstance(v, int):
        return (v, v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return (int(v[0]), int(v[1]))
    return None


def token_geometry(module: nn.Module, hw: tuple[int, int]) -> TokenGeometry | None:
    """What a ViT-like model says about its tokens at input size ``hw`` (rows, columns in pixels).

    Reads timm's ``num_prefix_tokens`` with ``patch_embed.patch_size`` (and ``cls_token``, ``dist_token``,
    ``num_reg_tokens`` for the names), and torchvision's ``VisionTransformer`` (``class_token``,
    ``patch_size``: one class token first). None when the model says nothing.
    """
    h, w = hw
    pe = getattr(module, "patch_embed", None)
    count = getattr(module, "num_prefix_tokens", None)
    patch = _image_patch(pe) if pe is not None else None
    if isinstance(count, int) and patch is not None:
        dyn = getattr(pe, "dynamic_img_pad", False)
        grid = (math.ceil(h / patch[0]), math.ceil(w / patch[1])) if dyn else (h // patch[0], w // patch[1])
        names: list[str] = []
        if getattr(module, "cls_token", None) is not None:
            names.append("cls")
        if getattr(module, "dist_token", None) is not None:
            names.append("dist")
        regs = getattr(module, "num_reg_tokens", 0)
        names += [f"reg{i}" for i in range(regs if isinstance(regs, int) else 0)]
        if len(names) != count:
            names = [f"tok{i}" for i in range(count)]
        return TokenGeometry(tuple(names), grid)
    tv_patch = getattr(module, "patch_size", None)
    if isinstance(getattr(module, "class_token", None), torch.Tensor) and isinstance(tv_patch, int) and hasattr(module, "conv_proj"):
        return TokenGeometry(("cls",), (h // tv_patch, w // tv_patch))
    return None


def _image_patch(pe: nn.Module) -> tuple[int, int] | None:
    """The input pixels per token of a timm patch embedding: its ``img_size`` over its ``grid_size``
    where it states both (a hybrid's ``patch_size`` counts pixels of the CNN's feature map, not of the
    image: timm ``HybridEmbed``), else its ``patch_size``."""
    img, grid = _pair(getattr(pe, "img_size", None)), _pair(getattr(pe, "grid_size", None))
    if img is not None and grid is not None and min(grid) > 0 and img[0] % grid[0] == 0 and img[1] % grid[1] == 0:
        return (img[0] // grid[0], img[1] // grid[1])
    return _pair(getattr(pe, "patch_size", None))


def says_nhwc(module: nn.Module) -> bool:
    """True when the model states channels-last outputs (timm's ``output_fmt == 'NHWC'``)."""
    fmt = getattr(module, "output_fmt", None)
    return str(getattr(fmt, "value", fmt)).upper() == "NHWC"


def parse_layout(text: str, raw: tuple[int, ...], layer: str) -> Layout:
    """A declared layout for ``layer`` whose per-example output shape is ``raw``.

    ``text`` is a kind (``nchw``/``maps``, ``nhwc``/``maps-last``, ``vector``, ``none``) or
    ``tokens:P`` / ``tokens:P:HxW`` (P prefix tokens; the grid, square when not given), or
    ``attention:P`` / ``attention:P:HxW`` for (heads, L, L) attention weights over such tokens.
    Raises :class:`LayerError` (one line) when it does not fit the shape.
    """
    kind, _, rest = text.strip().lower().partition(":")
    if kind not in _ALIASES:
        raise LayerError(
            f"bad layout {text!r} for layer {layer}: use one of nchw, nhwc, tokens:P, tokens:P:HxW, attention:P, attention:P:HxW, vector, none"
        )
    kind = _ALIASES[kind]
    ndim = {"maps": 3, "maps-last": 3, "tokens": 2, "vector": 1, "attention": 3}.get(kind)
    if ndim is not None and len(raw) != ndim:
        raise LayerError(f"layout {text!r} does not fit layer {layer}: its output is {_fmt(raw)} per example ({len(raw)}-D)")
    if kind not in ("tokens", "attention") or (kind == "attention" and not rest):
        return Layout(kind, reason="declared")
    if kind == "attention" and raw[1] != raw[2]:
        raise LayerError(f"layout {text!r} does not fit layer {layer}: {_fmt(raw)} is not (heads, L, L)")
    p_text, _, g_text = rest.partition(":")
    if p_text and not p_text.isdigit():
        raise LayerError(
            f"bad layout {text!r} for layer {layer}: {p_text!r} is not a prefix-token count (write e.g. {kind}:1 or {kind}:1:14x14)"
        )
    p = int(p_text) if p_text else 0
    n = (raw[0] if kind == "tokens" else raw[2]) - p
    if g_text:
        gh, _, gw = g_text.partition("x")
        if not (gh.isdigit() and gw.isdigit()):
            raise LayerError(f"bad layout {text!r} for layer {layer}: write the grid as HxW, e.g. tokens:1:14x14")
        grid = (int(gh), int(gw))
    else:
        side = math.isqrt(max(n, 0))
        grid = (side, side)
    if n <= 0 or grid[0] * grid[1] != n:
        raise LayerError(f"layout {text!r} does not fit layer {layer}: {n + p} tokens - {p} prefix is not a {grid[0]}x{grid[1]} grid")
    return Layout(kind, tuple(f"tok{i}" for i in range(p)), grid, "declared")


def parse_query(text: str | None) -> Query:
    """A query token from text: ``cls`` / ``dist`` / ``reg0`` / ``#K`` (a prefix token) or ``Y,X`` (a patch);
    None or empty: the default. Raises :class:`UnitError` (one line) when malformed."""
    if text is None or not text.strip():
        return None
    t = text.strip().lower()
    y, sep, x = t.partition(",")
    if sep:
        if not (y.strip().isdigit() and x.strip().isdigit()):
            raise UnitError(f"bad query {text!r}: write a prefix token (cls, dist, reg0, #0) or a patch Y,X (e.g. 3,5)")
        return (int(y), int(x))
    if not ((t[0].isalpha() and t.isalnum()) or (t.startswith("#") and t[1:].isdigit())):
        raise UnitError(f"bad query {text!r}: write a prefix token (cls, dist, reg0, #0) or a patch Y,X (e.g. 3,5)")
    return t


def parse_layout_options(items: list[str] | None) -> dict[str, str]:
    """``["LAYER=KIND", ...]`` (the CLI's ``--layout``) -> ``{layer: kind}``; :class:`LayerError` when malformed."""
    out: dict[str, str] = {}
    for item in items or []:
        name, sep, kind = item.partition("=")
        if not sep or not name or not kind:
            raise LayerError(f"bad --layout {item!r}: write LAYER=KIND, e.g. --layout stages.0=nhwc")
        out[name.strip()] = kind.strip()
    return out


def _fmt(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _plausible(pair: tuple[int, int], hw: tuple[int, int]) -> bool:
    """True when a (rows, columns) map could come from an input of ``hw`` pixels: same aspect ratio
    within one cell of rounding."""
    h, w = pair
    big, small = (h, w) if hw[0] >= hw[1] else (w, h)
    ratio = max(hw) / min(hw)
    return small >= 1 and (big - 1) / (small + 1) <= ratio + 1e-9 and ratio <= (big + 1) / max(small - 1, 0.5) + 1e-9


def _grid(n: int, hw: tuple[int, int]) -> tuple[int, int] | None:
    """The (rows, columns) grid of ``n`` patches over an input of ``hw`` pixels (square-ish patches)."""
    best: tuple[float, tuple[int, int]] | None = None
    for gh in range(1, n + 1):
        if n % gh:
            continue
        gw = n // gh
        err = abs(math.log((hw[0] / gh) / (hw[1] / gw)))
        if err < 0.2 and (best is None or err < best[0]):
            best = (err, (gh, gw))
    return best[1] if best is not None else None


def _tokens_from_two_probes(l1: int, l2: int, hw1: tuple[int, int], hw2: tuple[int, int]) -> Layout | None:
    """Prefix count and grid of a token layer from its length at two input sizes (the patch count scales
    with the input area, the prefix does not)."""
    for p in range(0, min(l1, l2, 17)):
        g1, g2 = _grid(l1 - p, hw1), _grid(l2 - p, hw2)
        if g1 is None or g2 is None or g1 == g2:
            continue
        if abs(g1[0] * hw2[0] - g2[0] * hw1[0]) <= hw1[0] and abs(g1[1] * hw2[1] - g2[1] * hw1[1]) <= hw1[1]:
            return Layout("tokens", tuple(f"tok{i}" for i in range(p)), g1, "measured: the patch count scales with the input")
    return None


def _declare_hint(layer: str, raw: tuple[int, ...], kinds: str) -> str:
    return (
        f"cannot tell the layout of layer {layer} (output {_fmt(raw)} per example): "
        f"declare it with --layout {layer}={kinds}, or none when it is not a map{_not_a_map(raw)} "
        f"(Python: model.layouts[{layer!r}] = {kinds.split('|')[0]!r})"
    )


def _not_a_map(raw: tuple[int, ...]) -> str:
    """What a 3-D output that is not a map probably is, for the hint: (few, many, some) reads as heads x
    tokens x head dim (or one query's attention, (heads, 1, keys))."""
    if len(raw) == 3 and raw[0] < raw[1] and raw[2] < raw[1]:
        return f", e.g. {raw[0]} heads x {raw[1]} tokens x {raw[2]}"
    if len(raw) == 3 and raw[1] == 1:
        return f", e.g. one query's attention of {raw[0]} heads over {raw[2]} keys"
    return ""


def detect_layout(
    layer: str,
    module: nn.Module,
    raw: tuple[int, ...],
    batch: int,
    *,
    hw: tuple[int, int],
    tokens: TokenGeometry | None,
    nhwc_model: bool,
    declared: Mapping[str, str],
    second: tuple[tuple[int, ...], tuple[int, int]] | None = None,
    lengths: frozenset[int] = frozenset(),
) -> Layout:
    """The layout of one layer's output.

    Args:
        layer: the layer name; ``module`` the module that produced it.
        raw: the output's full shape (N, ...) in the probe; ``batch`` the probe's N.
        hw: the probe's input size (rows, columns) in pixels.
        tokens: the model's stated token geometry at ``hw`` (:func:`token_geometry`), or None.
        nhwc_model: the model states channels-last outputs.
        declared: the user's declarations ``{layer: kind}`` (:func:`parse_layout`).
        second: (full output shape, input size) of a second probe at another input size, when run.
        lengths: the sequence lengths L of the model's (N, L, C) outputs: a (heads, L, L) output is
            attention, (heads, L, D) per-head features.
    """
    per = tuple(raw[1:])
    if layer in declared:
        return parse_layout(declared[layer], per, layer)
    if not raw or raw[0] != batch:
        return Layout("none", reason=f"its first axis ({raw[0] if raw else 'none'}) is not the batch (windows or a reshape)")
    if len(per) == 1:
        return Layout("vector", reason="(N, C)")
    if len(per) == 3 and tokens is not None and per[1] == per[2] == tokens.length:
        return Layout("attention", tokens.prefix, tokens.grid, "attention weights (heads, queries, keys): one map per head, a query's row")
    if len(per) == 3 and tokens is not None and per[1] == tokens.length:
        return Layout("none", reason="per-head features (heads, tokens, head dim)")
    if isinstance(module, nn.MultiheadAttention) and len(per) == 3 and per[1] == per[2]:
        # its per-head weights (PATH.attn_weights: heads, queries, keys), never a map: the token grid is
        # measured from a second probe (the patch count scales with the input, a prefix does not)
        s2 = second[0] if second is not None else ()
        if second is not None and len(s2) == 4 and s2[2] == s2[3] and s2[2] != per[1]:
            found = _tokens_from_two_probes(per[1], s2[2], hw, second[1])
            if found is not None:
                return Layout("attention", found.prefix, found.grid, "attention weights (heads, queries, keys); token grid measured")
        return Layout("none", reason=_declare_hint(layer, per, "attention:P"))
    if len(per) == 3 and per[1] in lengths and per[0] < per[1]:  # fewer heads than tokens: not a (C, H, W) map
        if per[1] == per[2]:
            return Layout(
                "attention", reason="attention weights (heads, queries, keys) over tokens whose patch grid the model does not state"
            )
        return Layout("none", reason="per-head features (heads, tokens, head dim)")
    if len(per) == 2:
        if tokens is not None and per[0] == tokens.length:
            return Layout("tokens", tokens.prefix, tokens.grid, "stated by the model")
        if tokens is not None and per[0] == tokens.grid[0] * tokens.grid[1]:
            return Layout("tokens", (), tokens.grid, "stated by the model (patches only)")
        if second is not None and len(second[0]) == 3 and second[0][2] == per[1] and second[0][1] != per[0]:
            found = _tokens_from_two_probes(per[0], second[0][1], hw, second[1])
            if found is not None:
                return found
        g = _grid(per[0], hw) if tokens is None and per[0] > 1 else None
        if g is not None:  # a flattened map without prefix tokens (e.g. inside Swin blocks)
            return Layout("tokens", (), g, GUESSED)
        return Layout("none", reason=_declare_hint(layer, per, "tokens:P"))
    if len(per) != 3:
        return Layout("none", reason=f"a {len(per)}-D output per example is not a map, token or vector layout")
    if isinstance(module, _NCHW_MODULES):
        return Layout("maps", reason="the module's contract")
    if second is not None and len(second[0]) == 4:
        scales = tuple(a != b for a, b in zip(per, second[0][1:]))
        if scales == (False, True, True):
            return Layout("maps", reason="measured")
        if scales == (True, True, False):
            return Layout("maps-last", reason="measured")
    first, last = _plausible(per[1:], hw), _plausible(per[:2], hw)
    if first and last:
        if nhwc_model:
            return Layout("maps-last", reason="stated by the model (output_fmt NHWC)")
        if per[0] != per[1] or per[1] != per[2]:
            # (C, h, h) with C one cell from h: the square pair decides
            first, last = per[1] == per[2], per[0] == per[1]
    if first != last:
        return Layout("maps" if first else "maps-last", reason=GUESSED)
    return Layout("none", reason=_declare_hint(layer, per, "nchw|nhwc"))
