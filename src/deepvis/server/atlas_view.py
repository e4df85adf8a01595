"""The atlas as the page sees it: unit records as JSON, and images served by (layer, unit, kind, rank).

No path from a request is ever opened: the page names a unit and an image kind, the atlas index
gives the file, and the file must lie inside the atlas folder. The atlas is opened for each request
(SQLite connections belong to one thread; requests run in a thread pool), read-only.

An atlas is served only with the model it was made with (:func:`deepvis.models.identity.check_identity`:
the same weights and input size); another model's atlas is refused when the app is built, since its
pictures would describe other units.

Synthesized images are served cropped to the receptive field of the unit they were optimized for (the
center of the map, on the image's own canvas), as the original toolbox showed them
(:class:`SynthCropper`); the page can ask for the whole canvas.

Dataset crops are cut to the receptive field of the unit's maximum when the atlas is built; the whole
input (kind ``input``: the dataset image as the model saw it, with that field's box drawn on it) is
served when the dataset is at hand (``dataset``: the live miner's, whose sample indices the atlas
records) and the record's sample still has the same key there. A prebuilt atlas without its dataset
does not store whole images: its records say so (``whole_note``).
"""

from __future__ import annotations

import io
import logging
import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image, ImageDraw

from ..atlas import Atlas, AtlasError, open_atlas, unit_dir
from ..atlas.store import TopImage
from ..atlas.tasks import png_bytes
from ..backprop import ReceptiveField, layer_field
from ..capture import split_token_layer
from ..datasets import ImageDataset
from ..errors import DeepvisError, InputError
from ..models.identity import check_identity
from ..models.model import Model
from ..scores import synth_beats_top_k
from .engine import replica
from .protocol import json_float

__all__ = ["AtlasView", "IMAGE_KINDS", "SynthCropper", "BOX_COLOR", "WHOLE_NOT_STORED"]

log = logging.getLogger("deepvis.server")

#: what an image request may ask for: the atlas's synthesized image (display, raw), a top input's crop,
#: its view, its whole input with the field's box (``input``), and this server's accentuation (``accent``)
IMAGE_KINDS = ("synth", "synth_raw", "crop", "view", "input", "accent")
#: the colour of the receptive field's box drawn on a whole input (the input pane's yellow)
BOX_COLOR = (255, 221, 0)
#: what a record says when the whole inputs cannot be shown
WHOLE_NOT_STORED = "whole image not stored: the atlas keeps crops only (serve with --dataset to see whole inputs)"


_T = TypeVar("_T")


