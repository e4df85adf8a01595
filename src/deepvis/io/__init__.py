"""Inputs and outputs: images (every Pillow mode, one policy), sample photos, videos."""

from .images import DEFAULT_MAX_PIXELS, IMAGE_SUFFIXES, decode_image, load_image, to_mode
from .samples import SAMPLE_PREFIX, resolve_input, sample_path, sample_photos
from .video import VIDEO_SUFFIXES, VideoWriter, is_video, read_frames, video_info

__all__ = [
    "load_image",
    "decode_image",
    "to_mode",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_SUFFIXES",
    "sample_photos",
    "sample_path",
    "resolve_input",
    "SAMPLE_PREFIX",
    "read_frames",
    "video_info",
    "is_video",
    "VideoWriter",
    "VIDEO_SUFFIXES",
]
