"""``deepvis predict``: the top-k classes for images."""

from __future__ import annotations

import argparse

from ..errors import DeepvisError
from .common import SAMPLE_HELP, add_json_option, add_model_options, model_from_args, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="print the top-k classes of images",
        description="Print the top-k classes of one or more images (sample:NAME for a bundled photo).",
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help=f"image files, or {SAMPLE_HELP}")
    p.add_argument("-k", "--top", type=int, default=5, help="how many classes (default: %(default)s)")
    add_json_option(p)
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..capture import capture
    from ..io import load_image, resolve_input
    from ..predictions import require_class_scores, top_k

    if args.top < 1:
        raise DeepvisError("-k must be at least 1")
    model = model_from_args(args)
    require_class_scores(model)
    paths = [resolve_input(s) for s in args.images]
    images = [load_image(p, model.preprocessing.pil_mode) for p in paths]
    logits = capture(model, model.preprocess(images), ["logits"])["logits"]
    preds = top_k(model, logits, args.top)
    if args.json:
        print_json([{"input": str(s), "predictions": [p.to_dict() for p in row]} for s, row in zip(args.images, preds)])
        return 0
    for s, row in zip(args.images, preds):
        print(s)
        for p in row:
            print(f"  {p.probability * 100:6.2f}%  {p.index:>5}  {p.label}")
    return 0