class AtlasView:
    """Read access to one atlas folder for the server.

    ``dataset``: the dataset the atlas was mined from, when at hand (whole inputs are then served);
    ``fields``: the receptive fields that box them (the server's :class:`SynthCropper`, so that one copy
    of the network serves both; None: a copy of its own, made on first use).

    Raises :class:`~deepvis.errors.ModelError` (one line) when the atlas was made with other weights
    or at another input size than ``model``, and :class:`~deepvis.atlas.AtlasError` when it cannot be
    read.
    """

    def __init__(
        self, root: str | os.PathLike[str], model: Model, *, dataset: ImageDataset | None = None, fields: SynthCropper | None = None
    ) -> None:
        self.root = Path(root).resolve()
        #: the dataset the atlas was mined from, when at hand (whole inputs); None: crops only
        self.dataset = dataset
        #: receptive fields of whole inputs' boxes: ``fields`` (the server's cropper), else a private copy
        #: of the network made on first use
        self._model = model
        self._fields: SynthCropper | None = fields
        self._fields_lock = threading.Lock()
        try:
            with open_atlas(self.root) as atlas:
                meta = atlas.meta
                self.layers = {rec.name: rec for rec in atlas.layers()}
        except sqlite3.Error as exc:
            raise AtlasError(f"cannot read the atlas {self.root}: {exc} (is it damaged, or from another deepvis version?)") from exc
        check_identity(
            meta,
            model,
            what=f"atlas {self.root}",
            fix="serve the model it was made with (same weights and --input-size), build an atlas of this model, or drop --atlas",
        )
        self.meta = meta

    def refresh(self) -> None:
        """Read the atlas's layer list again (after a miner recorded a layer or views)."""
        self.layers = self._read(lambda atlas: {rec.name: rec for rec in atlas.layers()})

    def info(self) -> dict[str, Any]:
        return {
            "available": True,
            "layers": sorted(self.layers, key=lambda n: self.layers[n].order),
            "model": self.meta.get("model"),
            "dataset": self.meta.get("dataset"),
        }

    def synth_params(self, layer: str) -> dict[str, Any] | None:
        rec = self.layers.get(layer)
        return dict(rec.synth_params) if rec is not None and rec.synth_params else None

    def read(self, fn: Callable[[Atlas], _T]) -> _T:
        """Run ``fn(atlas)`` on a freshly opened atlas (read-only); unreadable index data is a one-line error."""
        return self._read(fn)

    def has_top(self, layer: str, unit: int) -> bool:
        """Whether the atlas holds ``layer:unit``'s top inputs (its layer mined)."""
        rec = self.layers.get(layer)
        return rec is not None and rec.mined and 0 <= unit < rec.units

    def has_crops(self, layer: str, unit: int) -> bool:
        """Whether ``layer:unit``'s top inputs have their crops."""
        if not self.has_top(layer, unit):
            return False
        r = self._read(lambda atlas: atlas.unit(layer, unit))
        return any(t.crop is not None for t in r.top)

    def _field_helper(self) -> SynthCropper:
        with self._fields_lock:
            if self._fields is None:
                self._fields = SynthCropper(replica(self._model))
            return self._fields

    def _whole_ok(self, t: TopImage) -> bool:
        """Whether the whole input of top entry ``t`` is at hand: the dataset has its sample, same key."""
        ds = self.dataset
        return ds is not None and 0 <= t.sample < len(ds) and ds.samples[t.sample].key == t.key

    def box(self, layer: str, t: TopImage) -> tuple[int, int, int, int] | None:
        """The receptive field's box (top, left, bottom, right; half-open input pixels, the part inside
        the input) of top entry ``t`` of ``layer`` (the position of the unit's maximum), or None for a
        prefix token or a unit without a position (the whole input)."""
        if split_token_layer(layer) is not None or t.position is None:
            return None
        rf = self._field_helper().field_at(layer, t.position)
        return None if rf is None else rf.box

    def whole_input(self, layer: str, t: TopImage) -> bytes | None:
        """The PNG of top entry ``t``'s whole input as the model saw it (preprocessed), with its
        receptive field's box drawn (:data:`BOX_COLOR`, 1 px), or None when the dataset is not at hand."""
        if not self._whole_ok(t):
            return None
        assert self.dataset is not None
        m = self._model
        try:
            im = self.dataset.load(t.sample, m.preprocessing.pil_mode)
        except InputError as exc:
            log.warning("whole input %s: %s", t.key, exc)
            return None
        pic = m.preprocessing.to_image(m.preprocess([im])[0]).convert("RGB")
        box = self.box(layer, t)
        if box is not None:
            top, left, bottom, right = box
            ImageDraw.Draw(pic).rectangle((left, top, right - 1, bottom - 1), outline=BOX_COLOR, width=1)
        return png_bytes(pic)

    def _read(self, fn: Callable[[Atlas], _T]) -> _T:
        """Run ``fn(atlas)`` on a freshly opened atlas; unreadable index data becomes a one-line error."""
        try:
            with open_atlas(self.root) as atlas:
                return fn(atlas)
        except sqlite3.Error as exc:
            raise AtlasError(f"cannot read the atlas {self.root}: {exc} (is it damaged, or from another deepvis version?)") from exc

    def unit(self, layer: str, unit: int) -> dict[str, Any]:
        """What the atlas holds about a unit (``in_atlas`` False when its layer or unit is missing)."""
        rec = self.layers.get(layer)
        if rec is None or not 0 <= unit < rec.units:
            return {"layer": layer, "unit": unit, "in_atlas": False, "top": [], "synth": None, "stats": None}
        r = self._read(lambda atlas: atlas.unit(layer, unit))
        whole = self.dataset is not None
        stats = None
        if r.stats is not None:
            s = r.stats
            stats = {k: json_float(getattr(s, k, None)) for k in ("mean", "std", "max", "min", "mean_max", "frac_active")}
        return {
            "layer": layer,
            "unit": unit,
            "in_atlas": True,
            "top": [
                {
                    "rank": t.rank,
                    "value": json_float(t.value),
                    "label": t.label,
                    "name": Path(t.key).name if t.key else None,
                    "position": list(t.position) if t.position is not None else None,
                    "crop": t.crop is not None,
                    "view": t.view is not None,
                    "whole": whole and self._whole_ok(t),
                    "box": list(b) if whole and self._whole_ok(t) and (b := self.box(layer, t)) is not None else None,
                }
                for t in r.top
            ],
            "whole_note": None if whole else WHOLE_NOT_STORED,
            "synth": {"value": json_float(r.synth.value), "source": "atlas", "beats_top_k": synth_beats_top_k(r)}
            if r.synth is not None
            else None,
            "stats": stats,
        }

    def synth_units(self, layer: str) -> list[int]:
        """Units of ``layer`` that have a synthesized image in the atlas (by the store's file layout:
        ``<layer>/<unit>/synth.png``; the image itself is then served through the unit's record)."""
        rec = self.layers.get(layer)
        if rec is None:
            return []
        return [u for u in range(rec.units) if (self.root / unit_dir(layer, u) / "synth.png").is_file()]

    def image(self, layer: str, unit: int, kind: str, rank: int = 0) -> bytes | None:
        """The PNG bytes of one atlas image, or None when the atlas has no such image."""
        if kind not in IMAGE_KINDS:
            raise DeepvisError(f"unknown image kind {kind!r}")
        rec = self.layers.get(layer)
        if rec is None or not 0 <= unit < rec.units:
            return None
        r = self._read(lambda atlas: atlas.unit(layer, unit))
        path: Path | None = None
        if kind == "accent":
            return None  # this server's own, never in the atlas
        if kind == "input":
            top = [t for t in r.top if t.rank == rank]
            return self.whole_input(layer, top[0]) if top else None
        if kind in ("synth", "synth_raw"):
            if r.synth is not None:
                path = r.synth.image if kind == "synth" else r.synth.raw
        else:
            top = [t for t in r.top if t.rank == rank]
            if top:
                path = top[0].crop if kind == "crop" else top[0].view
        if path is None:
            return None
        resolved = Path(path).resolve()
        if not resolved.is_relative_to(self.root) or not resolved.is_file():
            log.warning("atlas image outside the atlas folder or missing: %s", resolved)
            return None
        return resolved.read_bytes()


