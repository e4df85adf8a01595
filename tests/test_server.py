"""The live toolbox server: security (token, Host, Origin, traversal, upload caps), robustness, the frame engine."""

from __future__ import annotations

import io
import json
import logging
import socket
import struct
import sys
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image
from starlette.websockets import WebSocketDisconnect

from deepvis.server import ServerConfig, create_app
from deepvis.server.engine import LiveEngine
from deepvis.server.frames import FrameProcessor, quantize
from deepvis.server.protocol import ProtocolError, ViewSettings, pack, unpack
from deepvis.server.security import Guard
from deepvis.server.session import RawFrame
from helpers import assert_unchanged, hooks_left, snapshot, wait_for
from test_server_utils import TOKEN, LiveServer, frame_message, is_frame, is_type, receive_until, tiny_model

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def make_app(model, **kw):
    return create_app(ServerConfig(model=model, token=TOKEN, allowed_hosts=("testserver",), **kw))


@pytest.fixture(scope="module")
def client(model):
    with TestClient(make_app(model, max_upload_bytes=64 * 1024, synthesis=False)) as c:
        yield c


def png_bytes(size=(40, 30), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def open_ws(client, **headers):
    return client.websocket_connect(f"/ws?token={TOKEN}", headers=dict(headers))


# -- the token ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method,path",
    [
        ("GET", "/"),
        ("GET", "/static/js/main.js"),
        ("GET", "/static/style.css"),
        ("GET", "/api/info"),
        ("GET", "/api/health"),
        ("GET", "/api/atlas/unit?layer=conv1&unit=0"),
        ("GET", "/api/atlas/image?layer=conv1&unit=0&kind=synth"),
        ("POST", "/api/upload?session=x"),
        ("GET", "/no/such/page"),
    ],
)
def test_every_endpoint_needs_the_token(client, method, path):
    r = client.request(method, path)
    assert r.status_code == 403 and "token" in r.text
    sep = "&" if "?" in path else "?"
    r = client.request(method, f"{path}{sep}token={'x' * 40}")
    assert r.status_code == 403
    r = client.request(method, path, headers={"authorization": "token wrong"})
    assert r.status_code == 403


def test_the_token_opens_the_page_and_its_files(client):
    r = client.get(f"/?token={TOKEN}")
    assert r.status_code == 200
    csp = r.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp
    assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer"
    # every script and stylesheet URL carries the token (the import map covers module imports)
    assert f"/static/js/main.js?token={TOKEN}" in r.text and f"/static/js/grid.js?token={TOKEN}" in r.text
    assert client.get(f"/static/js/main.js?token={TOKEN}").headers["content-type"].startswith("text/javascript")
    assert client.get("/api/health", headers={"authorization": f"token {TOKEN}"}).json()["ok"] is True
    assert client.get("/api/health", headers={"x-deepvis-token": TOKEN}).status_code == 200


def test_websocket_without_token_is_refused_before_accept(client):
    engine = client.app.state.toolbox.engine
    for url in ("/ws", "/ws?token=", f"/ws?token={TOKEN[:-1]}x"):
        with pytest.raises(WebSocketDisconnect) as err, client.websocket_connect(url):
            pass
        assert err.value.code == 1008
    assert engine.sessions() == []  # no session was ever opened


def test_websocket_from_a_foreign_origin_is_refused(client):
    for origin in ("http://evil.example", "http://testserver.evil.example", "null", "http://127.0.0.1:1"):
        with pytest.raises(WebSocketDisconnect) as err, open_ws(client, origin=origin):
            pass
        assert err.value.code == 1008, origin
    with open_ws(client, origin="http://testserver") as ws:  # the page's own origin
        hello = json.loads(ws.receive_text())
        assert hello["type"] == "hello"


def test_foreign_host_is_refused_dns_rebinding(client):
    r = client.get(f"/api/health?token={TOKEN}", headers={"host": "attacker.example"})
    assert r.status_code == 403 and "Host" in r.text
    r = client.get(f"/api/health?token={TOKEN}", headers={"host": "127.0.0.1:8000"})
    assert r.status_code == 200


def test_guard_hosts_and_origins():
    g = Guard(TOKEN, ["myhost"])
    assert g.host_ok("127.0.0.1:8000") and g.host_ok("localhost") and g.host_ok("[::1]:80") and g.host_ok("127.5.5.5:1")
    assert g.host_ok("myhost:9000")
    for bad in ("evil.com", "127.0.0.1.evil.com:80", "", "[::1", "user@127.0.0.1", "localhost:80:80"):
        assert not g.host_ok(bad), bad
    assert g.origin_ok(None, "127.0.0.1:8000")  # not a browser
    assert g.origin_ok("http://127.0.0.1:8000", "127.0.0.1:8000")
    assert not g.origin_ok("http://localhost:8000", "127.0.0.1:8000")  # another origin, same machine
    assert not g.origin_ok("http://evil.com", "evil.com")  # rebinding: the Host is not ours either
    assert not g.token_ok(None) and not g.token_ok(TOKEN + "x") and g.token_ok(TOKEN)
    with pytest.raises(ValueError):
        Guard("short")


def test_uploads_from_a_foreign_origin_are_refused(client):
    with open_ws(client) as ws:
        sid = json.loads(ws.receive_text())["session"]
        r = client.post(f"/api/upload?token={TOKEN}&session={sid}", content=png_bytes(), headers={"origin": "http://evil.example"})
        assert r.status_code == 403
        r = client.post(f"/api/upload?token={TOKEN}&session={sid}", content=png_bytes(), headers={"origin": "http://testserver"})
        assert r.status_code == 200


# -- paths ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "path",
    [
        "/static/../app.py",
        "/static/..%2fapp.py",
        "/static/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        "/static/..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/static//etc/passwd",
        "/static/js/../../app.py",
        "/static/index.html",
        "/static/%00",
        "/api/atlas/image?layer=..%2f..%2fetc&unit=0&kind=synth",
        "/api/atlas/image?layer=conv1&unit=0&kind=..%2f..%2fetc%2fpasswd",
        "/api/atlas/image?layer=%2fetc%2fpasswd&unit=0&kind=crop&rank=0",
        "/api/atlas/unit?layer=..%2f..&unit=0",
        "/api/atlas/layer?layer=..%2f..%2fetc",
    ],
)
def test_path_traversal_is_404(client, path):
    sep = "&" if "?" in path else "?"
    r = client.get(f"{path}{sep}token={TOKEN}")
    assert r.status_code == 404, (path, r.status_code, r.text[:200])
    assert "root:" not in r.text


@pytest.mark.parametrize(
    "query,message",
    [
        ("layer=conv1&unit=abc", "parameter unit 'abc': Input should be a valid integer"),
        ("layer=conv1", "parameter unit is missing"),
        ("unit=1", "parameter layer is missing"),
    ],
)
def test_a_bad_query_parameter_is_one_line_400(client, query, message):
    r = client.get(f"/api/atlas/unit?{query}&token={TOKEN}")
    assert r.status_code == 400 and list(r.json()) == ["error"], r.text
    assert r.json()["error"].startswith(message) and "\n" not in r.json()["error"]
    r = client.get(f"/api/atlas/image?layer=conv1&unit=0&kind=crop&rank=1e9&token={TOKEN}")
    assert r.status_code == 400 and r.json()["error"].startswith("parameter rank '1e9': ")


