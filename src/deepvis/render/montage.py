"""Montages and labelled panels made of several images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..pixels import to_uint8
from .grid import PAD_COLOR, grid_shape

__all__ = ["montage", "as_image", "caption", "hstack"]


def as_image(img: Image.Image | np.ndarray) -> Image.Image:
    """A Pillow RGB image from a Pillow image or an (H, W[, 3]) array of 0–255 values (uint8 as is;
    other types rounded to whole levels and clipped)."""
    if isinstance(img, Image.Image):
        return img.convert("RGB")
    arr = to_uint8(np.asarray(img), scale=1.0)
    return Image.fromarray(arr).convert("RGB")


def montage(
    images: Sequence[Image.Image | np.ndarray],
    *,
    cols: int | None = None,
    tile: int | None = None,
    pad: int = 2,
    labels: Sequence[str] | None = None,
) -> Image.Image:
    """Arrange images in a grid (near-square unless ``cols``), each resized to ``tile`` px (default: the first's size)."""
    if not images:
        raise ValueError("montage of no images")
    ims = [as_image(i) for i in images]
    tw, th = (tile, tile) if tile else ims[0].size
    ims = [i if i.size == (tw, th) else i.resize((tw, th), Image.Resampling.BICUBIC) for i in ims]
    rows, c = grid_shape(len(ims)) if cols is None else (-(-len(ims) // cols), cols)
    label_h = 14 if labels else 0
    out = Image.new("RGB", (pad + c * (tw + pad), pad + rows * (th + label_h + pad)), PAD_COLOR)
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for k, im in enumerate(ims):
        r, cc = divmod(k, c)
        x, y = pad + cc * (tw + pad), pad + r * (th + label_h + pad)
        out.paste(im, (x, y))
        if labels:
            draw.text((x + 1, y + th + 1), labels[k][: max(1, tw // 6)], fill=(230, 230, 230), font=font)
    return out


def caption(lines: Sequence[str], width: int, *, line_height: int = 14) -> Image.Image:
    """A dark strip ``width`` px wide holding lines of text."""
    out = Image.new("RGB", (width, 4 + line_height * len(lines)), (20, 20, 20))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for i, line in enumerate(lines):
        draw.text((4, 2 + i * line_height), line, fill=(235, 235, 235), font=font)
    return out


def hstack(images: Sequence[Image.Image], *, pad: int = 4, background: tuple[int, int, int] = (20, 20, 20)) -> Image.Image:
    """Place images side by side, top-aligned."""
    w = sum(i.width for i in images) + pad * (len(images) + 1)
    h = max(i.height for i in images) + 2 * pad
    out = Image.new("RGB", (w, h), background)
    x = pad
    for im in images:
        out.paste(im, (x, pad))
        x += im.width + pad
    return out
