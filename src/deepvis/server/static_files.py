"""The page's files, read once from the package into memory and served by name only.

No path from a request ever reaches the file system: a request names a key of a dictionary built
when the app starts, and anything else is a 404.
"""

from __future__ import annotations

import html
import json
import secrets
from dataclasses import dataclass
from importlib import resources

__all__ = ["StaticFiles", "Asset"]

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".json": "application/json",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    content_type: str


class StaticFiles:
    """The files under ``deepvis/server/static`` (``index.html`` is a template, served by :meth:`index`)."""

    def __init__(self) -> None:
        self.assets: dict[str, Asset] = {}
        root = resources.files("deepvis.server") / "static"
        self._walk(root, "")
        if "index.html" not in self.assets:
            raise RuntimeError("deepvis is installed without its web page (deepvis/server/static/index.html)")
        self._template = self.assets.pop("index.html").body.decode()

    def _walk(self, node, prefix: str) -> None:  # node: importlib.resources.abc.Traversable
        for child in node.iterdir():
            name = f"{prefix}{child.name}"
            if child.is_dir():
                self._walk(child, name + "/")
                continue
            suffix = "." + child.name.rsplit(".", 1)[-1] if "." in child.name else ""
            if suffix in _TYPES:
                self.assets[name] = Asset(child.read_bytes(), _TYPES[suffix])

    def get(self, name: str) -> Asset | None:
        """The asset called ``name`` (e.g. ``js/main.js``), or None."""
        return self.assets.get(name)

    def index(self, token: str, host: str, *, frame_policy: str = "frame-ancestors 'none'") -> tuple[str, str]:
        """The page, with the token on every asset URL; returns (html, its Content-Security-Policy), which ends
        with ``frame_policy`` (:func:`deepvis.server.security.frame_ancestors`)."""
        nonce = secrets.token_urlsafe(16)
        q = "?token=" + token
        imports = {f"/static/{n}": f"/static/{n}{q}" for n in sorted(self.assets) if n.endswith(".js")}
        importmap = json.dumps({"imports": imports}).replace("<", "\\u003c")
        page = self._template.replace("%%NONCE%%", html.escape(nonce)).replace("%%IMPORTMAP%%", importmap).replace("%%Q%%", html.escape(q))
        ws = html.escape(host, quote=True).replace(";", "").replace(" ", "")
        csp = (
            "default-src 'none'; "
            f"script-src 'self' 'nonce-{nonce}'; "
            "style-src 'self'; "
            "img-src 'self' blob: data:; "
            "media-src 'self' blob: mediastream:; "
            f"connect-src 'self' ws://{ws} wss://{ws}; "
            f"base-uri 'none'; form-action 'none'; {frame_policy}"
        )
        return page, csp