# -- uploads ------------------------------------------------------------------------------------------------
def test_oversized_upload_is_413(client):
    with open_ws(client) as ws:
        sid = json.loads(ws.receive_text())["session"]
        big = b"\x89PNG" + b"\0" * (64 * 1024 + 10)
        r = client.post(f"/api/upload?token={TOKEN}&session={sid}", content=big)
        assert r.status_code == 413 and "too large" in r.json()["error"]

        def chunks():  # no Content-Length: the cap applies while reading
            for _ in range(20):
                yield b"\0" * 8192

        r = client.post(f"/api/upload?token={TOKEN}&session={sid}", content=chunks())
        assert r.status_code == 413
        assert client.get(f"/api/health?token={TOKEN}").status_code == 200


def bomb_png(w: int, h: int) -> bytes:
    """A tiny PNG whose header claims w x h pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_corrupt_upload_gives_a_clear_message_and_the_server_keeps_answering(client):
    with open_ws(client) as ws:
        sid = json.loads(ws.receive_text())["session"]
        name = "<img src=x onerror=alert(1)>.png"
        r = client.post(f"/api/upload?token={TOKEN}&session={sid}&name={name}", content=b"this is not an image at all")
        assert r.status_code == 400
        msg = r.json()["error"]
        assert "not an image" in msg and name in msg  # plain text; the page shows it with textContent
        noisy = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(noisy, format="PNG")
        r = client.post(f"/api/upload?token={TOKEN}&session={sid}&name=t.png", content=noisy.getvalue()[: len(noisy.getvalue()) // 2])
        assert r.status_code == 400 and ("damaged" in r.json()["error"] or "truncated" in r.json()["error"])
        r = client.post(f"/api/upload?token={TOKEN}&session={sid}&name=bomb.png", content=bomb_png(7000, 7000))
        assert r.status_code == 400 and "megapixels" in r.json()["error"]  # 49 MP: over the 40 MP cap
        r = client.post(f"/api/upload?token={TOKEN}&session={sid}&name=bomb.png", content=bomb_png(30000, 30000))
        assert r.status_code == 400 and "decompression bomb" in r.json()["error"]
        # the same page still works
        r = client.post(f"/api/upload?token={TOKEN}&session={sid}&name=ok.png", content=png_bytes())
        assert r.status_code == 200 and r.json()["width"] == 40
        msg, _ = receive_until(ws, is_frame)
        assert msg[0]["source"] == "image" and len(msg[0]["predictions"]) == 5
    assert client.get(f"/api/health?token={TOKEN}").json()["ok"] is True


def test_upload_to_an_unknown_session_is_404(client):
    r = client.post(f"/api/upload?token={TOKEN}&session=nope", content=png_bytes())
    assert r.status_code == 404


# -- the WebSocket protocol ----------------------------------------------------------------------------------
def test_frames_settings_and_bad_messages(client, model):
    with open_ws(client) as ws:
        hello = json.loads(ws.receive_text())
        assert hello["model"]["input_size"] == [32, 32] and hello["class_names"][3] == "class 3"
        assert [entry["name"] for entry in hello["layers"]][:2] == ["conv1", "relu1"]
        ws.send_text(json.dumps({"type": "settings", "layer": "conv2", "unit": 5, "req": 1}))
        msg, _ = receive_until(ws, is_type("settings"))
        assert msg["settings"]["layer"] == "conv2" and msg["settings"]["unit"] == 5 and msg["req"] == 1
        ws.send_bytes(frame_message(1, 32, 32))
        (header, payload), _ = receive_until(ws, is_frame)
        blobs = {name: payload[off : off + n] for name, off, n in header["blobs"]}
        assert header["seq"] == 1 and header["grid"]["shape"] == [16, 16, 16] and len(blobs["grid"]) == 16 * 16 * 16
        assert header["unit_shape"] == [16, 16] and len(blobs["unit"]) == 256

        # bad input of every kind: a clear error each time, and the page keeps working
        bad = [
            ("text", "not json"),
            ("text", json.dumps([1, 2])),
            ("text", json.dumps({"type": "nope"})),
            ("text", json.dumps({"type": "settings", "layer": "no.such.layer", "req": 2})),
            ("text", json.dumps({"type": "settings", "unit": 999, "req": 3})),
            ("text", json.dumps({"type": "settings", "gain": "loud", "req": 4})),
            ("text", json.dumps({"type": "settings", "colour": 1, "req": 5})),
            ("text", json.dumps({"type": "sample", "name": "../../etc/passwd"})),
            ("bytes", b"\x01\x02"),
            ("bytes", struct.pack("<I", 10**6) + b"{}"),
            ("bytes", pack({"type": "frame", "seq": 2, "w": 32, "h": 32, "format": "rgba"}, {"px": b"\0" * 100})),
            ("bytes", pack({"type": "frame", "seq": 3, "w": 10**5, "h": 10**5, "format": "rgba"}, {"px": b""})),
            ("bytes", pack({"type": "frame", "seq": 4, "w": 32, "h": 32, "format": "yuv"}, {"px": b"\0" * 4096})),
        ]
        for kind, data in bad:
            (ws.send_text if kind == "text" else ws.send_bytes)(data)
            msg, _ = receive_until(ws, is_type("error"))
            assert msg["message"] and "\n" not in msg["message"], msg
        settings = client.app.state.toolbox.engine.sessions()[0].settings
        assert (settings.layer, settings.unit, settings.gain) == ("conv2", 5, 1.0)  # unchanged by the bad ones
        ws.send_bytes(frame_message(9, 32, 32))
        (header, _), _ = receive_until(ws, lambda m: is_frame(m) and m[0]["seq"] == 9)
        assert header["layer"] == "conv2"


def test_hello_carries_the_librarys_lists_and_the_page_has_none_of_its_own(client):
    from deepvis.backprop import FILTERS, MODES
    from deepvis.server.static_files import StaticFiles

    with open_ws(client) as ws:
        hello = json.loads(ws.receive_text())
    assert hello["backprop"]["modes"] == ["off", *MODES] and hello["backprop"]["filters"] == list(FILTERS)
    assert hello["normalizations"] == ["layer", "channel", "none"]
    # the page builds its mode, filter and normalization controls from hello: no copy of the lists in it
    files = StaticFiles()
    page = files.index(TOKEN, "testserver")[0] + "".join(a.body.decode() for n, a in files.assets.items() if n.endswith(".js"))
    for words in (["'gradient'", "'deconv'", "'guided'"], ["'channel'", "'none'"], ["<option>gradient"], ["<option>channel"]):
        assert not all(w in page for w in words), words
    # nor of which layers it lists by default: hello marks them (LayerInfo.listed, the server's own rule)
    assert all(isinstance(e["listed"], bool) for e in hello["layers"]) and "Identity" not in page


def test_a_server_without_backprop_says_why(model):
    app = make_app(model, synthesis=False, backprop=False)
    with TestClient(app) as c, open_ws(c) as ws:
        hello = json.loads(ws.receive_text())
        assert hello["backprop"]["available"] is False and hello["backprop"]["filters"] == ["raw"]
        ws.send_text(json.dumps({"type": "settings", "backprop": "gradient", "req": 1}))
        msg, _ = receive_until(ws, is_type("error"))
        assert msg["message"] == "the backprop view is off on this server (deepvis serve --no-backprop)"


def test_pages_open_on_a_readable_backprop_view_and_the_raw_one_is_offered(client, model):
    from deepvis.backprop import RAW, READABLE

    with open_ws(client) as ws:
        hello = json.loads(ws.receive_text())
    assert hello["backprop"]["readable"] == {"filter": "norm", "percentile": 99.0} == READABLE.to_dict()
    assert hello["backprop"]["raw"] == {"filter": "raw", "percentile": 100.0} == RAW.to_dict()
    assert (hello["default_settings"]["filter"], hello["default_settings"]["percentile"]) == ("norm", 99.0)
    # a server without the view keeps the raw filter (the only one it offers) and accepts settings
    engine = LiveEngine(model)
    assert (engine.default_settings.filter, engine.default_settings.percentile) == ("raw", 100.0)
    base = ViewSettings(layer="conv2", filter="norm", percentile=99.0)
    assert ViewSettings.parse({"unit": 1}, base, ("raw",)).filter == "raw"
    assert ViewSettings.parse({"percentile": 99.5}, base, ("raw", "norm")).percentile == 99.5
    for bad in (49.0, 100.5, "99", None, True):
        with pytest.raises(ProtocolError):
            ViewSettings.parse({"percentile": bad}, base, ("raw", "norm"))


def test_the_unit_view_scales_by_the_settings_percentile(model):
    from deepvis.backprop import backprop_image, backprop_view
    from deepvis.capture import Unit
    from deepvis.server.unitviews import unit_view

    x = torch.randn(1, *model.preprocessing.input_shape, generator=torch.Generator().manual_seed(0))
    views = {}
    for pct in (100.0, 90.0):
        _, blobs = unit_view(model, x, ViewSettings(layer="conv2", unit=1, backprop="guided", filter="norm", percentile=pct))
        want = backprop_image(backprop_view(model, x, Unit("conv2", 1), "guided"), "norm", percentile=pct)
        assert blobs["rgb"] == want.tobytes()
        views[pct] = np.frombuffer(blobs["rgb"], np.uint8)
    assert views[90.0].mean() > views[100.0].mean()  # the strongest values saturate: brighter


def test_the_frame_processor_checks_a_unit_once_and_still_refuses_bad_ones(model):
    from deepvis.errors import UnitError

    proc = FrameProcessor(model)
    s = ViewSettings(layer="conv2", unit=1)
    assert proc.check(s) is proc.check(s)
    with pytest.raises(UnitError):
        proc.check(ViewSettings(layer="conv2", unit=10_000))
    assert proc.check(s).name == "conv2"


def test_a_bug_in_the_frame_pipeline_is_logged_and_shown_not_swallowed(model, caplog):
    app = make_app(model, synthesis=False, backprop=False)
    engine = app.state.toolbox.engine

    def broken(*args, **kwargs):
        raise ValueError("a bug in the frame pipeline")

    with TestClient(app) as c, open_ws(c) as ws:
        json.loads(ws.receive_text())
        engine.processor.process = broken  # the engine's own processor: only this app is affected
        with caplog.at_level(logging.ERROR, logger="deepvis.server"):
            ws.send_bytes(frame_message(7, 32, 32))
            msg, _ = receive_until(ws, is_type("error"))
        assert msg["scope"] == "frame" and msg["seq"] == 7
        assert msg["message"] == "internal error in the frame loop: ValueError: a bug in the frame pipeline"
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is not None and "a bug in the frame pipeline" in str(errors[0].exc_info[1])
        # the loop goes on: once the bug is gone, frames are served again
        del engine.processor.process
        ws.send_bytes(frame_message(8, 32, 32))
        (header, _), _ = receive_until(ws, is_frame)
        assert header["seq"] == 8


def test_a_bug_in_the_sender_is_logged_and_shown_and_the_page_reconnects(model, caplog):
    app = make_app(model, synthesis=False, backprop=False)
    engine = app.state.toolbox.engine
    take = engine.take
    calls = {"n": 0}

    def take_once_broken(session):
        calls["n"] += 1
        if calls["n"] == 2:  # the first call sends hello; the second one fails
            raise RuntimeError("a bug while sending")
        return take(session)

    with TestClient(app) as c:
        with caplog.at_level(logging.DEBUG, logger="deepvis.server"), open_ws(c) as ws:  # a page that comes and goes: no error
            json.loads(ws.receive_text())
        assert wait_for(lambda: engine.sessions() == [], 10)
        assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []
        engine.take = take_once_broken
        with caplog.at_level(logging.ERROR, logger="deepvis.server"), open_ws(c) as ws:
            json.loads(ws.receive_text())
            ws.send_text(json.dumps({"type": "ping", "t": 1}))
            msg = json.loads(ws.receive_text())
            assert msg["type"] == "error" and msg["scope"] == "connection"
            assert msg["message"] == "internal error while sending: RuntimeError: a bug while sending"
            with pytest.raises(WebSocketDisconnect) as closed:
                ws.receive_text()
            assert closed.value.code == 1011  # the page's connection reconnects to a fresh session
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and errors[0].exc_info is not None


def test_only_a_closed_socket_counts_as_the_page_gone():
    from types import SimpleNamespace

    from starlette.websockets import WebSocketState

    from deepvis.server.app import _gone

    closed = SimpleNamespace(application_state=WebSocketState.DISCONNECTED)
    open_ = SimpleNamespace(application_state=WebSocketState.CONNECTED)
    assert _gone(open_, WebSocketDisconnect(1006))  # a stand-in: only its state is read
    assert _gone(closed, RuntimeError('Cannot call "send" once a close message has been sent.'))
    assert not _gone(open_, RuntimeError("a bug"))
    assert not _gone(closed, ValueError("a bug"))


def test_sample_photo_and_diff_view(client):
    with open_ws(client) as ws:
        json.loads(ws.receive_text())
        ws.send_text(json.dumps({"type": "settings", "layer": "conv1", "diff": True}))
        ws.send_text(json.dumps({"type": "sample", "name": "coffee"}))
        (inp, payload), _ = receive_until(ws, is_type("input"))
        assert inp["name"] == "coffee" and Image.open(io.BytesIO(bytes(payload))).size == (32, 32)
        (header, payload), _ = receive_until(ws, is_frame)
        grid = np.frombuffer(payload[header["blobs"][0][1] :][: header["blobs"][0][2]], np.uint8)
        # the first frame of the diff view equals its running mean: every tile is mid-gray
        assert header["grid"]["diff"] is True and set(np.unique(grid)) == {128}


def test_connections_send_small_messages_at_once_and_uncompressed(model):
    """The listening socket says TCP, so asyncio turns Nagle's algorithm off on each connection (a small
    message after a large one is not held for the browser's delayed acknowledgement); a proto-0 socket,
    what deepvis made before, does not get it. The WebSocket refuses per-message compression."""
    import asyncio

    from deepvis.server.listen import listen

    async def accepted_nodelay(sock: socket.socket) -> int:
        got: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            got.set_result(writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=sock)
        _, w = await asyncio.open_connection(*sock.getsockname()[:2])
        try:
            return await asyncio.wait_for(got, 10)
        finally:
            w.close()
            server.close()

    assert asyncio.run(accepted_nodelay(listen("127.0.0.1", 0))) == 1
    plain = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    plain.bind(("127.0.0.1", 0))
    plain.listen(8)
    assert asyncio.run(accepted_nodelay(plain)) == 0
    with LiveServer(make_app(model, synthesis=False, backprop=False), TOKEN) as srv:
        from websockets.sync.client import connect

        with connect(f"ws://127.0.0.1:{srv.port}/ws?token={TOKEN}", compression="deflate") as ws:
            assert json.loads(ws.recv(timeout=30))["type"] == "hello"
            assert ws.response is not None and ws.response.headers.get("Sec-WebSocket-Extensions") is None


def test_the_access_log_hides_the_launch_token(model):
    import logging

    from deepvis.server.listen import HideToken, uvicorn_server

    server = uvicorn_server(make_app(model, synthesis=False, backprop=False), log_level="info")
    assert server.config.log_config["handlers"]["access"]["filters"] == ["hide_token"]
    record = logging.LogRecord(
        "uvicorn.access",
        logging.INFO,
        __file__,
        1,
        '%s - "%s %s HTTP/%s" %d',
        ("127.0.0.1:5", "GET", f"/api/info?a=1&token={TOKEN}&b=2", "1.1", 200),
        None,
    )
    assert HideToken().filter(record)
    assert record.getMessage() == '127.0.0.1:5 - "GET /api/info?a=1&token=…&b=2 HTTP/1.1" 200'
    assert TOKEN not in record.getMessage()


def test_a_client_that_never_reads_does_not_slow_another(model):
    """Client A sends frames and never reads; client B keeps getting results. A costs only what its socket took."""
    big = tiny_model(128)  # results of its default layer are 8x128x128: a few fill a socket's buffers
    app = make_app(big, synthesis=False, backprop=False)
    engine = app.state.toolbox.engine
    with LiveServer(app, TOKEN) as srv:
        from websockets.sync.client import connect

        stuck = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        stuck.connect(("127.0.0.1", srv.port))
        key = "dGhlIHNhbXBsZSBub25jZQ=="
        stuck.sendall(
            (
                f"GET /ws?token={TOKEN} HTTP/1.1\r\nHost: 127.0.0.1:{srv.port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

        def ws_frame(payload: bytes) -> bytes:  # a masked binary WebSocket frame (client to server)
            mask = b"\x01\x02\x03\x04"
            n = len(payload)
            head = b"\x82" + (
                bytes([0x80 | n])
                if n < 126
                else (bytes([0x80 | 126]) + struct.pack(">H", n) if n < 65536 else bytes([0x80 | 127]) + struct.pack(">Q", n))
            )
            body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
            return head + mask + body

        frame = frame_message(1, 128, 128)
        stop = threading.Event()

        def flood() -> None:
            seq = 0
            while not stop.is_set():
                seq += 1
                try:
                    stuck.sendall(ws_frame(frame_message(seq, 128, 128)))
                except OSError:
                    return
                time.sleep(0.005)

        flooder = threading.Thread(target=flood, daemon=True)
        flooder.start()
        try:
            with connect(f"ws://127.0.0.1:{srv.port}/ws?token={TOKEN}", max_size=2**24) as b:
                b_id = json.loads(b.recv(timeout=30))["session"]

                def round_trips(n: int) -> int:
                    got = 0
                    for _ in range(n):
                        b.send(frame)
                        while True:
                            m = b.recv(timeout=30)
                            if isinstance(m, bytes) and unpack(m)[0]["type"] == "frame":
                                got += 1
                                break
                    return got

                assert round_trips(10) == 10
                assert wait_for(lambda: len(engine.sessions()) == 2, 10)
                stuck_session = next(s for s in engine.sessions() if s.id != b_id)
                assert wait_for(lambda: stuck_session.stats.received > 10, 30)
                # wait until the stuck page's socket buffers are full: then it gets no more results
                assert _settles(lambda: stuck_session.stats.processed, 0.5, 60)
                done_before = stuck_session.stats.processed
                received_before = stuck_session.stats.received
                # B is served throughout (every round trip answered), for as long as A sends 20 more frames
                served, deadline = 0, time.monotonic() + 120
                while served < 40 or stuck_session.stats.received <= received_before + 20:  # A kept sending...
                    served += round_trips(1)
                    assert time.monotonic() < deadline, "the stuck client stopped sending"
                assert stuck_session.stats.processed <= done_before + 1  # ...and got no compute at all
                # A holds at most one unsent result and one waiting frame: nothing queues up
                assert len(stuck_session.latest) <= 1 and len(stuck_session.events) <= stuck_session.max_events
                assert stuck_session.stats.dropped >= stuck_session.stats.received - stuck_session.stats.processed - 1
        finally:
            stop.set()
            flooder.join(5)
            stuck.close()
        assert wait_for(lambda: engine.sessions() == [], 20)  # both gone once their sockets close
        assert hooks_left(big.module) == []


def _settles(value, quiet: float, timeout: float) -> bool:
    """Wait until ``value()`` has not changed for ``quiet`` seconds."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.05)
        v = value()
        if v != last:
            last, since = v, time.monotonic()
        elif time.monotonic() - since >= quiet:
            return True
    return False


