"""The video-decoding child process of :mod:`deepvis.server.video` (run as ``python -m``).

Reads the video with :func:`deepvis.io.read_frames`, fits every frame to the model's input, writes
``[u32 header length][header JSON][JPEG frames]`` to the output path, and exits; errors a file can
cause are printed as ``deepvis: error: ...`` with exit status 2.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

from .._fs import atomic_path
from ..errors import DeepvisError, InputError
from ..io import read_frames, video_info
from ..models.preprocessing import Preprocessing


def _child(spec: dict[str, Any]) -> int:
    """Decode in this (child) process: frames fitted to the model input, JPEG, one output file."""
    src, out = Path(spec["src"]), Path(spec["out"])
    pre = Preprocessing(tuple(spec["input_size"]), (0.5,) * 3, (0.5,) * 3, spec["interpolation"], spec["crop_pct"], 3)
    total, fps = video_info(src)
    step = max(1, -(-total // spec["max_frames"])) if total else 1
    jpegs: list[bytes] = []
    warning = None
    try:
        for _, im in read_frames(src, step=step, max_frames=spec["max_frames"], max_pixels=spec["max_pixels"]):
            buf = io.BytesIO()
            pre.fit(im).save(buf, format="JPEG", quality=90)
            jpegs.append(buf.getvalue())
    except InputError as exc:
        if not jpegs:
            raise
        warning = f"only the first {len(jpegs)} frames could be decoded: {exc}"
    meta = json.dumps({"fps": fps / step, "lengths": [len(j) for j in jpegs], "warning": warning}).encode()
    with atomic_path(out) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<I", len(meta)))
        f.write(meta)
        for j in jpegs:
            f.write(j)
    return 0


def _main(argv: list[str]) -> int:
    try:
        return _child(json.loads(argv[0]))
    except DeepvisError as exc:
        print(f"deepvis: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(_main(sys.argv[1:]))
