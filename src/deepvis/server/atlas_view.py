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

from PIL import Image

from ..atlas import Atlas, AtlasError, open_atlas, unit_dir
from ..atlas.tasks import png_bytes
from ..backprop import ReceptiveField, layer_field
from ..errors import DeepvisError
from ..models.identity import check_identity
from ..models.model import Model
from ..scores import synth_beats_top_k
from .protocol import json_float

__all__ = ["AtlasView", "IMAGE_KINDS", "SynthCropper"]

log = logging.getLogger("deepvis.server")

#: what an atlas image request may ask for
IMAGE_KINDS = ("synth", "synth_raw", "crop", "view")


_T = TypeVar("_T")


class AtlasView:
    """Read access to one atlas folder for the server.

    Raises :class:`~deepvis.errors.ModelError` (one line) when the atlas was made with other weights
    or at another input size than ``model``, and :class:`~deepvis.atlas.AtlasError` when it cannot be
    read.
    """

    def __init__(self, root: str | os.PathLike[str], model: Model) -> None:
        self.root = Path(root).resolve()
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
                }
                for t in r.top
            ],
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