# -- the engine -------------------------------------------------------------------------------------------------
class _Loop:
    """Stands in for the event loop: records wake-ups."""

    def __init__(self) -> None:
        self.calls = 0

    def call_soon_threadsafe(self, fn, *args):
        self.calls += 1


def _raw(model, seq, seed=0):
    px = np.random.default_rng(seed).integers(0, 255, (32, 32, 4), dtype=np.uint8).tobytes()
    return RawFrame(seq, 32, 32, "rgba", memoryview(px), "camera")


def test_engine_processes_the_newest_frame_and_counts_the_dropped(model):
    engine = LiveEngine(model)
    s = engine.open_session(_Loop())  # type: ignore[arg-type]
    for seq in range(1, 6):  # five frames arrive before the loop runs: only the newest is kept
        engine.submit_frame(s, _raw(model, seq, seed=seq))
    assert s.stats.received == 5 and s.stats.dropped == 4
    engine.start()
    try:
        assert wait_for(lambda: "frame" in s.latest, 30)
        header, _ = unpack(engine.take(s)[0])
        assert header["seq"] == 5 and s.stats.processed == 1
        # a page that does not take its result gets no more compute: the next frames wait in its one slot
        engine.submit_frame(s, _raw(model, 6))
        assert wait_for(lambda: "frame" in s.latest, 30)
        engine.submit_frame(s, _raw(model, 7))
        engine.submit_frame(s, _raw(model, 8))
        time.sleep(0.3)  # give the loop every chance to (wrongly) process them
        assert s.stats.processed == 2 and s.pending is not None and s.pending.seq == 8
        assert unpack(engine.take(s)[0])[0]["seq"] == 6
        assert wait_for(lambda: "frame" in s.latest, 30)
        assert unpack(engine.take(s)[0])[0]["seq"] == 8 and s.stats.dropped == 5
    finally:
        engine.close()


