"""Progress bars for long work: tqdm on stderr in a terminal, tqdm's notebook bar in a Jupyter kernel."""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

__all__ = ["progress_bar", "in_kernel"]


def in_kernel() -> bool:
    """True when running inside a Jupyter kernel (IPython's ZMQ shell), without importing IPython.

    Reads ``sys.modules`` only: a kernel has imported IPython long before deepvis runs.
    """
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    shell = get() if callable(get) else None
    return shell is not None and type(shell).__name__ == "ZMQInteractiveShell"


def progress_bar(iterable: Iterable[Any] | None = None, *, enabled: bool | None = None, **kwargs: Any) -> tqdm[Any]:
    """A tqdm bar showing rate and ETA.

    ``enabled=None`` shows it when stderr is a terminal, in a Jupyter kernel, or with ``DEEPVIS_PROGRESS=1``;
    ``False`` hides it. In a kernel with ipywidgets installed (the ``notebook`` extra) it is tqdm's notebook
    widget (``tqdm.auto``); elsewhere the text bar on stderr (a kernel shows it as the cell's stderr).
    """
    kernel = in_kernel()
    if enabled is None:
        enabled = sys.stderr.isatty() or kernel or os.environ.get("DEEPVIS_PROGRESS") == "1"
    if kernel and enabled and importlib.util.find_spec("ipywidgets") is not None:
        from tqdm.auto import tqdm as auto_tqdm  # the notebook widget bar (imports ipywidgets: lazy)

        return auto_tqdm(iterable, **kwargs)
    from tqdm import tqdm

    return tqdm(iterable, file=sys.stderr, disable=not enabled, dynamic_ncols=True, **kwargs)
