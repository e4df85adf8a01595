"""``deepvis atlas``: what every unit of some layers likes, precomputed into a resumable atlas folder."""

from __future__ import annotations

import argparse
import sys

from ..choices import BACKPROP_MODES, DATASET_SPEC_HELP
from .common import (
    add_autocast_option,
    add_engine_options,
    add_json_option,
    add_model_options,
    add_output_option,
    add_synthesis_options,
    at_least,
    engine_from_args,
    model_from_args,
    print_json,
    print_skipped,
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "atlas",
        help="top-k dataset images, their crops and deconv views, and synthesized images for every unit of some layers",
        description="Build a unit atlas in folder ATLAS: one pass over DATASET keeps, for every unit of each layer, its "
        "top-k inputs (conv units: by the maximum of their map) and statistics; then the receptive-field crop and deconv "
        "view of each top input, and the unit's synthesized image. Interrupt it at any time and run the same command "
        "again to continue. Unreadable images are skipped and listed at the end. A prefix token of a token layer (a ViT's "
        "class token) is mined as its own layer of C units, LAYER@TOKEN (e.g. --layers blocks.5,blocks.5@cls, or "
        "--prefix-tokens); its crops are the whole inputs.",
    )
    p.add_argument("dataset", metavar="DATASET", help=DATASET_SPEC_HELP)
    p.add_argument("--layers", required=True, help="comma-separated layer names (see `deepvis layers`); LAYER@cls for a prefix token")
    p.add_argument(
        "--prefix-tokens",
        action="store_true",
        help="also mine every prefix token (class, distillation, register) of each token layer, as LAYER@TOKEN",
    )
    add_output_option(p, metavar="ATLAS", help="atlas folder (created, or continued when it exists)")
    p.add_argument("-k", "--top", type=int, default=9, help="top inputs kept per unit (default: %(default)s)")
    p.add_argument(
        "--units",
        metavar="SPEC",
        help="units of each layer that get views and synthesized images: 7, 0-15, 3,9,12 or all (default: all; mining always covers every unit)",
    )
    p.add_argument("--batch-size", type=at_least(1), default=64, help="inputs per forward pass (default: %(default)s)")
    p.add_argument("--decode-threads", type=int, default=4, metavar="N", help="image decoding threads per process (default: %(default)s)")
    g = p.add_argument_group("views and synthesis")
    g.add_argument(
        "--view-mode",
        choices=BACKPROP_MODES,
        default="deconv",
        help="backprop view of each top input (default: %(default)s)",
    )
    g.add_argument("--no-views", action="store_true", help="skip the crops and backprop views")
    g.add_argument("--no-synthesis", action="store_true", help="skip the synthesized images")
    add_synthesis_options(g, what="synthesis ", size_default="the preset's")
    g.add_argument("--synth-batch", type=int, default=16, metavar="N", help="units optimized together (default: %(default)s)")
    add_engine_options(p)
    p.add_argument(
        "--checkpoint-seconds",
        type=at_least(0, float),
        default=30.0,
        metavar="S",
        help="save mining progress this often (default: %(default)s)",
    )
    p.add_argument(
        "--allow-other-device",
        action="store_true",
        help="continue an atlas started on another device type (cpu/cuda): results then mix devices (within float rounding)",
    )
    add_autocast_option(p, "the mining pass's forward passes (not the crops, views or synthesis)")
    p.add_argument(
        "--allow-other-autocast",
        action="store_true",
        help="continue an atlas mined with another --autocast setting: its statistics then mix precisions",
    )
    add_json_option(p, help="print a JSON summary (with every skipped file)")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..atlas import AtlasOptions, SynthesisOptions, build_atlas
    from ..datasets import open_dataset
    from ..errors import DeepvisError

    for name in ("top", "batch_size", "decode_threads", "synth_batch"):
        if getattr(args, name) < (0 if name == "decode_threads" else 1):
            raise DeepvisError(f"--{name.replace('_', '-')} must be at least {0 if name == 'decode_threads' else 1}")
    if (args.steps is not None and args.steps < 1) or (args.size is not None and args.size < 8):
        raise DeepvisError("--steps must be at least 1 and --size at least 8")
    engine = engine_from_args(args)
    layers = tuple(x.strip() for x in args.layers.split(",") if x.strip())
    if not layers:
        raise DeepvisError("--layers is empty: give comma-separated layer names (see `deepvis layers`)")
    dataset = open_dataset(args.dataset)
    model = model_from_args(args)
    synthesis = None
    if not args.no_synthesis:
        synthesis = SynthesisOptions(
            preset=str(args.preset), steps=args.steps, size=args.size, seed=args.seed, units_per_batch=args.synth_batch
        )
    options = AtlasOptions(
        layers=layers,
        top=args.top,
        batch_size=args.batch_size,
        units=args.units,
        views=not args.no_views,
        view_mode=args.view_mode,
        synthesis=synthesis,
        decode_threads=args.decode_threads,
        checkpoint_seconds=args.checkpoint_seconds,
        prefix_tokens=args.prefix_tokens,
        autocast=args.autocast,
    )
    summary = build_atlas(
        args.output,
        model,
        dataset,
        options,
        allow_other_device=args.allow_other_device,
        allow_other_autocast=args.allow_other_autocast,
        **engine,
    )
    skipped = summary.skipped
    if args.json:
        print_json(
            {
                "atlas": str(summary.root),
                "layers": summary.layers,
                "images_mined": summary.images_mined,
                "units_viewed": summary.units_viewed,
                "units_synthesized": summary.units_synthesized,
                "seconds": summary.seconds,
                "skipped": [{"sample": i, "key": k, "reason": r} for i, k, r in skipped],
            }
        )
    else:
        print(
            f"atlas {summary.root}: {', '.join(summary.layers)}; this run mined {summary.images_mined} images, "
            f"made views for {summary.units_viewed} units and synthesized {summary.units_synthesized}"
        )
    if skipped:
        print_skipped([(key, reason) for _i, key, reason in skipped])
        if len({i for i, _k, _r in skipped}) >= len(dataset):
            print(
                f"deepvis: error: none of the {len(dataset)} inputs of {args.dataset} could be read: the atlas holds nothing",
                file=sys.stderr,
            )
            return 2
    return 0