def test_a_unit_switch_is_redrawn_from_the_last_forward_pass_before_the_next_frame(model, monkeypatch):
    import deepvis.server.frames as frames

    passes = []
    real = frames.capture
    monkeypatch.setattr(frames, "capture", lambda *a, **kw: passes.append(1) or real(*a, **kw))
    engine = LiveEngine(model, tune_memory_format=False)
    s = engine.open_session(_Loop())  # type: ignore[arg-type]
    engine.update_settings(s, {"layer": "conv2", "unit": 0}, ("raw",))
    engine.start()
    try:
        engine.submit_frame(s, _raw(model, 1))
        assert wait_for(lambda: "frame" in s.latest, 30)
        first = [h for h, _ in map(unpack, filter(lambda m: isinstance(m, bytes), engine.take(s))) if h["type"] == "frame"][-1]
        assert first["unit"] == 0 and len(passes) == 1
        # a new frame waits while the unit changes: the unit is redrawn first, from frame 1's pass (by the
        # frame loop or the redraw worker, whichever is first); every frame message posted is recorded
        posted: list[tuple[dict, bytes, int]] = []
        put = s.put_latest

        def record(kind, msg):
            if kind == "frame":
                header, payload = unpack(msg)
                posted.append((header, bytes(payload), len(passes)))
            put(kind, msg)

        s.put_latest = record  # type: ignore[method-assign]
        with engine._cond:  # hold the loop so both arrive before it picks
            engine.submit_frame(s, _raw(model, 2, seed=1))
            engine.update_settings(s, {"unit": 3}, ("raw",))
        # (the page's sender takes each result: the loop computes the next one only then)
        assert wait_for(lambda: engine.take(s) is not None and any(h["seq"] == 2 for h, _, _ in posted), 30)
        header, payload, n_passes = posted[0]
        assert (header["seq"], header["unit"], n_passes) == (1, 3, 1)
        want = FrameProcessor(model).process(
            engine.processor.to_input(frames.frame_image(_raw(model, 1).pixels, 32, 32, "rgba", model)), ViewSettings(layer="conv2", unit=3)
        )
        assert payload == b"".join(want.blobs.values()) and header["unit_stats"] == want.header["unit_stats"]
        header, _, n_passes = posted[-1]
        assert (header["seq"], header["unit"]) == (2, 3) and n_passes >= 2  # then the new frame: one more pass
        assert [h["unit"] for h, _, _ in posted] == [3] * len(posted)  # never the old unit again
    finally:
        engine.close()


