"""``deepvis backprop``: which input pixels drive a unit (gradient, deconvnet or guided backprop)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_model_options, model_from_args, print_json

_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def register(sub: argparse._SubParsersAction) -> None:
    from ..backprop import FILTERS, MODES
    from ..render import COLORMAPS

    p = sub.add_parser(
        "backprop",
        help="show which input pixels drive a unit (gradient, deconv, guided backprop)",
        description="Backpropagate from one unit to the input IMAGE and draw the result. The backward pass starts "
        "at the unit's activation: its whole channel map, one position (LAYER:C@Y,X), or the map's peak (--at max). "
        "Class scores are units of the layer `logits` (e.g. logits:967).",
    )
    p.add_argument("input", metavar="IMAGE", help="image file, or sample:NAME (see `deepvis samples`)")
    p.add_argument("--unit", required=True, metavar="LAYER:C[@Y,X]", help="the unit, e.g. blocks.3:17, blocks.3:17@5,5 or logits:967")
    p.add_argument("--mode", choices=MODES, default="guided", help="backward rule at ReLU-like units (default: %(default)s)")
    p.add_argument("--at", choices=("max",), help="start at the position where the channel map peaks")
    p.add_argument("--filter", choices=FILTERS, default="raw", help="display filter (default: %(default)s)")
    p.add_argument("--colormap", default="gray", help=f"colormap for gray/norm/normblur: {', '.join(COLORMAPS)} or any matplotlib name")
    p.add_argument(
        "--percentile", type=float, default=99.5, help="scale by this percentile of the magnitudes (100: the maximum; default: %(default)s)"
    )
    p.add_argument("--overlay", action="store_true", help="blend the view over the input image")
    p.add_argument("--alpha", type=float, default=0.6, help="weight of the view in --overlay (default: %(default)s)")
    p.add_argument(
        "--seed",
        choices=("activation", "one"),
        default="activation",
        help="seed of the backward pass: the unit's activation (default) or 1",
    )
    p.add_argument(
        "--allow-plain",
        action="store_true",
        help="deconv/guided on models with SiLU, GELU, ...: keep their plain gradient (warns) instead of stopping",
    )
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output picture (.png, .jpg or .webp)")
    p.add_argument("--json", action="store_true", help="print the unit, position, activation and output as JSON")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import warnings

    from PIL import Image

    from .._fs import atomic_path
    from ..backprop import PlainGradientWarning, backprop_image, backprop_view, overlay
    from ..capture import parse_unit
    from ..errors import DeepvisError, InputError
    from ..io import load_image, resolve_input

    out = Path(args.output)
    if out.suffix.lower() not in _FORMATS:
        raise DeepvisError(f"output {out} should be a .png, .jpg or .webp file")
    if not 0 <= args.alpha <= 1:
        raise DeepvisError("--alpha must be between 0 and 1")
    if not 0 < args.percentile <= 100:
        raise DeepvisError("--percentile must be in (0, 100]")
    unit = parse_unit(args.unit)
    src = resolve_input(args.input)
    if not src.exists():
        raise InputError(f"input not found: {src}")
    model = model_from_args(args)
    image = load_image(src, model.preprocessing.pil_mode)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PlainGradientWarning)
        result = backprop_view(model, model.preprocess(image), unit, args.mode, at=args.at, seed=args.seed, strict=not args.allow_plain)
    for w in caught:
        print(f"deepvis: warning: {w.message}", file=sys.stderr)
    view = backprop_image(result, args.filter, colormap=args.colormap, percentile=args.percentile)
    if args.overlay:
        view = overlay(model.preprocessing.fit(image), view, alpha=args.alpha)
    with atomic_path(out) as tmp:
        Image.fromarray(view).save(tmp, format=_FORMATS[out.suffix.lower()])
    if args.json:
        print_json({"output": str(out), "input": str(args.input), "filter": args.filter, "overlay": args.overlay, **result.to_dict()})
    else:
        pos = f" at {result.unit.position[0]},{result.unit.position[1]}" if result.unit.position else ""
        print(f"{result.unit} ({args.mode}{pos}): activation {result.activation:.4g}")
        print(f"wrote {out}", file=sys.stderr)
    return 0
