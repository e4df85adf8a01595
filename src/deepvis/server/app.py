"""The FastAPI app: routes, the WebSocket handler, and the :class:`Toolbox` that holds all state.

Everything lives on the app (``app.state.toolbox``): no module-level state, so several apps (tests,
several models) can live in one process.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import tempfile
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeGuard

from fastapi import APIRouter, FastAPI, Request, WebSocket
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from PIL import Image
from starlette.concurrency import run_in_threadpool
from starlette.websockets import WebSocketDisconnect, WebSocketState

from ..atlas.store import INDEX_NAME
from ..backprop import RAW, READABLE
from ..capture import LOGITS
from ..datasets import open_dataset
from ..errors import DeepvisError, InputError
from ..io import decode_image, load_image, sample_photos, to_mode
from ..models import load_model
from ..models.model import Model
from ..render import AFFINE_NORMALIZATIONS, COLORMAPS, NORMALIZATIONS, colormap_lut
from .atlas_view import IMAGE_KINDS, AtlasView, SynthCropper
from .config import ServerConfig
from .engine import LiveEngine, TooManySessions, error_message, replica
from .frames import fit_image
from .mining import DatasetMiner, TemporaryAtlas
from .protocol import BACKPROP_MODES, ProtocolError, ViewSettings, pack, text, unpack
from .security import Guard, GuardMiddleware, new_token
from .session import Frame, RawFrame, Session
from .static_files import StaticFiles
from .summary import SUMMARY_INTERVAL, StoredSummaries
from .synthesis import SynthesisService
from .unitviews import backprop_filters, layer_geometry, unit_view
from .video import ServerVideo, decode_video

__all__ = ["create_app", "Toolbox"]

log = logging.getLogger("deepvis.server")

#: largest text message accepted from a page
MAX_TEXT_BYTES = 65_536


def _is_int(v: object) -> TypeGuard[int]:
    """True for a JSON whole number (``true``/``false`` are not numbers here)."""
    return isinstance(v, int) and not isinstance(v, bool)


def _json_error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers={"cache-control": "no-store"})


class _TooLarge(Exception):
    """An upload's body is over its size cap (declared in Content-Length, or found while streaming)."""


async def _capped_body(request: Request, cap: int) -> AsyncIterator[bytes]:
    """The request body's chunks, raising :class:`_TooLarge` as soon as it is known to exceed ``cap`` bytes
    (a declared Content-Length over the cap, or a malformed one, is refused before reading)."""
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > cap):
        raise _TooLarge
    total = 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > cap:
            raise _TooLarge
        yield chunk