def test_heavy_unit_views_never_block_the_frame_loop(model):
    """A deliberately slow backprop view runs in the background; frames keep flowing meanwhile."""
    release = threading.Event()
    started = threading.Event()

    def slow_view(m, x, settings):
        started.set()
        release.wait(30)
        return {"h": 1, "w": 1}, {"rgb": b"\0\0\0"}

    engine = LiveEngine(model, unit_view=slow_view)
    s = engine.open_session(_Loop())  # type: ignore[arg-type]
    engine.update_settings(s, {"layer": "conv2", "backprop": "gradient"}, ("raw",))
    engine.start()
    try:
        engine.submit_frame(s, _raw(model, 1))
        assert started.wait(30)  # the slow view is running now
        seqs: list[int] = []

        def take_frames() -> list[int]:
            seqs.extend(unpack(m)[0]["seq"] for m in engine.take(s) if isinstance(m, bytes) and unpack(m)[0]["type"] == "frame")
            return seqs

        for seq in range(2, 12):
            engine.submit_frame(s, _raw(model, seq))
            assert wait_for(lambda: "frame" in s.latest, 30)
            take_frames()
        # on a loaded machine a frame's result may come after the take that followed it: take until the last one
        assert wait_for(lambda: 11 in take_frames(), 30), seqs
        assert seqs[-1] == 11 and len(seqs) >= 9  # ten frames went through while the view was stuck
        release.set()
        assert wait_for(lambda: "backprop" in s.latest, 30)
        header, payload = unpack(s.latest["backprop"])
        assert header["type"] == "backprop" and header["mode"] == "gradient" and header["layer"] == "conv2"
    finally:
        release.set()
        engine.close()


def test_a_page_closing_mid_frame_is_forgotten_and_others_go_on(model):
    engine = LiveEngine(model)
    a = engine.open_session(_Loop())  # type: ignore[arg-type]
    b = engine.open_session(_Loop())  # type: ignore[arg-type]
    engine.start()
    try:
        engine.submit_frame(a, _raw(model, 1))
        engine.close_session(a)  # possibly while its frame is being computed
        engine.submit_frame(b, _raw(model, 1))
        assert wait_for(lambda: "frame" in b.latest, 30)
        assert a.latest == {} and a.pending is None and engine.sessions() == [b]
    finally:
        engine.close()


def test_too_many_pages_are_refused(model):
    app = make_app(model, max_sessions=1, synthesis=False)
    with TestClient(app) as c, open_ws(c) as first:
        json.loads(first.receive_text())
        with pytest.raises(WebSocketDisconnect) as err, open_ws(c):
            pass
        assert err.value.code == 1013


def test_frame_processor_matches_the_library(model):
    from deepvis.capture import capture
    from deepvis.render import normalize_activations

    proc = FrameProcessor(model)
    x = torch_input(model)
    out = proc.process(x, ViewSettings(layer="conv2", unit=3, gain=2.0, gamma=0.5))
    acts = capture(model, x, ["conv2"])["conv2"][0]
    want = quantize(np.clip(normalize_activations(acts, "layer") * 2.0, 0, 1) ** 0.5)
    assert np.array_equal(np.frombuffer(out.blobs["grid"], np.uint8).reshape(16, 16, 16), want)
    unit = quantize(normalize_activations(acts[3:4], "channel")[0])
    assert np.array_equal(np.frombuffer(out.blobs["unit"], np.uint8).reshape(16, 16), unit)
    assert out.header["unit_stats"]["max"] == pytest.approx(float(acts[3].max()), abs=1e-5)
    # the class layer labels its units; vectors have no unit map
    out = proc.process(x, ViewSettings(layer="fc", unit=7))
    assert out.header["unit_label"] == "class 7" and "unit" not in out.blobs and len(out.blobs["grid"]) == 10
    assert [p["index"] for p in out.header["predictions"]] == capture(model, x, ["fc"])["fc"][0].topk(5).indices.tolist()


def torch_input(model):
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    return FrameProcessor(model).to_input(im)


def test_large_layers_are_pooled_for_the_page():
    from deepvis.server.frames import grid_factor

    assert grid_factor((32, 112, 112)) == 1  # 401k values: sent as they are
    assert grid_factor((96, 112, 112)) == 2  # 1.2M values: pooled 2x2 to 301k
    assert grid_factor((16, 2000, 2000)) == 12
    assert grid_factor((1280,)) == 1


