"""``deepvis layers``: every capturable layer with its output shape and unit count."""

from __future__ import annotations

import argparse

from .common import add_json_option, add_model_options, model_from_args, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "layers",
        help="list the layers (module paths) whose outputs deepvis can show",
        description="List every module whose output is a (N,C,H,W) or (N,C) tensor, in execution order: its name "
        "(the module path; 'logits' is the model output), type, output shape and number of units. "
        "Address a unit as LAYER:CHANNEL or LAYER:CHANNEL@Y,X.",
    )
    add_json_option(p)
    p.add_argument("--filter", metavar="TEXT", help="only layers whose name contains TEXT")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..capture import layer_table

    model = model_from_args(args)
    rows = [r for r in layer_table(model) if not args.filter or args.filter in r.name]
    if args.json:
        print_json({"model": model.name, "input_shape": list(model.preprocessing.input_shape), "layers": [r.to_dict() for r in rows]})
        return 0
    width = max((len(r.name) for r in rows), default=5)
    print(f"{'layer':<{width}}  {'type':<22} {'output shape':<16} units")
    for r in rows:
        shape = "x".join(str(s) for s in r.shape)
        calls = f"  (runs {r.calls}x; last call shown)" if r.calls > 1 else ""
        print(f"{r.name:<{width}}  {r.type:<22} {shape:<16} {r.units}{calls}")
    return 0
