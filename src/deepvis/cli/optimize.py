"""``deepvis optimize``: activation maximization of units or classes (the paper's presets, batched)."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..choices import LR_POLICIES, OBJECTIVE_KINDS, OPTIMIZERS
from ..errors import DeepvisError, LayerError
from .common import add_json_option, add_model_options, add_output_option, add_synthesis_options, model_from_args, print_json, progress

if TYPE_CHECKING:
    from ..capture import Unit
    from ..models import Model


def _scale_range(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad scale range {text!r}: write LOW,HIGH, e.g. 0.9,1.1") from None
    if len(vals) == 1:
        vals = (vals[0], vals[0])
    if len(vals) != 2:
        raise argparse.ArgumentTypeError(f"bad scale range {text!r}: write LOW,HIGH, e.g. 0.9,1.1")
    return vals[0], vals[1]


def _position(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"\s*(\d+)\s*,\s*(\d+)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad position {text!r}: write Y,X, e.g. 4,4")
    return int(m[1]), int(m[2])


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "optimize",
        help="synthesize the image that maximizes a unit or a class (activation maximization)",
        description="Regularized activation maximization (Yosinski et al. 2015). Optimizes all the given units "
        "together in batches and writes, per unit, <unit>_raw.png (exactly as the model saw it), <unit>.png "
        "(contrast-stretched for viewing), <unit>.json (objective trace, best value, every setting), and "
        "montage.png. Presets 1-4 are the paper's Table 1 (0-255 pixels at 227 px, mapped to the model); "
        "every setting can be overridden.",
    )
    t = p.add_argument_group("what to maximize")
    t.add_argument("--layer", help="layer of the units (see `deepvis layers`)")
    t.add_argument("--units", metavar="SPEC", help="channels of --layer: 7, 0-15, 3,9,12 or all")
    t.add_argument("--at", type=_position, metavar="Y,X", help="position in the layer's map (default: its center)")
    t.add_argument(
        "--class", dest="classes", action="append", default=[], metavar="NAME", help="a class logit by name or index (repeatable)"
    )
    t.add_argument(
        "--objective",
        choices=OBJECTIVE_KINDS,
        default="neuron",
        help="a unit at one position (the paper's choice) or the channel's mean (default: %(default)s)",
    )
    s = p.add_argument_group("settings (override the preset)")
    add_synthesis_options(s)
    s.add_argument("--decay", type=float, help="θ_decay: L2 decay toward the mean image per step")
    s.add_argument("--blur-width", type=float, help="θ_b_width: Gaussian blur σ in px at 227 px")
    s.add_argument("--blur-every", type=int, help="θ_b_every: blur every N steps (0: never)")
    s.add_argument("--norm-pct", type=float, help="θ_n_pct: zero pixels whose norm is below this percentile")
    s.add_argument("--contrib-pct", type=float, help="θ_c_pct: zero pixels whose contribution is below this percentile")
    s.add_argument("--lr-policy", choices=LR_POLICIES, help="constant, or progress: min(lr, desired_prog/|g|^2)")
    s.add_argument("--lr", type=float, help="learning rate (the maximum for the progress policy; Adam's step size)")
    s.add_argument("--desired-prog", type=float, help="desired progress per step (progress policy)")
    s.add_argument("--start-std", type=float, help="std of the start noise, 0-255 pixels (default 10)")
    s.add_argument("--optimizer", choices=OPTIMIZERS, help="sgd (the paper) or adam")
    s.add_argument("--fourier", action=argparse.BooleanOptionalAction, default=None, help="Fourier (1/f-scaled) parameterization")
    s.add_argument("--decay-power", type=float, help="Fourier parameterization: gain 1/f^P")
    s.add_argument("--decorrelate", action=argparse.BooleanOptionalAction, default=None, help="decorrelated-color parameterization")
    s.add_argument("--jitter", type=float, help="random shift up to N px (at 227 px) before each step")
    s.add_argument("--scale", type=_scale_range, metavar="LOW,HIGH", help="random scale factor range before each step")
    s.add_argument("--rotate", type=float, metavar="DEG", help="random rotation up to DEG degrees before each step")
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=32, help="units optimized together (default: %(default)s)")
    add_output_option(r, metavar="DIR", help="output folder")
    add_json_option(r, "print a JSON summary")
    add_model_options(p)
    p.set_defaults(func=run)


def unit_slug(unit: str) -> str:
    """A file-name-safe name for a unit: ``blocks.3:7`` → ``blocks.3-7``, ``blocks.3:7@2,3`` → ``blocks.3-7-y2x3``."""
    layer, _, rest = unit.partition(":")
    ch, _, pos = rest.partition("@")
    slug = f"{layer}-{ch}"
    if pos:
        y, x = pos.split(",")
        slug += f"-y{y}x{x}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", slug)


def _targets(args: argparse.Namespace, model: Model) -> list[Unit]:
    from ..capture import LOGITS, Unit, get_layer, layer_table, parse_unit_set
    from ..optimize import canvas_size

    units: list[Unit] = []
    if args.layer is not None:
        if args.units is None:
            raise DeepvisError("--layer needs --units (e.g. --units 0-15, or all)")
        hw = canvas_size(model, args.size)
        table = {i.name: i for i in layer_table(model, (model.preprocessing.channels, *hw))}
        if args.layer not in table:
            get_layer(model, args.layer)  # raises with suggestions
            raise LayerError(f"layer {args.layer!r} cannot be optimized")
        info = table[args.layer]
        units += [Unit(args.layer, ch, args.at) for ch in parse_unit_set(args.units, info.units)]
    elif args.units is not None or args.at is not None:
        raise DeepvisError("--units and --at need --layer")
    for name in args.classes:
        units.append(Unit(LOGITS, model.class_index(name)))
    if not units:
        raise DeepvisError("nothing to optimize: give --layer L --units SPEC and/or --class NAME")
    return list(dict.fromkeys(units))


def run(args: argparse.Namespace) -> int:
    from .._fs import atomic_path
    from ..optimize import get_preset, visualize
    from ..render import montage

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise DeepvisError(f"{out} exists and is not a folder: give a folder for the outputs")
    if args.batch_size < 1:
        raise DeepvisError("--batch-size must be at least 1")
    overrides = {
        "decay": args.decay,
        "blur_width": args.blur_width,
        "blur_every": args.blur_every,
        "norm_pct": args.norm_pct,
        "contrib_pct": args.contrib_pct,
        "lr_policy": args.lr_policy,
        "lr": args.lr,
        "desired_prog": args.desired_prog,
        "start_std": args.start_std,
        "optimizer": args.optimizer,
        "fourier": args.fourier,
        "decay_power": args.decay_power,
        "decorrelate": args.decorrelate,
        "jitter": args.jitter,
        "scale": args.scale,
        "rotate": args.rotate,
    }
    settings = get_preset(args.preset).replace(steps=args.steps, **overrides)  # bad settings fail before the model loads
    model = model_from_args(args)
    units = _targets(args, model)
    batches = -(-len(units) // args.batch_size)
    bar = progress(total=settings.steps * batches, desc="optimize", unit="step")

    def on_progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    try:
        results = visualize(
            model,
            units,
            preset=settings,
            size=args.size,
            seed=args.seed,
            batch_size=args.batch_size,
            kind=args.objective,
            progress=on_progress,
        )
    finally:
        bar.close()
    rows: list[dict[str, Any]] = []
    for res in results:
        slug = unit_slug(res.unit or res.objective)
        files = {"raw": str(out / f"{slug}_raw.png"), "display": str(out / f"{slug}.png"), "record": str(out / f"{slug}.json")}
        with atomic_path(files["raw"]) as tmp:
            res.raw_image().save(tmp, format="PNG")
        with atomic_path(files["display"]) as tmp:
            res.display_image().save(tmp, format="PNG")
        record = res.to_dict()
        record["files"] = {k: Path(v).name for k, v in files.items()}
        with atomic_path(files["record"]) as tmp:
            tmp.write_text(json.dumps(record, indent=1) + "\n")
        rows.append(
            {
                "unit": res.unit,
                "label": res.label,
                "objective": res.objective,
                "value": res.value,
                "start_value": res.start_value,
                "best_step": res.best_step,
                "dead": res.dead,
                "dead_step": res.dead_step,
                "files": files,
            }
        )
        if res.dead:
            print(f"{res.unit}: dead unit (gradient exactly 0 at step {res.dead_step})", file=sys.stderr)
    labels = [(f"{r.label or ''}" if r.label else (r.unit or r.objective)) for r in results]
    mont = out / "montage.png"
    with atomic_path(mont) as tmp:
        montage([r.display_image() for r in results], labels=labels, tile=min(160, max(results[0].size))).save(tmp, format="PNG")
    if args.json:
        print_json(
            {
                "output": str(out),
                "montage": str(mont),
                "model": model.name,
                "settings": settings.to_dict(),
                "size": list(results[0].size),
                "seed": args.seed,
                "units": rows,
            }
        )
    else:
        for row in rows:
            name = row["unit"] + (f" ({row['label']})" if row["label"] else "")
            state = " DEAD (zero gradient)" if row["dead"] else ""
            print(f"{name}: {row['start_value']:.4g} -> {row['value']:.4g} at step {row['best_step']}{state}")
        print(f"wrote {len(rows)} units and {mont}", file=sys.stderr)
    return 0
