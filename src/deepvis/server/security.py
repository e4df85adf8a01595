"""What stands between the toolbox and other web pages or machines.

* Every HTTP request and WebSocket must carry the launch token (``?token=...`` in the URL, or an
  ``Authorization: token ...`` / ``X-Deepvis-Token`` header), compared in constant time.
* The ``Host`` header must name this machine by a known name (localhost, a loopback address, the
  bound host, or one allowed explicitly): a DNS-rebinding page reaches the server under its own name
  and is refused.
* WebSocket handshakes and state-changing requests (POST, PUT, PATCH, DELETE) must come from the
  page's own origin when the browser says where they come from (``Origin``): a foreign page cannot
  drive the toolbox from the user's browser. Clients that send no ``Origin`` (curl, scripts) are not
  browsers and still need the token.
* WebSockets are refused before they are accepted; the rest gets 403 with a one-line reason.
* No page may frame the toolbox (``X-Frame-Options: DENY``, CSP ``frame-ancestors 'none'``), except the
  origins named in ``frame_ancestors`` (the notebook's own origin, for ``deepvis.toolbox``): then every
  response says ``frame-ancestors <those origins>`` instead, and other pages still cannot frame it.

:class:`GuardMiddleware` is plain ASGI so that it sees WebSocket handshakes too.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from collections.abc import Iterable
from urllib.parse import parse_qs, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["Guard", "GuardMiddleware", "new_token", "frame_ancestors", "LOCAL_HOSTNAMES", "SECURITY_HEADERS"]

LOCAL_HOSTNAMES = ("localhost", "127.0.0.1", "::1")
#: headers added to every HTTP response
SECURITY_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-resource-policy", b"same-origin"),
)
_UNSAFE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


def new_token() -> str:
    """A fresh random token (32 bytes of entropy, URL-safe)."""
    return secrets.token_urlsafe(32)


def frame_ancestors(origins: Iterable[str] = ()) -> str:
    """The CSP ``frame-ancestors`` directive allowing exactly ``origins`` (``scheme://host[:port]``; none: ``'none'``).

    Raises ValueError for anything that is not a plain http(s) origin (a path, a wildcard, a quote...).
    """
    checked = []
    for origin in origins:
        parts = urlsplit(origin)
        if (
            parts.scheme not in ("http", "https")
            or not parts.netloc
            or origin != f"{parts.scheme}://{parts.netloc}"
            or any(c in origin for c in "*'\" ;,")
        ):
            raise ValueError(f"{origin!r} is not an origin such as http://localhost:8888")
        checked.append(origin)
    return "frame-ancestors " + (" ".join(checked) if checked else "'none'")


def _hostname(host: str) -> str | None:
    """The host name of a ``Host`` header value (``name``, ``name:port``, ``[v6]:port``), lower-cased."""
    host = host.strip().lower()
    if not host or any(c in host for c in "/\\@ \t"):
        return None
    if host.startswith("["):
        end = host.find("]")
        if end < 0:
            return None
        rest = host[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            return None
        return host[1:end]
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        return name
    return host if ":" not in host else None


class Guard:
    """Token, Host and Origin checks, and the framing policy (see module docstring).

    ``frame_origins``: the origins that may frame the page (none: no page may).
    """

    def __init__(self, token: str, allowed_hosts: Iterable[str] = (), frame_origins: Iterable[str] = ()) -> None:
        if len(token) < 16:
            raise ValueError("the token must be at least 16 characters")
        self.token = token
        self.allowed_hosts = {h.strip().lower().strip("[]") for h in (*LOCAL_HOSTNAMES, *allowed_hosts) if h.strip()}
        self.frame_origins = tuple(frame_origins)
        #: the CSP directive of the framing policy (the page's own CSP ends with it)
        self.frame_policy = frame_ancestors(self.frame_origins)
        #: headers added to every HTTP response: :data:`SECURITY_HEADERS`, or with framing allowed for
        #: ``frame_origins``, those without ``X-Frame-Options`` and with a CSP saying who may frame
        self.headers: tuple[tuple[bytes, bytes], ...] = (
            SECURITY_HEADERS
            if not self.frame_origins
            else (*(h for h in SECURITY_HEADERS if h[0] != b"x-frame-options"), (b"content-security-policy", self.frame_policy.encode()))
        )

    def token_ok(self, supplied: str | None) -> bool:
        return supplied is not None and hmac.compare_digest(supplied.encode(), self.token.encode())

    def host_ok(self, host: str | None) -> bool:
        """The ``Host`` header names this machine."""
        if host is None:
            return False
        name = _hostname(host)
        if name is None:
            return False
        if name in self.allowed_hosts:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def origin_ok(self, origin: str | None, host: str | None) -> bool:
        """The request comes from the page's own origin (no ``Origin`` at all: not a browser, allowed)."""
        if origin is None:
            return True
        try:
            parts = urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or not parts.netloc or host is None:
            return False
        return parts.netloc.lower() == host.strip().lower() and self.host_ok(parts.netloc)

    @staticmethod
    def supplied_token(scope: Scope) -> str | None:
        """The token a request carries: ``?token=``, ``Authorization: token X`` or ``X-Deepvis-Token``."""
        for key, value in scope.get("headers", ()):
            if key == b"authorization":
                v = value.decode("latin-1").strip()
                if v.lower().startswith("token "):
                    return v[6:].strip()
            elif key == b"x-deepvis-token":
                return value.decode("latin-1").strip()
        qs = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        vals = qs.get("token")
        return vals[0] if vals else None

    def check(self, scope: Scope) -> str | None:
        """Why the request must be refused, or None when it may go on."""
        headers = {k: v.decode("latin-1") for k, v in scope.get("headers", ())}
        host = headers.get(b"host")
        if not self.host_ok(host):
            return "unknown Host header (open the URL that deepvis serve printed)"
        unsafe = scope["type"] == "websocket" or scope.get("method", "GET").upper() in _UNSAFE_METHODS
        if unsafe and not self.origin_ok(headers.get(b"origin"), host):
            return "cross-origin request refused"
        if not self.token_ok(self.supplied_token(scope)):
            return "missing or wrong token: open the URL that deepvis serve printed (it ends with ?token=...)"
        return None


class GuardMiddleware:
    """ASGI middleware applying a :class:`Guard` to every HTTP request and WebSocket handshake."""

    def __init__(self, app: ASGIApp, guard: Guard) -> None:
        self.app = app
        self.guard = guard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        reason = self.guard.check(scope)
        if scope["type"] == "websocket":
            if reason is not None:
                message = await receive()
                if message["type"] == "websocket.connect":
                    await send({"type": "websocket.close", "code": 1008, "reason": reason[:120]})
                return
            await self.app(scope, receive, send)
            return
        if reason is not None:
            body = (reason + "\n").encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": 403,
                    "headers": [
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        *self.guard.headers,
                    ],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                message = {**message, "headers": [*message.get("headers", []), *(h for h in self.guard.headers if h[0] not in present)]}
            await send(message)

        await self.app(scope, receive, send_with_headers)
