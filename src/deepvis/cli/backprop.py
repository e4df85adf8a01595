"""``deepvis backprop``: which input pixels drive a unit (gradient, deconvnet or guided backprop)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..choices import BACKPROP_AT, BACKPROP_FILTERS, BACKPROP_MODES, BACKPROP_SEEDS, OVERLAY_ALPHA, READABLE_BACKPROP
from ..errors import DeepvisError
from .common import (
    SAMPLE_HELP,
    add_colormap_option,
    add_json_option,
    add_model_options,
    add_output_option,
    existing_input,
    image_format,
    model_from_args,
    print_json,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "backprop",
        help="show which input pixels drive a unit (gradient, deconv, guided backprop)",
        description="Backpropagate from one unit to the input IMAGE and draw the result. The backward pass starts "
        "at the unit's activation: its whole channel map, one position (LAYER:C@Y,X), or the map's peak (--at max). "
        "Class scores are units of the layer `logits` (e.g. logits:967).",
    )
    p.add_argument("input", metavar="IMAGE", help=f"image file, or {SAMPLE_HELP}")
    p.add_argument("--unit", required=True, metavar="LAYER:C[@Y,X]", help="the unit, e.g. blocks.3:17, blocks.3:17@5,5 or logits:967")
    p.add_argument("--mode", choices=BACKPROP_MODES, default="guided", help="backward rule at ReLU-like units (default: %(default)s)")
    p.add_argument("--at", choices=BACKPROP_AT, help="start at the position where the channel map peaks")
    p.add_argument(
        "--filter",
        choices=BACKPROP_FILTERS,
        default=READABLE_BACKPROP.filter,
        help="display filter (default: %(default)s, as the live toolbox opens)",
    )
    add_colormap_option(p, "colormap for gray/norm/normblur")
    p.add_argument(
        "--percentile",
        type=float,
        default=READABLE_BACKPROP.percentile,
        help="scale by this percentile of the magnitudes (100: the maximum; default: %(default)s; the raw view: --filter raw --percentile 100)",
    )
    p.add_argument("--overlay", action="store_true", help="blend the view over the input image")
    p.add_argument("--alpha", type=float, metavar="ALPHA", help=f"weight of the view in --overlay, 0-1 (default: {OVERLAY_ALPHA})")
    p.add_argument(
        "--seed",
        choices=BACKPROP_SEEDS,
        default="activation",
        help="seed of the backward pass: the unit's activation (default) or 1",
    )
    p.add_argument(
        "--allow-plain",
        action="store_true",
        help="deconv/guided on models with SiLU, GELU, ...: keep their plain gradient (warns) instead of stopping",
    )
    add_output_option(p, metavar="OUT", help="output picture (.png, .jpg or .webp)")
    add_json_option(p, "print the unit, position, activation and output as JSON")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from PIL import Image

    from .._fs import atomic_path
    from ..backprop import PlainGradientWarning, backprop_image, backprop_view, overlay
    from ..capture import parse_unit
    from ..io import load_image

    out = Path(args.output)
    fmt = image_format(out)
    if args.alpha is not None and not args.overlay:
        raise DeepvisError("--alpha weighs the view in --overlay: add --overlay, or drop --alpha")
    if args.alpha is not None and not 0 <= args.alpha <= 1:
        raise DeepvisError("--alpha must be between 0 and 1")
    if not 0 < args.percentile <= 100:
        raise DeepvisError("--percentile must be in (0, 100]")
    unit = parse_unit(args.unit)
    src = existing_input(args.input)
    model = model_from_args(args)
    image = load_image(src, model.preprocessing.pil_mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PlainGradientWarning)
        result = backprop_view(model, model.preprocess(image), unit, args.mode, at=args.at, seed=args.seed, strict=not args.allow_plain)
    for w in caught:
        print(f"deepvis: warning: {w.message}", file=sys.stderr)
    view = backprop_image(result, args.filter, colormap=args.colormap, percentile=args.percentile)
    if args.overlay:
        view = overlay(model.preprocessing.fit(image), view, alpha=OVERLAY_ALPHA if args.alpha is None else args.alpha)
    with atomic_path(out) as tmp:
        Image.fromarray(view).save(tmp, format=fmt)
    if args.json:
        print_json({"output": str(out), "input": str(args.input), "filter": args.filter, "overlay": args.overlay, **result.to_dict()})
    else:
        pos = f" at {result.unit.position[0]},{result.unit.position[1]}" if result.unit.position else ""
        print(f"{result.unit} ({args.mode}{pos}): activation {result.activation:.4g}")
        print(f"wrote {out}", file=sys.stderr)
    return 0
