"""Class names: ImageNet's, or a user's labels file."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from ..errors import InputError

__all__ = ["imagenet_class_names", "read_labels"]


@functools.lru_cache(maxsize=1)
def _imagenet() -> tuple[str, ...]:
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    return tuple(info.index_to_description(i) for i in range(info.num_classes()))


def imagenet_class_names() -> list[str]:
    """The 1000 ImageNet-1k class descriptions in index order ("tabby, tabby cat", ...), from timm."""
    return list(_imagenet())


def read_labels(path: str | os.PathLike[str]) -> list[str]:
    """Read class names: a text file with one name per line, or a JSON list of names."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"labels {path} is a folder, not a file of names" if path.is_dir() else f"labels file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read labels file {path}: {exc}") from exc
    if path.suffix == ".json":
        try:
            names = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"labels file {path} is not valid JSON: {exc}") from exc
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise InputError(f"labels file {path} must hold a JSON list of strings")
    else:
        names = [line.strip() for line in text.splitlines() if line.strip()]
    if not names:
        raise InputError(f"labels file {path} holds no names")
    return names
