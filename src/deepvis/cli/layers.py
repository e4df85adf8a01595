"""``deepvis layers``: every viewable layer with its layout, output shape and unit count."""

from __future__ import annotations

import argparse
import sys

from .common import add_json_option, add_model_options, model_from_args, print_json

#: at most this many "cannot tell the layout" lines; the rest are counted
_NOTES = 5


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "layers",
        help="list the layers (module paths) whose outputs deepvis can show",
        description="List every module whose output deepvis can show, in execution order: its name "
        "(the module path; 'logits' is the model output), type, layout (maps = N,C,H,W; maps-last = N,H,W,C; "
        "tokens P+HxW = P prefix tokens and an HxW patch grid; vector = N,C), output shape as every tool reads it "
        "(C,H,W or C) and number of units. Address a unit as LAYER:CHANNEL, LAYER:CHANNEL@Y,X (a position or a patch) "
        "or LAYER:CHANNEL@cls (a prefix token by name, or #K).",
    )
    add_json_option(p)
    p.add_argument("--filter", metavar="TEXT", help="only layers whose name contains TEXT")
    p.add_argument("--all", action="store_true", help="also list the layers that are not viewable, with the reason")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..capture import layer_table
    from ..capture.layers import output_problem

    model = model_from_args(args)  # with the layouts that --layout declares
    table = [r for r in layer_table(model, everything=True) if not args.filter or args.filter in r.name]
    untold = [r for r in table if not r.viewable and r.layout.reason.startswith("cannot tell")]
    for r in untold[:_NOTES]:
        print(f"deepvis: note: {r.layout.reason}", file=sys.stderr)
    if len(untold) > _NOTES:
        print(f"deepvis: note: {len(untold) - _NOTES} more layers whose layout cannot be told (see --all)", file=sys.stderr)
    rows = [r for r in table if args.all or r.viewable]
    if not args.filter and all(r.name != "logits" for r in table):  # the output is not one tensor: say why, and what to do
        problem = output_problem(model)
        if problem is not None:
            print(f"deepvis: note: {problem}", file=sys.stderr)
    if args.json:
        print_json(
            {
                "model": model.name,
                "weights": model.weights.label,
                "input_shape": list(model.preprocessing.input_shape),
                "layers": [r.to_dict() for r in rows],
            }
        )
        return 0
    width = max([5, *(len(r.name) for r in rows)])  # at least the header's "layer"
    lw = max([16, *(len(r.layout.describe()) + 1 for r in rows)])  # "attention 1+14x14" and wider grids fit
    print(f"{'layer':<{width}}  {'type':<22} {'layout':<{lw}} {'output shape':<16} units")
    for r in rows:
        shape = "x".join(str(s) for s in r.shape)
        if not r.viewable:
            print(f"{r.name:<{width}}  {r.type:<22} {r.layout.kind:<{lw}} {shape:<16} -  (not viewable: {r.layout.reason})")
            continue
        calls = f"  (runs {r.calls}x; last call shown)" if r.calls > 1 else ""
        raw = "x".join(str(s) for s in r.raw_shape)
        note = f"  (raw {raw})" if r.raw_shape and r.raw_shape != r.shape else ""
        print(f"{r.name:<{width}}  {r.type:<22} {r.layout.describe():<{lw}} {shape:<16} {r.units}{note}{calls}")
    return 0
