"""``deepvis activations``: every channel of a layer tiled into one picture (or a video of them)."""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..choices import NORMALIZATIONS
from ..errors import DeepvisError
from .common import (
    IMAGE_FORMATS,
    SAMPLE_HELP,
    add_autocast_option,
    add_colormap_option,
    add_json_option,
    add_model_options,
    add_output_option,
    at_least,
    existing_input,
    image_format,
    model_from_args,
    print_json,
    progress,
)

if TYPE_CHECKING:
    from ..activations import ActivationView
    from ..models import Model
    from ..predictions import Prediction


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "activations",
        help="tile every channel of a layer for an image or video",
        description="Tile every channel of LAYER for INPUT (an image, a video, or sample:NAME) into one picture, "
        "with the top-k predictions, and print the predictions. For a video, OUT is a video file (.mp4, .webm, ...) "
        "or a folder (one PNG per frame). A token layer's prefix tokens (cls, dist, reg0 ...) are drawn as a strip under "
        "the grid; an attention layer is drawn one tile per head: the --query token's attention over the patch grid.",
    )
    p.add_argument("input", metavar="INPUT", help=f"image or video file, or {SAMPLE_HELP}")
    p.add_argument("--layer", required=True, help="layer name (see `deepvis layers`)")
    add_output_option(p, metavar="OUT", help="output PNG (image input) or video file / folder (video input)")
    p.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        default="layer",
        help="one scale per layer or per channel (default: %(default)s)",
    )
    add_colormap_option(p)
    p.add_argument("--unit", type=int, metavar="N", help="highlight channel N (a head of an attention layer)")
    p.add_argument(
        "--query",
        metavar="cls|Y,X",
        help="attention layers: the query token whose attention is drawn: a prefix token (cls, dist, reg0, #0) or a patch Y,X "
        "(default: the first prefix token)",
    )
    p.add_argument("--scale", type=at_least(1), metavar="K", help="enlarge each tile K times (default: automatic)")
    p.add_argument("-k", "--top", type=int, default=5, help="predictions to show (0: none; default: %(default)s)")
    p.add_argument("--grid-only", action="store_true", help="write the grid alone, without the input and the predictions")
    p.add_argument("--every", type=int, default=1, metavar="N", help="video: use every N-th frame (default: %(default)s)")
    p.add_argument("--max-frames", type=int, metavar="N", help="video: stop after N frames")
    add_json_option(p, "print the predictions (and outputs) as JSON")
    add_autocast_option(p, "the forward passes")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._fs import atomic_path
    from ..activations import activation_views, compose_view
    from ..capture.layouts import parse_query
    from ..io import is_video, load_image
    from ..predictions import class_scores_problem
    from ..render import as_image

    if args.every < 1 or (args.max_frames is not None and args.max_frames < 1) or args.top < 0:
        raise DeepvisError("--every and --max-frames must be at least 1, --top at least 0")
    query = parse_query(args.query)
    src = existing_input(args.input)
    model = model_from_args(args)
    problem = class_scores_problem(model)
    if problem is not None and args.top > 0 and not args.grid_only:
        print(f"deepvis: note: no predictions: {problem}", file=sys.stderr)
    opts = dict(
        normalize=args.normalize,
        colormap=args.colormap,
        highlight=args.unit,
        scale=args.scale,
        k=args.top,
        query=query,
        autocast=args.autocast,
    )
    render = (lambda v: v.picture) if args.grid_only else (lambda v: compose_view(v))
    out = Path(args.output)
    if is_video(src):
        return _video(args, model, src, out, opts, render)
    fmt = image_format(out)
    image = load_image(src, model.preprocessing.pil_mode)
    view = next(activation_views(model, [image], args.layer, **opts))
    with atomic_path(out) as tmp:
        as_image(render(view)).save(tmp, format=fmt)
    _report(args, [(str(args.input), view.predictions)], str(out))
    return 0


def _report(args: argparse.Namespace, rows: list[tuple[str, list[Prediction]]], output: str) -> None:
    if args.json:
        print_json(
            {"output": output, "layer": args.layer, "inputs": [{"input": i, "predictions": [p.to_dict() for p in ps]} for i, ps in rows]}
        )
        return
    for name, preds in rows:
        if preds:
            print(f"{name}: " + "; ".join(f"{p.label.split(',')[0]} {p.probability * 100:.1f}%" for p in preds))
    print(f"wrote {output}", file=sys.stderr)


def _video(
    args: argparse.Namespace, model: Model, src: Path, out: Path, opts: dict[str, Any], render: Callable[[ActivationView], Any]
) -> int:
    from .._fs import atomic_path
    from ..activations import activation_views
    from ..io import VIDEO_SUFFIXES, VideoWriter, read_frames, video_info
    from ..render import as_image

    if out.suffix.lower() in IMAGE_FORMATS:
        raise DeepvisError(
            f"{src.name} is a video: OUT is a video file ({', '.join(sorted(VIDEO_SUFFIXES))}) or a folder, not the picture {out.name}"
        )
    total, fps = video_info(src)
    count = None
    if total:
        count = -(-total // args.every)
        if args.max_frames:
            count = min(count, args.max_frames)
    frames = (im for _, im in read_frames(src, step=args.every, max_frames=args.max_frames))
    views = activation_views(model, frames, args.layer, **opts)
    bar = progress(total=count, desc="frames", unit="frame")
    last_preds: list[Prediction] = []
    n = 0
    if out.suffix.lower() in VIDEO_SUFFIXES:
        with atomic_path(out) as tmp, VideoWriter(tmp, fps=fps / args.every) as writer:
            for view in views:
                writer.write(as_image(render(view)))
                last_preds = view.predictions
                n += 1
                bar.update()
    else:
        if out.exists() and not out.is_dir():
            raise DeepvisError(f"{out} exists and is not a folder: give a video file name or a folder for the frames")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmpdir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            for view in views:
                as_image(render(view)).save(tmpdir / f"frame_{n:06d}.png")
                last_preds = view.predictions
                n += 1
                bar.update()
            out.mkdir(exist_ok=True)
            for f in sorted(tmpdir.iterdir()):
                f.replace(out / f.name)
        finally:
            shutil.rmtree(tmpdir, ignore_errors=True)
    bar.close()
    _report(args, [(f"{args.input} (last of {n} frames)", last_preds)], str(out))
    return 0
