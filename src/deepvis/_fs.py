"""Atomic file writing: outputs appear complete or not at all."""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

__all__ = ["atomic_path", "check_writable"]


def _create_temp(folder: Path, name: str, suffix: str) -> Path:
    """Create an empty, new temp file beside the target; the kernel applies the umask to 0o666."""
    for _ in range(100):
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp{suffix}"
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"cannot create a temporary file in {folder}")


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it onto ``target`` when the block succeeds.

    On any exception the temporary file is removed and ``target`` is left untouched, so a crash or a
    bad input never leaves a partial output file behind. The parent folder is created if needed. The
    temporary name keeps the target's suffix last, so writers that pick a format by suffix work.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = _create_temp(target.parent, target.name, target.suffix)
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def check_writable(target: str | os.PathLike[str]) -> str | None:
    """Why ``target`` (a file or folder to be written, with any missing parent folders) cannot be
    written, or None when it can: found by creating and removing a temporary file in the folder that
    would hold it (or in its nearest existing ancestor), so that a long job learns it before it starts."""
    target = Path(target)
    folder = target if target.is_dir() else target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, not a folder"
    try:
        os.unlink(_create_temp(folder, "deepvis-write-check", ""))
    except OSError as exc:
        return f"cannot write in {folder} ({exc.strerror or exc})"
    return None
