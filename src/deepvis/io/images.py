"""Reading images safely, with one documented policy for every Pillow mode.

Conversion policy (applied after EXIF orientation):

* ``1`` (bilevel): black/white → 0/255.
* ``L``, ``P``, ``RGB``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``: Pillow's own conversion to RGB (palette
  images with transparency are treated as RGBA).
* ``LA``, ``PA``, ``RGBA``, ``RGBa``: composited over a white background.
* ``I;16`` and its variants: scaled from 0–65535 to 0–255.
* ``I`` (32-bit integers): taken as 0–255 when every value is in that range, otherwise as 16-bit
  (0–65535 → 0–255); clipped.
* ``F`` (32-bit floats): taken as 0–1 when every value is in that range, otherwise as 0–255; clipped.

The result is then turned into the model's channels: RGB as is, or grayscale (``L``) with Pillow's
ITU-R 601-2 luma transform.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import InputError
from ..pixels import to_uint8

__all__ = ["load_image", "decode_image", "to_mode", "DEFAULT_MAX_PIXELS", "IMAGE_SUFFIXES"]

#: images with more pixels than this are refused (decompression bombs); 64 megapixels
DEFAULT_MAX_PIXELS = 64_000_000
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")


def load_image(path: str | os.PathLike[str], mode: str = "RGB", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read an image file into a Pillow image in ``mode`` (``"RGB"`` or ``"L"``), at its own size.

    Every Pillow mode is converted by one policy (:func:`to_mode`: 16-bit and float images scaled to
    0-255, transparency composited over white), EXIF orientation applied. ``max_pixels`` bounds
    width × height (decompression bombs). Raises :class:`~deepvis.errors.InputError` with a one-line message for a missing, empty,
    truncated, non-image or over-large file. Animated images give their first frame.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    if not path.is_file():
        raise InputError(f"input is not a file: {path}")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return decode_image(data, mode, max_pixels=max_pixels, name=str(path))


def decode_image(data: bytes, mode: str = "RGB", *, max_pixels: int = DEFAULT_MAX_PIXELS, name: str = "image") -> Image.Image:
    """Decode image bytes (see :func:`load_image`)."""
    if not data:
        raise InputError(f"{name} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im: Image.Image = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > max_pixels:
                raise InputError(
                    f"{name} is {w}x{h} = {w * h / 1e6:.0f} megapixels, over the {max_pixels / 1e6:.0f} MP limit (decompression bomb?)"
                )
            if getattr(im, "n_frames", 1) > 1:
                im.seek(0)
            im.load()
            im = ImageOps.exif_transpose(im)
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InputError(f"{name} is too large to decode safely (decompression bomb): {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InputError(f"{name} is not an image Pillow can read (JPEG, PNG, WebP, GIF, BMP, TIFF)") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise InputError(f"{name} is damaged or truncated: {exc}") from exc
    return to_mode(im, mode)


def _stretch(arr: np.ndarray, mode: str) -> np.ndarray:
    arr = arr.astype(np.float64)
    if mode.startswith("I;16"):
        arr = arr / 257.0
    elif mode == "I":
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            arr = arr / 257.0
    elif mode == "F" and arr.size and arr.min() >= 0 and arr.max() <= 1:
        arr = arr * 255.0
    return to_uint8(arr, scale=1.0)


def to_mode(im: Image.Image, mode: str = "RGB") -> Image.Image:
    """Convert any Pillow image to ``"RGB"`` or ``"L"`` by the module's documented policy."""
    if mode not in ("RGB", "L"):
        raise ValueError(f"mode must be RGB or L, not {mode}")
    src = im.mode
    if src == "P" and "transparency" in im.info:
        im, src = im.convert("RGBA"), "RGBA"
    if src in ("I", "F") or src.startswith("I;16"):
        im = Image.fromarray(_stretch(np.asarray(im), src), "L")
    elif src in ("LA", "PA", "RGBA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba).convert("RGB")
    elif src == "1":
        im = im.convert("L")
    if im.mode != mode:
        im = im.convert(mode)
    return im