def test_serving_leaves_the_model_unchanged(model):
    before = snapshot(model.module)
    app = make_app(model, synthesis=False)
    with TestClient(app) as c, open_ws(c) as ws:
        json.loads(ws.receive_text())
        ws.send_text(json.dumps({"type": "settings", "layer": "conv2", "backprop": "guided"}))
        ws.send_bytes(frame_message(1, 32, 32))
        receive_until(ws, is_type("backprop"))
    assert_unchanged(model.module, before)


def test_backprop_view_and_receptive_fields_reach_the_page(model):
    app = make_app(model, synthesis=False)
    with TestClient(app) as c, open_ws(c) as ws:
        hello = json.loads(ws.receive_text())
        assert hello["backprop"]["available"] and "raw" in hello["backprop"]["filters"]
        ws.send_text(json.dumps({"type": "settings", "layer": "conv2", "unit": 2, "backprop": "deconv", "filter": "norm"}))
        ws.send_bytes(frame_message(1, 32, 32))
        got: dict = {}
        while len(got) < 2:
            msg, _ = receive_until(ws, lambda m: is_type("backprop")(m) or is_type("rf")(m))
            got["rf" if isinstance(msg, dict) else "backprop"] = msg
        header, payload = got["backprop"]
        assert (header["mode"], header["filter"], header["unit"], header["h"], header["w"]) == ("deconv", "norm", 2, 32, 32)
        assert len(payload) == 32 * 32 * 3 and max(payload) > 0
        rf = got["rf"]
        # conv1 (3x3) then conv2 (3x3, stride 2): a 5x5 field every 2 pixels, clipped at the border
        assert rf["layer"] == "conv2" and rf["output_size"] == [16, 16] and rf["size"] == [5, 5]
        assert rf["rows"]["lo"][5] == 2 * 5 - 2 and rf["rows"]["hi"][5] == 2 * 5 + 2 and rf["cols"]["lo"][0] == 0


def test_synthesis_on_demand_reports_progress_and_serves_the_image(model):
    app = create_app(ServerConfig(model=model, token=TOKEN, allowed_hosts=("testserver",), synthesis_steps=8, synthesis_size=32))
    with TestClient(app) as c, open_ws(c) as ws:
        hello = json.loads(ws.receive_text())
        assert hello["synthesis"]["available"]
        assert c.get(f"/api/atlas/image?token={TOKEN}&layer=conv2&unit=4&kind=synth").status_code == 404
        ws.send_text(json.dumps({"type": "synthesize", "layer": "conv2", "unit": 4}))
        msg, seen = receive_until(ws, lambda m: isinstance(m, dict) and m.get("type") == "synthesis" and m["state"] in ("done", "error"))
        assert msg["state"] == "done", msg
        states = [m["state"] for m in seen if isinstance(m, dict) and m.get("type") == "synthesis"]
        assert states[0] == "queued" and "running" in states
        r = c.get(f"/api/atlas/image?token={TOKEN}&layer=conv2&unit=4&kind=synth")
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (32, 32)
        rec = c.get(f"/api/atlas/unit?token={TOKEN}&layer=conv2&unit=4").json()
        assert rec["synth"]["source"] == "live" and rec["in_atlas"] is False
        assert c.get(f"/api/atlas/layer?token={TOKEN}&layer=conv2").json()["synth"] == [4]
        ws.send_text(json.dumps({"type": "synthesize", "layer": "conv2", "unit": 99}))
        msg, _ = receive_until(ws, is_type("error"))
        assert "out of range" in msg["message"]


def test_cli_serve_prints_a_url_with_a_token_and_serves(tmp_path):
    import subprocess
    import sys

    import httpx

    factory = tmp_path / "tinynet.py"
    factory.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        "from test_server_utils import tiny_model\n"
        "def build():\n    return tiny_model().module\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "deepvis", "serve", "--port", "0", "--model", f"{factory}:build", "--input-size", "32"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert line.startswith("deepvis serve: open http://127.0.0.1:") and "?token=" in line, (
            line,
            proc.stderr.read() if proc.poll() is not None else "",
        )
        url = line.split("open ", 1)[1].strip()
        token = url.split("token=", 1)[1]
        assert len(token) >= 40
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            try:
                status = httpx.get(url, timeout=5).status_code
                break
            except httpx.TransportError:
                time.sleep(0.05)
        assert status == 200
        assert httpx.get(url.split("?")[0], timeout=5).status_code == 403
    finally:
        proc.terminate()
        proc.wait(30)


# -- videos the browser cannot play -------------------------------------------------------------------------
def _clip(path, frames=6, size=(96, 64)):
    from deepvis.io import VideoWriter

    rng = np.random.default_rng(0)
    with VideoWriter(path, fps=12) as w:
        for _ in range(frames):
            w.write(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    return path.read_bytes()


def test_server_decodes_a_video_in_a_child_process_and_plays_it_by_frame(client, tmp_path):
    data = _clip(tmp_path / "clip.avi")
    with open_ws(client) as ws:
        sid = json.loads(ws.receive_text())["session"]
        r = client.post(f"/api/video?token={TOKEN}&session={sid}&name=clip.avi", content=data)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["frames"] == 6 and body["fps"] == pytest.approx(12) and body["warning"] is None
        ws.send_text(json.dumps({"type": "video_frame", "index": 3, "seq": 41}))
        (inp, payload), _ = receive_until(ws, is_type("input"))
        assert inp["index"] == 3 and inp["source"] == "video" and Image.open(io.BytesIO(bytes(payload))).size == (32, 32)
        (header, _), _ = receive_until(ws, is_frame)
        assert header["seq"] == 41 and header["source"] == "video"
        ws.send_text(json.dumps({"type": "video_frame", "index": 6, "seq": 42}))
        msg, _ = receive_until(ws, is_type("error"))
        assert "0-5" in msg["message"]
        ws.send_text(json.dumps({"type": "video_frame", "index": "3", "seq": 43}))
        msg, _ = receive_until(ws, is_type("error"))
        assert msg["message"] == "video frame index and seq must be integers, got '3' and 43"


def test_a_malformed_video_gives_a_clear_message_and_cannot_take_the_server_down(client, tmp_path, monkeypatch):
    import deepvis.server.video as video

    with open_ws(client) as ws:
        sid = json.loads(ws.receive_text())["session"]
        url = f"/api/video?token={TOKEN}&session={sid}&name=broken.mp4"
        r = client.post(url, content=b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 500)
        assert r.status_code == 400
        msg = r.json()["error"]
        assert "broken.mp4" in msg and "\n" not in msg and "upload.bin" not in msg  # the user's name, not ours
        # a decoder that crashes (here: kills itself) is only the child process
        crash = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]
        monkeypatch.setattr(video, "child_command", lambda *a, **k: crash)
        r = client.post(url, content=_clip(tmp_path / "ok.avi"))
        assert r.status_code == 400 and "crashed" in r.json()["error"] and "SIGSEGV" in r.json()["error"]
        assert client.post(f"/api/video?token={TOKEN}&session={sid}&name=e.mp4", content=b"").status_code == 400
    assert client.get(f"/api/health?token={TOKEN}").json()["ok"] is True


