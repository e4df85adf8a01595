"""Video files through PyAV: read frames, write frames."""

from __future__ import annotations

import os
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, cast

import numpy as np
from PIL import Image

from ..errors import InputError

if TYPE_CHECKING:
    import av

__all__ = ["VIDEO_SUFFIXES", "is_video", "video_info", "read_frames", "VideoWriter"]

VIDEO_SUFFIXES = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".y4m", ".mjpeg")


def is_video(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` has a video file suffix."""
    return Path(path).suffix.lower() in VIDEO_SUFFIXES


def _open(path: Path) -> av.container.InputContainer:
    import av

    if not path.is_file():
        raise InputError(f"video not found: {path}")
    if path.stat().st_size == 0:
        raise InputError(f"video {path} is empty (0 bytes)")
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)  # FFmpeg's words, without its error number and the path again
        raise InputError(f"cannot open video {path}: {reason}") from exc
    if not container.streams.video:
        container.close()
        raise InputError(f"{path} has no video stream")
    return container


def video_info(path: str | os.PathLike[str]) -> tuple[int | None, float]:
    """(frame count or None when the container does not say, frames per second)."""
    with _open(Path(path)) as c:
        s = c.streams.video[0]
        fps = float(s.average_rate) if s.average_rate else 25.0
        return (s.frames or None), fps


def read_frames(
    path: str | os.PathLike[str], *, step: int = 1, max_frames: int | None = None, max_pixels: int = 64_000_000
) -> Iterator[tuple[int, Image.Image]]:
    """Yield (frame index, RGB image) for every ``step``-th frame, at most ``max_frames`` of them.

    ``path`` is a video file PyAV can read; ``step`` >= 1; the frame index counts every decoded frame
    from 0 (the skipped ones too); a video whose frames have more than ``max_pixels`` pixels (width ×
    height) is refused.
    A damaged stream raises :class:`~deepvis.errors.InputError` after the frames decoded so far.
    """
    import av

    path = Path(path)
    yielded = 0
    with _open(path) as container:
        stream = container.streams.video[0]
        if stream.codec_context.width * stream.codec_context.height > max_pixels:
            raise InputError(f"video {path} frames are larger than {max_pixels / 1e6:.0f} MP")
        try:
            for i, frame in enumerate(container.decode(stream)):
                if i % step:
                    continue
                yield i, frame.to_image().convert("RGB")
                yielded += 1
                if max_frames is not None and yielded >= max_frames:
                    return
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise InputError(f"video {path} is damaged after frame {yielded}: {exc}") from exc
    if yielded == 0:
        raise InputError(f"video {path} has no decodable frames")


class VideoWriter:
    """Write RGB frames (numpy HxWx3 uint8 or Pillow) to a video file with PyAV (H.264 when available)."""

    def __init__(self, path: str | os.PathLike[str], fps: float = 25.0) -> None:
        import av

        self.path = Path(path)
        self._container = av.open(str(self.path), mode="w", format=_format_for(self.path))
        codec = "libx264" if "libx264" in av.codecs_available else "mpeg4"
        # a video codec's stream (add_stream is typed for every kind of codec)
        self._stream = cast("av.VideoStream", self._container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001)))
        self._stream.pix_fmt = "yuv420p"
        self._opened = False

    def write(self, frame: np.ndarray | Image.Image) -> None:
        import av

        arr = np.asarray(frame.convert("RGB") if isinstance(frame, Image.Image) else frame, dtype=np.uint8)
        h, w = arr.shape[:2]
        arr = arr[: h - h % 2, : w - w % 2]  # yuv420p needs even sizes
        if not self._opened:
            self._stream.width, self._stream.height = arr.shape[1], arr.shape[0]
            self._opened = True
        for packet in self._stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")):
            self._container.mux(packet)

    def close(self) -> None:
        for packet in self._stream.encode():
            self._container.mux(packet)
        self._container.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _format_for(path: Path) -> str | None:
    # temp files carry the real suffix last, so the container format follows the target name
    return {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm", ".avi": "avi"}.get(path.suffix.lower())
