"""Print the color-correlation matrix used by deepvis's decorrelated parameterization.

The symmetric square root of the RGB covariance (0–1 pixels) of the offline natural sample photos,
scaled so that its largest column has norm 1; deepvis.optimize.param.COLOR_CORRELATION_SQRT holds the
result. Run: python scripts/color_correlation.py
"""

from __future__ import annotations

import numpy as np

from deepvis.io import load_image, sample_path

PHOTOS = ("astronaut", "chelsea", "china", "coffee", "flower", "grace_hopper", "motorcycle", "rocket")


def main() -> None:
    rng = np.random.default_rng(0)
    pixels = []
    for name in PHOTOS:
        im = np.asarray(load_image(sample_path(name)), dtype=np.float64).reshape(-1, 3) / 255.0
        pixels.append(im[rng.choice(len(im), min(len(im), 50_000), replace=False)])
    cov = np.cov(np.concatenate(pixels).T)
    w, v = np.linalg.eigh(cov)
    sqrt = v @ np.diag(np.sqrt(w)) @ v.T
    sqrt /= np.linalg.norm(sqrt, axis=0).max()
    print(np.round(sqrt, 4).tolist())


if __name__ == "__main__":
    main()