class SynthCropper:
    """Crops synthesized images to the receptive field of their unit.

    A synthesized image of ``layer`` maximizes the unit at the center of its map, on a canvas of the
    image's size; the crop is that position's receptive field (:func:`deepvis.backprop.layer_field` at
    the canvas size), the part inside the canvas. ``model`` is a private copy of the network
    (receptive fields add temporary hooks), used by one request at a time; fields are cached per layer
    and canvas size by the library.
    """

    def __init__(self, model: Model) -> None:
        self.model = model
        self._lock = threading.Lock()

    def field(self, layer: str, size: tuple[int, int]) -> ReceptiveField | None:
        """The receptive field of ``layer``'s center unit on a canvas of ``size`` (H, W) pixels, or None
        where it is not a box inside the image (a prefix token, attention: the whole image)."""
        try:
            with self._lock:
                geo = layer_field(self.model, layer, size)
        except DeepvisError as exc:
            log.debug("no receptive field for %s at %s: %s", layer, size, exc)
            return None
        if geo.whole_image is not None:
            return None
        center = None if geo.output_size is None else (geo.output_size[0] // 2, geo.output_size[1] // 2)
        rf = geo.at(center)
        return None if rf.input_independent else rf

    def field_at(self, layer: str, position: tuple[int, int]) -> ReceptiveField | None:
        """The receptive field of ``layer``'s unit at map ``position`` (row, column) on the model's input,
        or None where it is not a box inside the image."""
        try:
            with self._lock:
                geo = layer_field(self.model, layer)
        except DeepvisError as exc:
            log.debug("no receptive field for %s: %s", layer, exc)
            return None
        if geo.whole_image is not None:
            return None
        rf = geo.at(position)
        return None if rf.input_independent else rf

    def crop(self, png: bytes, layer: str) -> bytes:
        """``png`` (a synthesized image of ``layer``) cut to its unit's receptive field inside the canvas
        (unchanged when the field covers the whole canvas or is unknown)."""
        image = Image.open(io.BytesIO(png))
        image.load()
        rf = self.field(layer, (image.height, image.width))
        if rf is None:
            return png
        top, left, bottom, right = rf.box
        if (top, left, bottom, right) == (0, 0, image.height, image.width) or bottom <= top or right <= left:
            return png
        return png_bytes(image.crop((left, top, right, bottom)))