class Toolbox:
    """The state of one running toolbox: the model, the frame engine, the guard, the page's files."""

    def __init__(self, config: ServerConfig, model: Model) -> None:
        self.config = config
        self.model = model
        self.token = config.token or new_token()
        hosts = list(config.allowed_hosts)
        if config.host not in ("0.0.0.0", "::", ""):
            hosts.append(config.host)
        self.guard = Guard(self.token, hosts, config.frame_origins)
        self.static = StaticFiles()
        self.samples = {name: path for name, path in sample_photos().items()}
        #: the backprop view's display filters (only ``raw`` when the view is off)
        self.filters: tuple[str, ...] = backprop_filters() if config.backprop else ("raw",)
        self.engine = LiveEngine(
            model,
            unit_view=unit_view if config.backprop else None,
            geometry=layer_geometry if config.backprop else None,
            max_sessions=config.max_sessions,
            autocast=config.autocast,
        )
        #: the dataset miner (``dataset``) and the temporary atlas it fills when no atlas folder was given
        #: (removed by close, or when the toolbox is dropped unstarted, or at exit: see TemporaryAtlas)
        self.miner: DatasetMiner | None = None
        self._temp_atlas: TemporaryAtlas | None = None
        atlas_root = Path(config.atlas) if config.atlas is not None else None
        self.synthesis: SynthesisService | None = None
        try:
            if config.dataset is not None:
                dataset = open_dataset(config.dataset)  # a missing or empty dataset: a one-line InputError
                if atlas_root is None:
                    self._temp_atlas = TemporaryAtlas()
                    atlas_root = self._temp_atlas.path
                if (atlas_root / INDEX_NAME).exists():  # another model's atlas is refused by the identity policy first
                    AtlasView(atlas_root, model)
                self.miner = DatasetMiner(
                    replica(model),
                    dataset,
                    atlas_root,
                    self._broadcast,
                    on_change=self._atlas_changed,
                    top=config.mining_top,
                    batch_size=config.mining_batch_size,
                    autocast=config.autocast,
                )
                self.miner.prepare(self.engine.default_settings.layer)  # creates the atlas, or refuses another dataset's
            #: synthesized images cut to their unit's receptive field, and the fields boxed on whole inputs
            #: (one copy of the network for both)
            self.cropper = SynthCropper(replica(model)) if config.synthesis or atlas_root is not None else None
            dataset_at_hand = self.miner.dataset if self.miner is not None else None  # whole inputs for the unit pane
            self.atlas = AtlasView(atlas_root, model, dataset=dataset_at_hand, fields=self.cropper) if atlas_root is not None else None
            if config.atlas is not None or config.report is not None or self.miner is not None:
                # after AtlasView: the atlas was checked against the model by the identity policy
                self.engine.summaries = StoredSummaries(
                    model, self.engine.processor.table, atlas=config.atlas, report=config.report, miner=self.miner
                )
            if config.synthesis:
                self.synthesis = SynthesisService(
                    replica(model), self.engine.post_event, self.synth_params, atlas=self.atlas, judges=config.judges
                )
        except BaseException:  # a refused atlas or report, Ctrl-C: leave no temporary atlas behind
            self._remove_temp_atlas()
            raise

    def synth_params(self, layer: str) -> dict[str, Any]:
        """Synthesis parameters for ``layer``: the atlas's when it has them (so images match), else the config's."""
        if self.atlas is not None:
            p = self.atlas.synth_params(layer)
            if p:
                return p
        c = self.config
        return {"preset": c.synthesis_preset, "steps": c.synthesis_steps, "size": c.synthesis_size, "seed": 0}

    def start(self) -> None:
        self.engine.start()
        if self.synthesis is not None:
            self.synthesis.start()
        if self.miner is not None:
            s = self.engine.default_settings
            self.miner.select(s.layer, s.unit)  # the page opens on this layer: mine it from the first minute
            self.miner.start()

    def close(self) -> None:
        if self.miner is not None:
            self.miner.close()
        if self.synthesis is not None:
            self.synthesis.close()
        self.engine.close()
        self._remove_temp_atlas()

    def _remove_temp_atlas(self) -> None:
        if self._temp_atlas is not None:
            self._temp_atlas.remove()  # a failure is logged, with where the folder is left

    def _broadcast(self, msg: str) -> None:
        """Give every page ``msg`` as its newest ``mining`` message (the miner's status)."""
        for session in self.engine.sessions():
            self.engine.post_latest(session, "mining", msg)

    def _atlas_changed(self) -> None:
        if self.atlas is not None:
            self.atlas.refresh()

    # -- what a page learns when it connects --------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """What a page learns when it connects (in ``hello``, and from ``/api/info``): the model, its
        layers, the default settings, the sample photos, the colormaps (256 RGB triples each) and the
        library's lists of normalizations, backprop modes (``off`` first) and filters, from which the
        page builds its controls; what is available (backprop view, atlas, synthesis); how often the page
        asks for its summary; upload limits."""
        m = self.model
        p = m.preprocessing
        return {
            "model": {
                "name": m.name,
                "input_size": list(p.input_size),
                "crop_pct": p.crop_pct,
                "channels": p.channels,
                "num_classes": m.num_classes,
                "weights": m.weights.label,
                "untrained": m.weights.untrained,
            },
            "layers": [
                {
                    "name": i.name,
                    "type": i.type,
                    "listed": i.listed,
                    "shape": list(i.shape),
                    "same_as": i.same_as,
                    "classes": self.engine.processor.is_class_layer(i.name),
                    "layout": i.layout.kind,
                    "prefix": list(i.prefix),
                }
                for i in self.engine.processor.table
            ],
            "default_settings": self.engine.default_settings.to_dict(),
            "samples": sorted(self.samples),
            "colormaps": {name: colormap_lut(name).reshape(-1).tolist() for name in COLORMAPS},
            "normalizations": list(NORMALIZATIONS),
            # (the page may draw a newly selected unit from its grid tile under these: see panes.js previewUnit)
            "affine_normalizations": list(AFFINE_NORMALIZATIONS),
            "backprop": {
                "available": self.engine.backprop_available,
                "modes": list(BACKPROP_MODES),
                "filters": list(self.filters),
                "readable": READABLE.to_dict(),
                "raw": RAW.to_dict(),
            },
            "atlas": self.atlas.info() if self.atlas is not None else {"available": False},
            "mining": self.miner.status() if self.miner is not None else {"available": False},
            "synthesis": {"available": self.synthesis is not None},
            "summary": {"interval_s": SUMMARY_INTERVAL},
            "limits": {
                "max_upload_bytes": self.config.max_upload_bytes,
                "max_upload_pixels": self.config.max_upload_pixels,
                "max_video_bytes": self.config.max_video_bytes,
            },
        }

    def hello(self, session: Session) -> str:
        return text("hello", session=session.id, class_names=self.model.class_names, logits=LOGITS, **self.info())

    # -- inputs ------------------------------------------------------------------------------------
    def submit_still(self, session: Session, image: Image.Image, source: str, name: str | None) -> None:
        """Make a still image (upload, sample) the page's input; the page gets it back as the model sees it.

        Runs in a worker thread (resizing and JPEG encoding take a few milliseconds).
        """
        fitted = fit_image(to_mode(image, self.model.preprocessing.pil_mode), self.model)
        buf = io.BytesIO()
        fitted.convert("RGB").save(buf, format="JPEG", quality=92)
        msg = pack({"type": "input", "source": source, "name": name, "w": fitted.width, "h": fitted.height}, {"jpeg": buf.getvalue()})
        self.engine.post_latest(session, "input", msg)
        self.engine.submit_frame(session, Frame(fitted, source, name=name))

    def submit_video_frame(self, session: Session, video: ServerVideo, index: int, seq: int) -> None:
        """Make frame ``index`` of a server-decoded video the page's input (already at the model's size)."""
        jpeg = video.frames[index]
        image = decode_image(jpeg, self.model.preprocessing.pil_mode, name=f"{video.name} frame {index}")
        msg = pack(
            {"type": "input", "source": "video", "name": video.name, "index": index, "w": image.width, "h": image.height}, {"jpeg": jpeg}
        )
        self.engine.post_latest(session, "input", msg)
        self.engine.submit_frame(session, Frame(image, "video", seq=seq, name=video.name))

    def load_sample(self, name: str) -> Image.Image:
        path = self.samples.get(name)
        if path is None:
            raise InputError(f"no sample photo named {name!r}")
        return load_image(path, self.model.preprocessing.pil_mode, max_pixels=self.config.max_upload_pixels)

    # -- what the unit likes --------------------------------------------------------------------------
    def _known_unit(self, layer: str, unit: int) -> bool:
        try:
            self.engine.processor.check(ViewSettings(layer=layer, unit=unit))
        except DeepvisError:
            return False
        return True

    def atlas_unit(self, layer: str, unit: int) -> dict[str, Any] | None:
        """The atlas record of a unit merged with this server's own synthesized image (None: no such unit)."""
        if not self._known_unit(layer, unit):
            return None
        rec = (
            self.atlas.unit(layer, unit)
            if self.atlas is not None
            else {"layer": layer, "unit": unit, "in_atlas": False, "top": [], "synth": None, "stats": None}
        )
        return self.synthesis.annotate(rec) if self.synthesis is not None else rec

    def atlas_layer(self, layer: str) -> dict[str, Any] | None:
        if not self._known_unit(layer, 0):
            return None
        units = set(self.atlas.synth_units(layer)) if self.atlas is not None else set()
        if self.synthesis is not None:
            units |= set(self.synthesis.units(layer))
        return {"layer": layer, "synth": sorted(units)}

    def atlas_image(self, layer: str, unit: int, kind: str, rank: int, crop: bool = False) -> bytes | None:
        """The PNG of one image of a unit (None: none such); ``crop``: a synthesized image cut to the
        unit's receptive field (dataset crops and views are cut to it already)."""
        if not self._known_unit(layer, unit) or kind not in IMAGE_KINDS or not 0 <= rank < 1000:
            return None
        data = self.atlas.image(layer, unit, kind, rank) if self.atlas is not None else None
        if data is None and kind in ("synth", "accent") and self.synthesis is not None:
            live = self.synthesis.result(layer, unit, "accentuate" if kind == "accent" else "synthesize")
            data = live.png if live is not None else None
        if data is not None and crop and kind in ("synth", "synth_raw") and self.cropper is not None:
            data = self.cropper.crop(data, layer)
        return data

    # -- messages from a page ----------------------------------------------------------------------
    def on_binary(self, session: Session, data: bytes) -> None:
        header, payload = unpack(data)
        if header.get("type") != "frame":
            raise ProtocolError(f"unknown binary message type {header.get('type')!r}")
        seq, w, h = header.get("seq"), header.get("w"), header.get("h")
        if not (_is_int(seq) and _is_int(w) and _is_int(h)):
            raise ProtocolError("a frame needs integer seq, w and h")
        source = header.get("source", "camera")
        if source not in ("camera", "video", "image"):
            raise ProtocolError(f"unknown frame source {source!r}")
        self.engine.submit_frame(session, RawFrame(seq, w, h, str(header.get("format", "rgba")), payload, source))

    async def on_text(self, session: Session, raw: str) -> None:
        if len(raw) > MAX_TEXT_BYTES:
            raise ProtocolError("message too long")
        try:
            msg = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise ProtocolError(f"message is not JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise ProtocolError("a message must be a JSON object")
        kind = msg.get("type")
        if kind == "settings":
            req = msg.pop("req", None)
            if req is not None and (isinstance(req, bool) or not isinstance(req, int)):
                raise ProtocolError("settings 'req' must be an integer")
            try:
                settings = self.engine.update_settings(session, msg, self.filters)
            except DeepvisError:
                # the page applied the change optimistically: tell it what is really shown
                self.engine.post_event(session, text("settings", settings=session.settings.to_dict(), req=req))
                raise
            self.engine.post_event(session, text("settings", settings=settings.to_dict(), req=req))
            if self.miner is not None:
                self.miner.select(settings.layer, settings.unit)
        elif kind == "sample":
            name = msg.get("name")
            if not isinstance(name, str):
                raise ProtocolError("sample needs a name")
            image = await asyncio.to_thread(self.load_sample, name)
            await asyncio.to_thread(self.submit_still, session, image, "sample", name)
        elif kind == "synthesize":
            if self.synthesis is None:
                raise DeepvisError("synthesis is not available on this server")
            layer, unit = msg.get("layer"), msg.get("unit")
            if not isinstance(layer, str) or not isinstance(unit, int) or isinstance(unit, bool):
                raise ProtocolError("synthesize needs a layer name and a unit number")
            self.engine.processor.check(ViewSettings(layer=layer, unit=unit))
            self.synthesis.request(session, layer, unit)
        elif kind in ("accentuate", "figures"):
            if self.synthesis is None:
                raise DeepvisError("synthesis is not available on this server")
            self.synthesis.on_message(session, msg, self.engine.processor.check)
        elif kind == "video_frame":
            video = session.video
            index, seq = msg.get("index"), msg.get("seq")
            if video is None:
                raise ProtocolError("no video decoded by the server for this page")
            if not (_is_int(index) and _is_int(seq)):
                raise ProtocolError(f"video frame index and seq must be integers, got {index!r} and {seq!r}")
            if not 0 <= index < len(video.frames):
                raise ProtocolError(f"video frame index must be 0-{len(video.frames) - 1}")
            await asyncio.to_thread(self.submit_video_frame, session, video, index, seq)
        elif kind == "summary":
            await asyncio.to_thread(self.engine.send_summary, session, reset=msg.get("reset") is True)
        elif kind == "ping":
            self.engine.post_event(session, text("pong", t=msg.get("t"), status=self.engine.status()))
        else:
            raise ProtocolError(f"unknown message type {kind!r}")


def _gone(ws: WebSocket, exc: Exception) -> bool:
    """True when ``exc`` only says that the page's socket is closed: starlette's disconnect seen while
    sending, or its refusal to send on a socket it has already closed (a RuntimeError, with the
    socket's state saying so). Anything else is a bug."""
    if isinstance(exc, WebSocketDisconnect):
        return True
    return isinstance(exc, RuntimeError) and ws.application_state == WebSocketState.DISCONNECTED


async def _sender(ws: WebSocket, engine: LiveEngine, session: Session) -> None:
    """Send a page what is waiting for it; blocks (only this task) while the page does not read.

    When the page has gone, it ends quietly. Any other failure is a bug: it is logged with its
    traceback, the page is told (``error`` of scope ``connection``) and the socket is closed with
    code 1011, so the page reconnects to a fresh session instead of silently getting nothing more.
    """
    try:
        while True:
            await session.wake.wait()
            session.wake.clear()
            for msg in engine.take(session):
                if isinstance(msg, bytes):
                    await ws.send_bytes(msg)
                else:
                    await ws.send_text(msg)
    except Exception as exc:
        if _gone(ws, exc):
            log.debug("page %s gone while sending: %s", session.id, exc)
            return
        log.exception("sending to page %s failed", session.id)
        with contextlib.suppress(Exception):  # the page may be unreachable too: it was logged above
            await ws.send_text(text("error", scope="connection", message=f"internal error while sending: {type(exc).__name__}: {exc}"))
            await ws.close(code=1011, reason="internal error")


def create_app(config: ServerConfig | None = None) -> FastAPI:
    """Build the toolbox web app for ``config`` (loads the model now; threads start with the app).

    The launch token is ``app.state.toolbox.token``; the page's URL is ``/?token=<token>``.
    """
    config = config or ServerConfig()
    if isinstance(config.model, Model):
        model = config.model
    else:
        model = load_model(config.model, weights=config.weights, labels=config.labels, device=config.device, input_size=config.input_size)
    toolbox = Toolbox(config, model)
    app = FastAPI(title="deepvis", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.toolbox = toolbox
    # an app dropped without having been served (or at exit, one never shut down) stops what it started and
    # removes its temporary atlas
    weakref.finalize(app, toolbox.close)
    app.add_middleware(GuardMiddleware, guard=toolbox.guard)
    app.add_exception_handler(RequestValidationError, _bad_parameters)
    app.include_router(_routes)
    return app


async def _bad_parameters(request: Request, exc: Exception) -> JSONResponse:
    """A missing or mistyped query parameter (``unit=abc``): one line in the API's ``{"error": ...}`` form, 400."""
    errors = exc.errors() if isinstance(exc, RequestValidationError) else []
    if not errors:
        return _json_error(400, "bad request")
    first = errors[0]
    where = " ".join(str(part) for part in first.get("loc", ()) if part not in ("query", "body"))
    what = "is missing" if first.get("type") == "missing" else f"{first.get('input')!r}: {first.get('msg', 'invalid')}"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return _json_error(400, f"parameter {where or '?'} {what}{more}")


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    toolbox: Toolbox = app.state.toolbox
    try:
        toolbox.start()
        yield
    finally:
        await asyncio.to_thread(toolbox.close)


# The routes are module-level functions that find their toolbox through the request's app (never a
# closure over it): FastAPI caches facts about route functions in module-level caches, and a closure
# kept there would keep every toolbox ever built (and its copies of the network) alive after its app.
_routes = APIRouter()


def _toolbox(conn: Request | WebSocket) -> Toolbox:
    toolbox: Toolbox = conn.app.state.toolbox  # set by create_app
    return toolbox


@_routes.get("/")
async def index(request: Request) -> Response:
    toolbox = _toolbox(request)
    page, csp = toolbox.static.index(toolbox.token, request.headers.get("host", ""), frame_policy=toolbox.guard.frame_policy)
    return Response(page, media_type="text/html; charset=utf-8", headers={"content-security-policy": csp, "cache-control": "no-store"})


@_routes.get("/static/{name:path}")
async def static(request: Request, name: str) -> Response:
    toolbox = _toolbox(request)
    asset = toolbox.static.get(name)
    if asset is None:
        return _json_error(404, "not found")
    return Response(asset.body, media_type=asset.content_type, headers={"cache-control": "no-cache"})


@_routes.get("/api/health")
async def health(request: Request) -> dict[str, Any]:
    return {"ok": True, **_toolbox(request).engine.status()}


@_routes.get("/api/info")
async def info(request: Request) -> dict[str, Any]:
    return _toolbox(request).info()


@_routes.post("/api/upload")
async def upload(request: Request, session: str = "", name: str = "") -> Response:
    toolbox = _toolbox(request)
    config = toolbox.config
    s = toolbox.engine.session(session)
    if s is None:
        return _json_error(404, "unknown page session: reload the page")
    cap = config.max_upload_bytes
    try:
        chunks = [chunk async for chunk in _capped_body(request, cap)]
    except _TooLarge:
        return _json_error(413, f"upload too large: the limit is {cap // (1024 * 1024)} MB")
    label = (name or "upload")[:200]
    try:
        image = await run_in_threadpool(
            decode_image, b"".join(chunks), toolbox.model.preprocessing.pil_mode, max_pixels=config.max_upload_pixels, name=label
        )
    except InputError as exc:
        return _json_error(400, str(exc))
    await run_in_threadpool(toolbox.submit_still, s, image, "image", label)
    return JSONResponse({"ok": True, "name": label, "width": image.width, "height": image.height})


@_routes.get("/api/atlas/unit")
async def atlas_unit(request: Request, layer: str, unit: int) -> Response:
    toolbox = _toolbox(request)
    try:
        rec = await run_in_threadpool(toolbox.atlas_unit, layer, unit)
    except DeepvisError as exc:  # the atlas cannot be read: say so in the page
        return _json_error(500, str(exc))
    if rec is None:
        return _json_error(404, "no such unit in the model")
    return JSONResponse(rec, headers={"cache-control": "no-store"})


@_routes.get("/api/atlas/layer")
async def atlas_layer(request: Request, layer: str) -> Response:
    toolbox = _toolbox(request)
    try:
        rec = await run_in_threadpool(toolbox.atlas_layer, layer)
    except DeepvisError as exc:  # the atlas cannot be read: say so in the page
        return _json_error(500, str(exc))
    if rec is None:
        return _json_error(404, "no such layer in the model")
    return JSONResponse(rec, headers={"cache-control": "no-store"})


@_routes.get("/api/atlas/image")
async def atlas_image(request: Request, layer: str, unit: int, kind: str, rank: int = 0, crop: int = 0) -> Response:
    toolbox = _toolbox(request)
    try:
        data = await run_in_threadpool(toolbox.atlas_image, layer, unit, kind, rank, crop == 1)
    except DeepvisError as exc:  # the atlas cannot be read: say so in the page
        return _json_error(500, str(exc))
    if data is None:
        return _json_error(404, "no such image")
    return Response(data, media_type="image/png", headers={"cache-control": "private, max-age=60"})


@_routes.post("/api/video")
async def video(request: Request, session: str = "", name: str = "") -> Response:
    toolbox = _toolbox(request)
    config = toolbox.config
    s = toolbox.engine.session(session)
    if s is None:
        return _json_error(404, "unknown page session: reload the page")
    cap = config.max_video_bytes
    label = (name or "video")[:200]
    with tempfile.TemporaryDirectory(prefix="deepvis-video-") as tmp:
        src = Path(tmp) / "upload.bin"
        total = 0
        with open(src, "wb") as f:  # a fixed name in a private folder: the client's name is only a label
            try:
                async for chunk in _capped_body(request, cap):
                    total += len(chunk)
                    f.write(chunk)
            except _TooLarge:
                return _json_error(413, f"video too large for the server to decode: the limit is {cap // (1024 * 1024)} MB")
        if total == 0:
            return _json_error(400, f"{label} is empty (0 bytes)")
        try:
            decoded = await decode_video(src, label, toolbox.model.preprocessing, max_pixels=config.max_upload_pixels)
        except InputError as exc:
            return _json_error(400, str(exc))
    s.attach_video(decoded)
    return JSONResponse({"ok": True, "name": label, "frames": len(decoded.frames), "fps": decoded.fps, "warning": decoded.warning})


@_routes.websocket("/ws")
async def websocket(ws: WebSocket) -> None:
    toolbox = _toolbox(ws)
    try:
        session = toolbox.engine.open_session(asyncio.get_running_loop())
    except TooManySessions as exc:
        await ws.close(code=1013, reason=str(exc)[:120])
        return
    await ws.accept()
    toolbox.engine.post_event(session, toolbox.hello(session))
    sender = asyncio.create_task(_sender(ws, toolbox.engine, session))
    try:
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            try:
                if message.get("bytes") is not None:
                    toolbox.on_binary(session, message["bytes"])
                elif message.get("text") is not None:
                    await toolbox.on_text(session, message["text"])
            except DeepvisError as exc:
                toolbox.engine.post_event(session, text("error", scope="message", message=str(exc)))
            except Exception as exc:  # a bug: log it, tell the page, keep the connection
                log.exception("message handling failed")
                toolbox.engine.post_event(session, text("error", scope="message", message=error_message(exc, "message handling")))
    finally:
        toolbox.engine.close_session(session)
        sender.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender
