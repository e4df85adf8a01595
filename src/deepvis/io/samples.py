"""Sample photos that ship inside installed packages (no network): ``sample:NAME`` on the command line."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from ..errors import InputError

__all__ = ["sample_photos", "sample_path", "resolve_input", "SAMPLE_PREFIX"]

SAMPLE_PREFIX = "sample:"

_SKIMAGE = {
    "astronaut": "astronaut.png",
    "brick": "brick.png",
    "camera": "camera.png",
    "chelsea": "chelsea.png",
    "clock": "clock_motion.png",
    "coffee": "coffee.png",
    "coins": "coins.png",
    "colorwheel": "color.png",
    "grass": "grass.png",
    "gravel": "gravel.png",
    "horse": "horse.png",
    "hubble": "hubble_deep_field.jpg",
    "ihc": "ihc.png",
    "logo": "logo.png",
    "moon": "moon.png",
    "motorcycle": "motorcycle_left.png",
    "page": "page.png",
    "retina": "retina.jpg",
    "rocket": "rocket.jpg",
    "text": "text.png",
}


@functools.lru_cache(maxsize=1)
def _all() -> tuple[tuple[str, str], ...]:
    found: list[tuple[str, str]] = []
    try:
        import skimage

        base = Path(skimage.__file__).parent / "data"
        found += [(n, str(base / f)) for n, f in _SKIMAGE.items() if (base / f).is_file()]
    except ImportError:
        pass
    try:
        import sklearn.datasets

        base = Path(sklearn.datasets.__file__).parent / "images"
        found += [(n, str(base / f"{n}.jpg")) for n in ("china", "flower") if (base / f"{n}.jpg").is_file()]
    except ImportError:
        pass
    try:
        import matplotlib

        p = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
        if p.is_file():
            found.append(("grace_hopper", str(p)))
    except ImportError:
        pass
    return tuple(sorted(found))


def sample_photos() -> dict[str, Path]:
    """Name → path of every sample photo available offline (from scikit-image, scikit-learn, matplotlib)."""
    return {n: Path(p) for n, p in _all()}


def sample_path(name: str) -> Path:
    """The path of sample photo ``name``."""
    photos = sample_photos()
    if name not in photos:
        raise InputError(f"no sample photo named {name!r}; available: {', '.join(sorted(photos))}")
    return photos[name]


def resolve_input(spec: str | os.PathLike[str]) -> Path:
    """A path, or ``sample:NAME`` for a bundled sample photo."""
    s = os.fspath(spec)
    if s.startswith(SAMPLE_PREFIX):
        return sample_path(s[len(SAMPLE_PREFIX) :])
    return Path(s)
