"""Make the natural-image amplitude spectrum of deepvis's MACO parameterization.

MACO (Fel et al. 2023) optimizes only the Fourier phase of the image and fixes its magnitude to that of
natural images. This script estimates that magnitude once from the offline sample photos (the same eight
as ``scripts/color_correlation.py``): from each photo, 16 random 128x128 crops at the photo's own
resolution, each channel in 0–255 pixels minus the crop's mean, ``|rfft2(crop, norm="ortho")|``, averaged
over the 128 crops. The DC bin is set to 0 (deepvis measures images from the mean image). The result,
float32 of shape (3, 128, 65) (channel, y frequency in ``fftfreq`` order, x frequency in ``rfftfreq``
order), is written to ``src/deepvis/optimize/data/maco_spectrum.npy``; :func:`deepvis.optimize.maco.
natural_spectrum` resamples it to any canvas. Run: python scripts/make_maco_spectrum.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from deepvis.io import load_image, sample_path

PHOTOS = ("astronaut", "chelsea", "china", "coffee", "flower", "grace_hopper", "motorcycle", "rocket")
SIDE = 128
CROPS = 16
OUT = Path(__file__).resolve().parent.parent / "src" / "deepvis" / "optimize" / "data" / "maco_spectrum.npy"


def main() -> None:
    rng = np.random.default_rng(0)
    total = np.zeros((3, SIDE, SIDE // 2 + 1))
    count = 0
    for name in PHOTOS:
        im = np.asarray(load_image(sample_path(name)), dtype=np.float64).transpose(2, 0, 1)
        _, h, w = im.shape
        for _ in range(CROPS):
            y, x = rng.integers(0, h - SIDE + 1), rng.integers(0, w - SIDE + 1)
            crop = im[:, y : y + SIDE, x : x + SIDE]
            crop = crop - crop.mean(axis=(1, 2), keepdims=True)
            total += np.abs(np.fft.rfft2(crop, norm="ortho"))
            count += 1
    spectrum = (total / count).astype(np.float32)
    spectrum[:, 0, 0] = 0.0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.save(OUT, spectrum)
    rms = np.sqrt((spectrum.astype(np.float64) ** 2).sum(axis=(1, 2)) * 2 / SIDE**2)
    print(f"wrote {OUT} {spectrum.shape}; per-channel rms of a random-phase image ≈ {np.round(rms, 1).tolist()} levels")


if __name__ == "__main__":
    main()