# -- the atlas ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_atlas(tmp_path_factory, model):
    """An atlas of the tiny model: conv2, units 0-1 with crops, deconv views and synthesized images."""
    import shutil

    from deepvis.atlas import AtlasOptions, SynthesisOptions, build_atlas
    from deepvis.io import sample_path

    root = tmp_path_factory.mktemp("tiny-atlas")
    (root / "photos").mkdir()
    for name in ("coffee", "chelsea", "rocket", "astronaut"):
        shutil.copy(sample_path(name), root / "photos" / f"{name}{sample_path(name).suffix}")
    opts = AtlasOptions(
        layers=("conv2",), top=3, batch_size=4, units="0-1", synthesis=SynthesisOptions(steps=4, size=32, units_per_batch=2)
    )
    build_atlas(root / "atlas", model, str(root / "photos"), opts, progress=False)
    return root / "atlas"


def test_atlas_records_and_images_are_served_by_unit(model, tiny_atlas):
    app = make_app(model, atlas=tiny_atlas, synthesis=False, backprop=False)
    with TestClient(app) as c:
        info = c.get(f"/api/info?token={TOKEN}").json()["atlas"]
        assert info["available"] and info["layers"] == ["conv2"]
        rec = c.get(f"/api/atlas/unit?token={TOKEN}&layer=conv2&unit=1").json()
        assert rec["in_atlas"] and rec["synth"]["source"] == "atlas" and len(rec["top"]) == 3
        assert all(t["crop"] and t["view"] for t in rec["top"]) and rec["top"][0]["value"] >= rec["top"][2]["value"]
        for kind in ("synth", "synth_raw", "crop", "view"):
            r = c.get(f"/api/atlas/image?token={TOKEN}&layer=conv2&unit=1&kind={kind}&rank=2")
            assert r.status_code == 200 and r.headers["content-type"] == "image/png", kind
            Image.open(io.BytesIO(r.content)).verify()
        assert c.get(f"/api/atlas/image?token={TOKEN}&layer=conv2&unit=1&kind=crop&rank=3").status_code == 404
        assert c.get(f"/api/atlas/image?token={TOKEN}&layer=conv2&unit=5&kind=synth").status_code == 404  # not synthesized
        assert c.get(f"/api/atlas/unit?token={TOKEN}&layer=conv1&unit=0").json()["in_atlas"] is False
        assert c.get(f"/api/atlas/layer?token={TOKEN}&layer=conv2").json()["synth"] == [0, 1]


def test_an_atlas_of_other_weights_or_another_input_size_is_refused(model, tiny_atlas, tmp_path):
    from deepvis.errors import ModelError

    other = tiny_model()
    with torch.no_grad():
        other.module.conv1.bias.add_(1.0)  # other weights, same layers
    with pytest.raises(ModelError) as err:
        make_app(other, atlas=tiny_atlas)
    assert str(err.value) == (
        f"atlas {tiny_atlas.resolve()} was made with other weights (model 'tiny'): serve the model it was made with "
        "(same weights and --input-size), build an atlas of this model, or drop --atlas"
    )
    with pytest.raises(ModelError, match=r"was made at input size \[32, 32\], not \[48, 48\]"):
        make_app(tiny_model(48), atlas=tiny_atlas)


def test_cli_serve_refuses_an_atlas_of_another_model_with_status_2(tiny_atlas, tmp_path):
    import subprocess

    factory = tmp_path / "tinynet.py"
    factory.write_text(
        "import sys\n"
        f"sys.path.insert(0, {str(__import__('pathlib').Path(__file__).parent)!r})\n"
        "from test_server_utils import tiny_model\n"
        "def build():\n    return tiny_model().module\n"
    )
    command = ["serve", "--port", "0", "--model", f"{factory}:build", "--input-size", "40", "--atlas", str(tiny_atlas)]
    proc = subprocess.run([sys.executable, "-m", "deepvis", *command], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"deepvis: error: atlas {tiny_atlas.resolve()} was made at input size [32, 32], not [40, 40]: "), last


def test_atlas_paths_outside_the_atlas_are_never_served(model, tiny_atlas, tmp_path):
    import shutil
    import sqlite3

    from deepvis.errors import DeepvisError

    atlas = tmp_path / "atlas"
    shutil.copytree(tiny_atlas, atlas)
    secret = tmp_path / "secret.png"
    secret.write_bytes(png_bytes())
    with sqlite3.connect(atlas / "index.sqlite") as db:  # a tampered index pointing out of the folder
        db.execute("UPDATE synth SET image=? WHERE unit=1", ("../secret.png",))
        db.execute("UPDATE synth SET image=? WHERE unit=0", (str(secret),))
    app = make_app(model, atlas=atlas, synthesis=False, backprop=False)
    with TestClient(app) as c:
        for unit in (0, 1):
            assert c.get(f"/api/atlas/image?token={TOKEN}&layer=conv2&unit={unit}&kind=synth").status_code == 404
    (atlas / "index.sqlite").write_bytes(b"not a database")
    with pytest.raises(DeepvisError):
        make_app(model, atlas=atlas)


# -- the summary pane ------------------------------------------------------------------------------------------
def _summary(engine, s, **kw) -> dict:
    engine.send_summary(s, **kw)
    msgs = [json.loads(m) for m in engine.take(s) if isinstance(m, str)]
    return next(m for m in msgs if m["type"] == "summary")


def _show_frames(engine, s, seqs, seed) -> None:
    for seq in seqs:
        engine.submit_frame(s, _raw(None, seq, seed=seed))
        assert wait_for(lambda: "frame" in s.latest, 30)
        engine.take(s)


