"""``deepvis models``: the built-in model names and the other ways to name a model."""

from __future__ import annotations

import argparse

from ..choices import MODEL_SPEC_HELP
from .common import add_common_options, add_json_option, print_json

#: what ``--weights random`` gives, as ``deepvis models`` says it
RANDOM_HELP = (
    "--weights random builds any built-in, torchvision:NAME or timm:NAME architecture untrained "
    "(random weights, seed 0: the same every run), with nothing downloaded"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list built-in models and how to name others",
        description="List the built-in models and the other ways to name a model.",
    )
    add_json_option(p)
    add_common_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..models import registry

    rows = [{"name": e.name, "description": e.description} for e in registry]
    if args.json:
        print_json({"builtin": rows, "other": MODEL_SPEC_HELP, "random_weights": RANDOM_HELP})
        return 0
    for r in rows:
        print(f"{r['name']:<10} {r['description']}")
    print(f"\nAlso: {MODEL_SPEC_HELP}")
    print(f"{RANDOM_HELP}.")
    return 0
