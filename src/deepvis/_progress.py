"""Progress bars for long work (tqdm on stderr)."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["progress_bar"]


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool | None = None, **kwargs: Any) -> tqdm[Any]:
    """A tqdm bar on stderr showing rate and ETA.

    ``enabled=None`` shows it when stderr is a terminal or ``DEEPVIS_PROGRESS=1``; ``False`` hides it.
    """
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty() or os.environ.get("DEEPVIS_PROGRESS") == "1"
    return tqdm(iterable, file=sys.stderr, disable=not enabled, dynamic_ncols=True, **kwargs)
