"""The full HTML report (``deepvis report`` / :func:`deepvis.analysis.write_report`) in a cell."""

from __future__ import annotations

import html
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

__all__ = ["ReportFrame", "show_report"]


@dataclass(frozen=True)
class ReportFrame:
    """A written report shown in an iframe (the page inline, so it needs no file server) with a link to the file."""

    path: Path
    height: int = 700

    def _repr_html_(self) -> str:
        """The iframe and the link (IPython's display protocol); the report's own scripts do not run."""
        page = self.path.read_text(encoding="utf-8")
        return (
            f"<div><a href='{html.escape(self.path.as_uri())}' target='_blank'>{html.escape(str(self.path))}</a></div>"
            f"<iframe sandbox='' style='width:100%;height:{int(self.height)}px;border:1px solid #ccc' srcdoc=\"{html.escape(page, quote=True)}\"></iframe>"
        )


def show_report(path: str | os.PathLike[str], *, height: int = 700) -> ReportFrame:
    """Show a report's HTML file (the first path :func:`~deepvis.analysis.write_report` returns) in the cell.

    Args:
        path: the report's ``.html`` file.
        height: the iframe's height in CSS pixels.
    """
    p = Path(path)
    if not p.is_file():
        raise InputError(f"no report at {p} (write one with deepvis.write_report or `deepvis report`)")
    return ReportFrame(p.resolve(), height)
