"""``deepvis atlas-show``: one unit of an atlas as the original toolbox's pane (synthesized image, top-9, their deconv views)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import add_common_options, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "atlas-show",
        help="show one unit of an atlas (synthesized image, top inputs, their views), or list the atlas",
        description="Write a PNG for one unit of ATLAS: its synthesized image, the crops of its top inputs and their "
        "deconv views, with its statistics. Without --unit, list the atlas's layers.",
    )
    p.add_argument("atlas", metavar="ATLAS", help="atlas folder made by `deepvis atlas`")
    p.add_argument(
        "--unit",
        metavar="LAYER:CHANNEL[@TOKEN]",
        help="the unit, e.g. blocks.3:17, or blocks.5:17@cls for a prefix token (mined as the layer blocks.5@cls)",
    )
    p.add_argument("-o", "--output", metavar="OUT.png", help="output PNG (needed with --unit)")
    p.add_argument("--tile", type=int, default=96, metavar="PX", help="size of each small image (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print the unit's (or the atlas's) record as JSON")
    add_common_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..atlas import open_atlas
    from ..capture import parse_unit
    from ..errors import DeepvisError

    if args.tile < 16:
        raise DeepvisError("--tile must be at least 16 pixels")
    with open_atlas(args.atlas) as atlas:
        if args.unit is None:
            if args.output:
                raise DeepvisError("-o writes one unit's picture: give --unit LAYER:C (without --unit the atlas is listed)")
            return _list(atlas, args)
        unit = parse_unit(args.unit)
        if unit.position is not None:
            raise DeepvisError(f"atlas units have no position: write {unit.layer}:{unit.channel}")
        if not args.output:
            raise DeepvisError("give -o OUT.png for the unit's picture")
        out = Path(args.output)
        if out.suffix.lower() != ".png":
            raise DeepvisError(f"output {out} should be a .png file")
        rec = atlas.unit(unit.layer_key, unit.channel)  # a prefix token is its own layer, LAYER@TOKEN
        if not rec.top:
            raise DeepvisError(f"unit {unit} has no entries yet: its layer is not mined (run `deepvis atlas` again to finish)")
        from .._fs import atomic_path
        from ..atlas.show import unit_pane

        pane = unit_pane(rec, tile=args.tile)
        with atomic_path(out) as tmp:
            pane.save(tmp, format="PNG")
        if args.json:
            print_json({"output": str(out), **_unit_json(rec)})
        else:
            print(f"wrote {out}", file=sys.stderr)
    return 0


def _unit_json(rec) -> dict:
    return {
        "layer": rec.layer,
        "unit": rec.unit,
        "stats": rec.stats.to_dict() if rec.stats else None,
        "top": [
            {
                "rank": t.rank,
                "value": t.value,
                "sample": t.sample,
                "key": t.key,
                "label": t.label,
                "position": list(t.position) if t.position else None,
                "crop": str(t.crop) if t.crop else None,
                "view": str(t.view) if t.view else None,
            }
            for t in rec.top
        ],
        "synth": None
        if rec.synth is None
        else {"image": str(rec.synth.image), "raw": str(rec.synth.raw), "value": rec.synth.value, "info": rec.synth.info},
    }


def _list(atlas, args: argparse.Namespace) -> int:
    layers = atlas.layers()
    if args.json:
        print_json(
            {
                "meta": atlas.meta,
                "layers": [
                    {
                        "name": r.name,
                        "units": r.units,
                        "shape": list(r.shape),
                        "mined": r.mined,
                        "params": r.params,
                        "synth_params": r.synth_params,
                    }
                    for r in layers
                ],
                "skipped": [{"sample": i, "key": k, "reason": why} for i, k, why in atlas.skipped()],
            }
        )
        return 0
    meta = atlas.meta
    print(f"atlas {atlas.root}: model {meta.get('model')}, dataset {meta.get('dataset')} ({meta.get('samples')} inputs)")
    for r in layers:
        state = "mined" if r.mined else "mining not finished"
        print(f"  {r.name:<24} {r.units:>5} units  {'x'.join(map(str, r.shape)):<12} {state}")
    skipped = atlas.skipped()
    if skipped:
        print(f"  {len(skipped)} input(s) skipped as unreadable")
    return 0
