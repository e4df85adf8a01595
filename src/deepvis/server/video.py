"""Videos the browser cannot play: decoded by the server in a child process, then played frame by frame.

The page plays video files itself whenever it can (nothing reaches the server but frames). For files
its ``<video>`` element refuses (codecs browsers lack, e.g. MPEG-4 Part 2 in AVI), it uploads the file
and the server decodes it with :func:`deepvis.io.read_frames` (PyAV/FFmpeg) — in a **child process**
(:mod:`deepvis.server._decode_child`),
with a CPU-time limit and a timeout, so a malformed file that crashes or hangs the decoder takes down
only the child. The frames, fitted to the model's input and JPEG-encoded, come back in one file; the
page then asks for them by index (play, pause, step).
"""

from __future__ import annotations

import asyncio
import json
import signal
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from ..models.preprocessing import Preprocessing

__all__ = ["ServerVideo", "decode_video", "child_command", "MAX_VIDEO_FRAMES"]

#: at most this many frames are kept from one video (evenly spaced over it)
MAX_VIDEO_FRAMES = 600
#: seconds a decode may take, wall clock and CPU
DECODE_TIMEOUT = 180.0


@dataclass(frozen=True)
class ServerVideo:
    """A decoded video: JPEG frames at the model's input size, ``fps`` of playback (after any striding)."""

    name: str
    fps: float
    frames: tuple[bytes, ...]
    warning: str | None = None


def child_command(src: Path, out: Path, pre: Preprocessing, max_frames: int, max_pixels: int) -> list[str]:
    """The command line of the decoding child process."""
    spec = {
        "src": str(src),
        "out": str(out),
        "input_size": list(pre.input_size),
        "crop_pct": pre.crop_pct,
        "interpolation": pre.interpolation,
        "max_frames": max_frames,
        "max_pixels": max_pixels,
    }
    return [sys.executable, "-m", "deepvis.server._decode_child", json.dumps(spec)]


def _limit_cpu() -> None:  # runs in the child before it starts
    import resource

    cpu = int(DECODE_TIMEOUT)
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 5))


async def decode_video(
    src: Path, name: str, pre: Preprocessing, *, max_frames: int = MAX_VIDEO_FRAMES, max_pixels: int = 40_000_000
) -> ServerVideo:
    """Decode ``src`` in a child process; raises :class:`~deepvis.errors.InputError` with a one-line reason."""
    out = src.with_suffix(".frames")
    cmd = child_command(src, out, pre, max_frames, max_pixels)
    proc = await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        preexec_fn=_limit_cpu if sys.platform.startswith("linux") else None,
    )
    try:
        _, err = await asyncio.wait_for(proc.communicate(), DECODE_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        raise InputError(f"decoding {name} took longer than {DECODE_TIMEOUT:.0f} s; gave up") from None
    # the upload lives under a private temporary name: messages name the user's file instead
    message = err.decode(errors="replace").replace(str(src), name).strip().splitlines()
    code = proc.returncode
    assert code is not None  # communicate() returned: the child has exited
    if code != 0:
        if code < 0:
            sig = signal.Signals(-code).name if -code in signal.valid_signals() else str(-code)
            raise InputError(f"the video decoder crashed on {name} ({sig}); the file is probably damaged")
        reason = message[-1] if message else f"exit status {code}"
        if reason.startswith("deepvis: error: "):
            raise InputError(reason.removeprefix("deepvis: error: "))
        raise InputError(f"could not decode {name}: {reason}")
    try:
        frames, meta = _read_frames_file(out)
    finally:
        out.unlink(missing_ok=True)
    if not frames:
        raise InputError(f"{name} has no decodable frames")
    return ServerVideo(name, float(meta["fps"]), tuple(frames), meta.get("warning"))


def _read_frames_file(path: Path) -> tuple[list[bytes], dict]:
    data = path.read_bytes()
    (n,) = struct.unpack_from("<I", data)
    meta = json.loads(data[4 : 4 + n])
    frames, pos = [], 4 + n
    for length in meta["lengths"]:
        frames.append(data[pos : pos + length])
        pos += length
    return frames, meta