def test_the_live_summary_of_a_still_scene_is_its_activation_statistics(model):
    """After N frames of the same image, the running statistics are that image's: known answers."""
    from deepvis.capture import capture
    from deepvis.server.frames import frame_image

    engine = LiveEngine(model)
    s = engine.open_session(_Loop())  # type: ignore[arg-type]
    engine.start()
    try:
        layer = s.settings.layer
        assert _summary(engine, s)["images"] == 0
        _show_frames(engine, s, range(1, 5), seed=3)
        raw = _raw(None, 0, seed=3)
        x = engine.processor.to_input(frame_image(raw.pixels, raw.width, raw.height, raw.fmt, model))
        a = capture(model, x, [layer])[layer][0].flatten(1).double()
        mean, mx = a.mean(1).numpy(), a.amax(1).numpy()
        m = _summary(engine, s)
        assert m["source"] == "live" and m["layer"] == layer and m["images"] == 4 and "4 frames" in m["origin"]
        assert m["units"] == a.shape[0]
        assert m["sparsity"] == pytest.approx(float((a <= 0).double().mean()), abs=1e-6)
        dead = [int(u) for u in np.flatnonzero(mx <= 0)]
        assert m["dead"] == len(dead) and m["dead_units"] == dead
        by_mean = [int(u) for u in np.argsort(-mean, kind="stable")[:8]]
        assert [r["unit"] for r in m["most_active_by_mean"]] == by_mean
        for r in m["most_active_by_mean"]:
            assert r["mean"] == pytest.approx(mean[r["unit"]], rel=1e-5, abs=1e-6)
            assert r["max"] == pytest.approx(mx[r["unit"]], rel=1e-5, abs=1e-6)
        assert [r["unit"] for r in m["most_active_by_max"]] == [int(u) for u in np.argsort(-mx, kind="stable")[:8]]
        assert m["locality"] is None and m["sensitivity"] is None  # not known live

        # another unit of the layer is redrawn from the same frame: not counted again
        engine.update_settings(s, {"unit": 1}, ("raw",))
        assert wait_for(lambda: "frame" in s.latest, 30)
        engine.take(s)
        assert _summary(engine, s)["images"] == 4
        # reset empties it; the next frame counts again
        m = _summary(engine, s, reset=True)
        assert m["images"] == 0 and m["sparsity"] is None and m["most_active_by_mean"] == []
        _show_frames(engine, s, [10], seed=3)
        assert _summary(engine, s)["images"] == 1
        # another layer starts afresh
        other = next(n for n in ("conv1", "conv2") if n != layer)
        engine.update_settings(s, {"layer": other}, ("raw",))
        assert wait_for(lambda: "frame" in s.latest, 30)
        engine.take(s)
        m = _summary(engine, s)
        assert m["layer"] == other and m["images"] == 1
    finally:
        engine.close()


def _report_json(model, layer: str, tmp_path, **top) -> tuple:
    """A report's JSON for ``layer`` of ``model``: its activity over 3 random inputs, a locality and a sensitivity."""
    from deepvis.analysis.activity import layer_activity
    from deepvis.capture import capture
    from deepvis.stats import LayerStats

    x = torch.randn(3, 3, *model.preprocessing.input_size)
    a = capture(model, x, [layer])[layer].detach()
    st = LayerStats(layer, a.shape[1], 2, tuple(a.shape[2:]))
    st.update(a, torch.arange(3))
    act = layer_activity(st, tuple(a.shape[1:]))
    units = a.shape[1]
    data = {
        "model": "tiny",
        "dataset": "three-random",
        "activity": {layer: act.to_dict()},
        "locality": {layer: {"layer": layer, "locality": [0.25] * (units - 1) + [None]}},
        "sensitivity": {"layers": [layer], "epsilons": [0.1, 0.2], "kinds": ["noise"], "mean_change": {"noise": [[0.5], [0.75]]}},
        **top,
    }
    path = tmp_path / "report.json"
    path.write_text(json.dumps(data).replace("-Infinity", "null").replace("Infinity", "null").replace("NaN", "null"))
    return str(path), act


def test_with_a_report_the_summary_is_the_reports_and_other_layers_stay_live(model, tmp_path):
    from deepvis.analysis.activity import activity_from_dict

    path, act = _report_json(model, "conv2", tmp_path)
    back = activity_from_dict(json.loads(Path(path).read_text())["activity"]["conv2"])
    assert back.most_active("mean") == act.most_active("mean") and back.dead_units == act.dead_units
    app = make_app(model, report=path, synthesis=False, backprop=False)
    engine = app.state.toolbox.engine
    s = engine.open_session(_Loop())  # type: ignore[arg-type]
    engine.update_settings(s, {"layer": "conv2"}, ("raw",))
    m = _summary(engine, s)
    assert m["source"] == "report" and "report.json" in m["origin"] and m["images"] == 3
    assert [r["unit"] for r in m["most_active_by_mean"]] == act.most_active("mean")
    assert m["sparsity"] == pytest.approx(act.layer_sparsity, abs=1e-6) and m["dead"] == len(act.dead_units)
    assert m["locality"] == {"median": 0.25}
    assert m["sensitivity"] == {"epsilons": [0.1, 0.2], "mean_change": {"noise": [0.5, 0.75]}}
    engine.update_settings(s, {"layer": "conv1"}, ("raw",))
    assert _summary(engine, s)["source"] == "live"


def test_a_report_of_another_model_is_refused_in_one_line(model, tmp_path):
    from deepvis.errors import ModelError
    from deepvis.models.identity import model_identity

    other = tiny_model(size=40)
    path, _ = _report_json(other, "conv2", tmp_path)  # conv2 maps are 20x20 there, 16x16 here
    with pytest.raises(ModelError, match="was made for another model.*layer conv2 has shape"):
        make_app(model, report=path, synthesis=False)
    # a report that records its model's identity is checked by the one identity policy
    ident = model_identity(model)
    path, _ = _report_json(model, "conv2", tmp_path, identity={**ident, "model_hash": "0" * len(ident["model_hash"])})
    with pytest.raises(ModelError, match="with other weights"):
        make_app(model, report=path, synthesis=False)
    path, _ = _report_json(model, "conv2", tmp_path, identity=ident)
    make_app(model, report=path, synthesis=False)
    (tmp_path / "bad.json").write_text("{not json")
    from deepvis.errors import InputError

    with pytest.raises(InputError, match="cannot read the report"):
        make_app(model, report=str(tmp_path / "bad.json"), synthesis=False)


def test_the_atlas_statistics_become_the_summary_of_its_mined_layers(model, tiny_atlas):
    app = make_app(model, atlas=tiny_atlas, synthesis=False, backprop=False)
    toolbox = app.state.toolbox
    mined = toolbox.engine.summaries.layers
    assert mined
    s = toolbox.engine.open_session(_Loop())  # type: ignore[arg-type]
    toolbox.engine.update_settings(s, {"layer": mined[0]}, ("raw",))
    m = _summary(toolbox.engine, s)
    assert m["source"] == "atlas" and m["images"] > 0 and len(m["most_active_by_mean"]) > 0


def test_the_page_asks_for_its_summary_over_the_websocket(client):
    with open_ws(client) as ws:
        receive_until(ws, is_type("hello"))
        ws.send_bytes(frame_message(1, 32, 32))
        receive_until(ws, is_frame)
        ws.send_text(json.dumps({"type": "summary"}))
        m, _ = receive_until(ws, is_type("summary"))
        assert m["images"] == 1 and m["source"] == "live"
        ws.send_text(json.dumps({"type": "summary", "reset": True}))
        m, _ = receive_until(ws, is_type("summary"))
        assert m["images"] == 0


def test_a_dropped_app_keeps_neither_its_toolbox_nor_its_network_copies_alive(model):
    """The routes find their toolbox through the request's app, so nothing FastAPI caches (route
    functions) holds it: an app served and dropped frees its toolbox (and its network copies)."""
    import gc
    import weakref

    app = make_app(model, backprop=False, synthesis=False)
    with TestClient(app) as c:
        assert c.get(f"/api/health?token={TOKEN}").json()["ok"]
    gone = weakref.ref(app.state.toolbox)
    frame_net = weakref.ref(app.state.toolbox.engine.frame_model.module)
    del app, c
    gc.collect()  # the app (its finalizer closes the toolbox) ...
    gc.collect()  # ... then the engine's own reference cycles (its threads' bound methods)
    assert gone() is None and frame_net() is None
