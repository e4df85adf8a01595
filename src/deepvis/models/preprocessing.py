"""How a model wants its input: size, channels, normalization, resizing."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..pixels import to_uint8

__all__ = ["Preprocessing", "IMAGENET_MEAN", "IMAGENET_STD"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocessing:
    """The input a model expects.

    ``input_size`` is (height, width) in pixels; ``mean``/``std`` are per channel in the 0–1 pixel scale
    (model input = (pixel/255 − mean) / std); ``crop_pct`` is the fraction of the resized image kept by
    the center crop (timm's convention: resize the shorter side to size/crop_pct, then crop ``size``);
    ``channels`` is 3 (RGB) or 1 (grayscale).
    """

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    channels: int = 3
    extra: dict[str, object] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, not {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError("crop_pct must be in (0, 1]")

    @property
    def pil_mode(self) -> str:
        """The Pillow mode of images this model takes: ``"RGB"`` or ``"L"``."""
        return "RGB" if self.channels == 3 else "L"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one input."""
        return (self.channels, *self.input_size)

    def with_size(self, size: int | tuple[int, int]) -> Preprocessing:
        """The same preprocessing at another input size (square when given one number)."""
        hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        return Preprocessing(hw, self.mean, self.std, self.interpolation, self.crop_pct, self.channels)

    # -- images <-> tensors -------------------------------------------------------------------------
    def fit(self, image: Image.Image, *, crop: bool = True) -> Image.Image:
        """Resize (and center-crop when ``crop``) an image to the input size, keeping its mode."""
        h, w = self.input_size
        resample = _RESAMPLE[self.interpolation]
        if not crop:
            return image.resize((w, h), resample)
        scale = max(h, w) / self.crop_pct
        iw, ih = image.size
        ratio = scale / min(iw, ih)
        nw, nh = max(w, round(iw * ratio)), max(h, round(ih * ratio))
        image = image.resize((nw, nh), resample)
        left, top = (nw - w) // 2, (nh - h) // 2
        return image.crop((left, top, left + w, top + h))

    def to_tensor(self, image: Image.Image, *, crop: bool = True) -> torch.Tensor:
        """A Pillow image in :attr:`pil_mode` → normalized float tensor (C, H, W) ready for the model (an RGB
        image for a grayscale model is converted, and a grayscale one for an RGB model)."""
        if image.mode != self.pil_mode and {image.mode, self.pil_mode} == {"RGB", "L"}:
            image = image.convert(self.pil_mode)  # a photo for a grayscale model, or the other way round
        if image.mode != self.pil_mode:
            raise InputError(f"expected a {self.pil_mode} image, got mode {image.mode}; use deepvis.io.load_image")
        arr = np.asarray(self.fit(image, crop=crop), dtype=np.float32)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1)
        return self.normalize(x / 255.0)

    def normalize(self, x01: torch.Tensor) -> torch.Tensor:
        """Pixels in 0–1 (…, C, H, W) → model input."""
        mean, std = self._stats(x01)
        return (x01 - mean) / std

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Model input (…, C, H, W) → pixels in 0–1 (not clipped)."""
        mean, std = self._stats(x)
        return x * std + mean

    def _stats(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean = torch.tensor(self.mean, dtype=like.dtype, device=like.device).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=like.dtype, device=like.device).view(-1, 1, 1)
        return mean, std

    def to_image(self, x: torch.Tensor) -> Image.Image:
        """Model input (C, H, W) → Pillow image, clipped to the valid pixel range."""
        arr = to_uint8(self.denormalize(x.detach().float().cpu()).permute(1, 2, 0))
        return Image.fromarray(arr[:, :, 0] if self.channels == 1 else arr, self.pil_mode)

    # -- pixel-unit conversions used by the optimizer and the analyses ------------------------------
    def pixel_scale(self) -> torch.Tensor:
        """Size of one 0–255 pixel step in model-input units, per channel: 1 / (255 · std)."""
        return 1.0 / (255.0 * torch.tensor(self.std))

    def mean_pixel(self) -> torch.Tensor:
        """The mean image in 0–255 pixels, per channel: 255 · mean (the model input's 0 is this image)."""
        return 255.0 * torch.tensor(self.mean, dtype=torch.float64)

    def valid_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel (low, high) of model input that correspond to pixels 0 and 255."""
        mean, std = torch.tensor(self.mean), torch.tensor(self.std)
        return (0 - mean) / std, (1 - mean) / std
