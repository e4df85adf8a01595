"""``deepvis score``: quality figures for a folder of ``deepvis optimize`` results (transfer, beats-top-k, plausibility)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .common import add_json_option, add_model_options, model_from_args, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "score",
        help="judge a folder of optimize results with other models (transfer, beats-top-k, plausibility, contrast)",
        description="Read the <unit>.json records of a `deepvis optimize` folder and judge each <unit>_raw.png: "
        "transfer (class objectives: rank and probability of the class under each --judge), and with --atlas "
        "(an atlas of the optimized model) beats-top-k (the unit's activation against its top-9 dataset images) and "
        "plausibility (cosine similarity in each judge's penultimate features to those images); and the contrast "
        "(RMS distance from the mean image; under 2 levels the image is flagged faint: flat grey as the model saw "
        "it, its display version a magnified pattern). A judge that is the optimized model is flagged (* in the "
        "table). Writes DIR/scores.json.",
    )
    p.add_argument("folder", metavar="DIR", help="a folder written by `deepvis optimize`")
    p.add_argument(
        "--judge", action="append", metavar="MODEL", help="a model that judges the images (repeatable; default: lite1 and lite2)"
    )
    p.add_argument("--atlas", metavar="ATLAS", help="an atlas of the optimized model (--model): beats-top-k and plausibility")
    add_json_option(p, "print the scores as JSON")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .._fs import atomic_path
    from ..atlas import open_atlas
    from ..errors import InputError
    from ..scores import DEFAULT_JUDGES, load_judges, score_folder, summary_line

    folder = Path(args.folder)
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder of optimize results")
    if not any(folder.glob("*.json")):
        raise InputError(f"{folder} holds no optimize results (<unit>.json records next to their _raw.png images)")
    if args.atlas is not None and not Path(args.atlas).is_dir():
        raise InputError(f"atlas {args.atlas} is not a folder")
    judges = load_judges(list(args.judge or DEFAULT_JUDGES), args.device)
    optimized = model_from_args(args) if args.atlas is not None else None
    skipped: list[tuple[str, str]] = []
    if args.atlas is not None:
        with open_atlas(args.atlas) as atlas:
            rows = score_folder(folder, judges, atlas=atlas, optimized=optimized, skipped=skipped)
    else:
        rows = score_folder(folder, judges, skipped=skipped)
    with atomic_path(folder / "scores.json") as tmp:
        tmp.write_text(json.dumps(rows, indent=1) + "\n")
    if args.json:
        print_json(rows)
    else:
        for row in rows:
            s = row["scores"]
            print(f"{row['unit'] or row['objective']}: {summary_line(s) or 'no figure (not a class; give --atlas)'}")
            for flag in s["flags"]:
                print(f"  note: {flag}")
        print(f"scored {len(rows)} results; wrote {folder / 'scores.json'}", file=sys.stderr)
    if skipped:  # the others are scored and written; the broken ones are named, and the exit status says so
        for name, why in skipped:
            print(f"skipped {name}: {why}", file=sys.stderr)
        print(f"deepvis: error: {len(skipped)} of {len(rows) + len(skipped)} records could not be scored (listed above)", file=sys.stderr)
        return 2
    return 0
