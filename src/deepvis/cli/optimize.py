"""``deepvis optimize``: activation maximization of units or classes (the paper's presets, batched)."""

from __future__ import annotations

import argparse
import json
import re
import signal
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..choices import LR_POLICIES, OBJECTIVE_KINDS, OPTIMIZERS, PARAMETERIZATIONS
from ..errors import DeepvisError, LayerError
from .common import (
    add_json_option,
    add_model_options,
    add_output_option,
    add_synthesis_options,
    existing_input,
    model_from_args,
    print_json,
    progress,
)

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
        "every setting can be overridden. A prefix token of a token layer (a ViT's class token) is a vector of units: "
        "--unit blocks.5:17@cls, or --layer blocks.5 --units 0-15 --token cls. MACO (--preset maco or --param maco) also writes "
        "<unit>_alpha.png and <unit>_masked.png; --from IMAGE starts from a photo (feature accentuation). Records "
        "carry quality figures: for classes from other models (--judge; see also `deepvis score`), and for every "
        "unit the image's contrast (a faint image, within 2 levels RMS of the mean image, is flagged).",
    )
    t = p.add_argument_group("what to maximize")
    t.add_argument("--layer", help="layer of the units (see `deepvis layers`)")
    t.add_argument("--units", metavar="SPEC", help="channels of --layer: 7, 0-15, 3,9,12 or all")
    t.add_argument("--at", type=_position, metavar="Y,X", help="position in the layer's map (default: its center)")
    t.add_argument(
        "--token",
        metavar="NAME",
        help="a prefix token of a token layer (cls, dist, reg0, or #K): maximize the --units channels of that token",
    )
    t.add_argument(
        "--unit",
        dest="unit_specs",
        action="append",
        default=[],
        metavar="UNIT",
        help="a unit by address (repeatable): LAYER:C, LAYER:C@Y,X, LAYER:C@cls (a prefix token) or logits:N",
    )
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
    s.add_argument(
        "--param",
        choices=PARAMETERIZATIONS,
        help="image parameterization: pixel, fourier (= --fourier), or maco (phase only, natural magnitude; writes "
        "<unit>_alpha.png and <unit>_masked.png)",
    )
    s.add_argument("--decay-power", type=float, help="Fourier parameterization: gain 1/f^P")
    s.add_argument("--decorrelate", action=argparse.BooleanOptionalAction, default=None, help="decorrelated-color parameterization")
    s.add_argument("--jitter", type=float, help="random shift up to N px (at 227 px) before each step")
    s.add_argument("--scale", type=_scale_range, metavar="LOW,HIGH", help="random scale factor range before each step")
    s.add_argument("--rotate", type=float, metavar="DEG", help="random rotation up to DEG degrees before each step")
    s.add_argument(
        "--calibrate",
        choices=("on", "off"),
        help="map lr and desired_prog onto each unit's measured gradient and activation scale (default: on for "
        "presets 1-4 and none; off: the literal Table 1 values; Adam presets are never calibrated)",
    )
    a = p.add_argument_group("feature accentuation (start from a real image)")
    a.add_argument(
        "--from",
        dest="start",
        metavar="IMAGE",
        help="start every unit from this image (a path or sample:NAME) instead of noise, and stay close to it",
    )
    a.add_argument("--distance", type=float, metavar="LEVELS", help="--from: bound on the RMS change, 0-255 levels (default 24)")
    a.add_argument("--feature-weight", type=float, metavar="W", help="--from: weight of the feature anchor (default 1; 0: pixels only)")
    q = p.add_argument_group("quality figures (in each <unit>.json and the montage)")
    q.add_argument(
        "--judge",
        action="append",
        metavar="MODEL",
        help="a model that judges the images (repeatable; default: lite1 and lite2; none: no figures)",
    )
    r = p.add_argument_group("run")
    r.add_argument("--batch-size", type=int, default=32, help="units optimized together (default: %(default)s)")
    add_output_option(r, metavar="DIR", help="output folder")
    add_json_option(r, "print a JSON summary")
    add_model_options(p)
    p.set_defaults(func=run)


def unit_slug(unit: str) -> str:
    """A file-name-safe name for a unit: ``blocks.3:7`` → ``blocks.3-7``, ``blocks.3:7@2,3`` → ``blocks.3-7-y2x3``,
    ``blocks.5:17@cls`` → ``blocks.5-17-cls``, ``blocks.5:17@#1`` → ``blocks.5-17-t1``."""
    layer, _, rest = unit.partition(":")
    ch, _, pos = rest.partition("@")
    slug = f"{layer}-{ch}"
    if "," in pos:
        y, x = pos.split(",")
        slug += f"-y{y}x{x}"
    elif pos:
        slug += f"-{pos.replace('#', 't')}"
    return re.sub(r"[^A-Za-z0-9._-]", "_", slug)


def _targets(args: argparse.Namespace, model: Model) -> list[Unit]:
    from ..capture import LOGITS, Unit, get_layer, layer_table, parse_unit, parse_unit_set
    from ..optimize import canvas_size

    units: list[Unit] = []
    if args.layer is not None:
        if args.units is None:
            raise DeepvisError("--layer needs --units (e.g. --units 0-15, or all)")
        token = args.token.strip().lower() if args.token is not None else None
        if token is not None and args.at is not None:
            raise DeepvisError("give --at (a position) or --token (a prefix token), not both")
        hw = canvas_size(model, args.size)
        table = {i.name: i for i in layer_table(model, (model.preprocessing.channels, *hw))}
        if args.layer not in table:
            get_layer(model, args.layer)  # raises with suggestions
            raise LayerError(f"layer {args.layer!r} cannot be optimized")
        info = table[args.layer]
        units += [Unit(args.layer, ch, args.at, token) for ch in parse_unit_set(args.units, info.units, info.name)]
    elif args.units is not None or args.at is not None or args.token is not None:
        raise DeepvisError("--units, --at and --token need --layer")
    units += [parse_unit(spec) for spec in args.unit_specs]
    for name in args.classes:
        units.append(Unit(LOGITS, model.class_index(name)))
    if not units:
        raise DeepvisError("nothing to optimize: give --unit UNIT, --layer L --units SPEC and/or --class NAME")
    return list(dict.fromkeys(units))


def run(args: argparse.Namespace) -> int:
    from PIL import Image

    from .._fs import atomic_path
    from ..capture import LOGITS, parse_unit
    from ..io import load_image
    from ..models import model_identity
    from ..optimize import get_preset, visualize
    from ..optimize.accentuate import DEFAULT_FEATURE_WEIGHT, DEFAULT_RADIUS, Accentuation
    from ..render import caption, montage
    from ..scores import DEFAULT_JUDGES, load_judges, result_records, score_image, summary_line

    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise DeepvisError(f"{out} exists and is not a folder: give a folder for the outputs")
    if args.batch_size < 1:
        raise DeepvisError("--batch-size must be at least 1")
    earlier = result_records(out)  # an earlier run's records stay beside this one's: said at the end
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
        "fourier": True if args.param == "fourier" else (False if args.param == "maco" else args.fourier),
        "maco": None if args.param is None else args.param == "maco",
        "decay_power": args.decay_power,
        "decorrelate": args.decorrelate,
        "jitter": args.jitter,
        "scale": args.scale,
        "rotate": args.rotate,
        "calibrate": None if args.calibrate is None else args.calibrate == "on",
    }
    if args.param == "pixel":
        if args.fourier:
            raise DeepvisError("--fourier and --param pixel contradict each other: give one")
        overrides["fourier"] = False
    if args.objective == "channel" and args.at is not None:
        raise DeepvisError("--at picks one position (a neuron): it does not go with --objective channel (the map's mean)")
    settings = get_preset(args.preset).replace(steps=args.steps, **overrides)  # bad settings fail before the model loads
    if args.start is None and (args.distance is not None or args.feature_weight is not None):
        raise DeepvisError("--distance and --feature-weight need --from IMAGE")
    accentuation = (
        Accentuation(
            radius=DEFAULT_RADIUS if args.distance is None else args.distance,
            feature_weight=DEFAULT_FEATURE_WEIGHT if args.feature_weight is None else args.feature_weight,
        )
        if args.start is not None
        else None
    )
    start = load_image(existing_input(args.start)) if args.start is not None else None
    judge_specs = [] if args.judge and [j.lower() for j in args.judge] == ["none"] else list(args.judge or DEFAULT_JUDGES)
    model = model_from_args(args)
    units = _targets(args, model)
    if start is not None and start.mode != model.preprocessing.pil_mode:
        start = start.convert(model.preprocessing.pil_mode)
    # optimize alone can give only the transfer figure (class objectives); the atlas-based ones need `deepvis score --atlas`
    judges = load_judges(judge_specs, model.device) if any(u.layer == LOGITS for u in units) else []
    if args.judge and judge_specs and not judges:
        print(
            "note: --judge applies to class objectives (--class, logits:N); hidden units get their figures from "
            "`deepvis score DIR --atlas ATLAS`",
            file=sys.stderr,
        )
    identity = model_identity(model)
    judges_wanted = bool(judge_specs)
    batches = -(-len(units) // args.batch_size)
    bar = progress(total=settings.steps * batches, desc="optimize", unit="step")

    def on_progress(done: int, total: int) -> None:
        bar.update(done - bar.n)

    # Ctrl-C stops after the current step, and what is done is written (a second Ctrl-C ends at once)
    interrupted = threading.Event()
    restore = _stop_on_interrupt(interrupted)
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
            should_stop=interrupted,
            start=start,
            accentuation=accentuation,
        )
    finally:
        bar.close()
        restore()
    if not results:
        raise KeyboardInterrupt
    rows: list[dict[str, Any]] = []
    for res in results:
        slug = unit_slug(res.unit or res.objective)
        files = {"raw": str(out / f"{slug}_raw.png"), "display": str(out / f"{slug}.png"), "record": str(out / f"{slug}.json")}
        with atomic_path(files["raw"]) as tmp:
            res.raw_image().save(tmp, format="PNG")
        with atomic_path(files["display"]) as tmp:
            res.display_image().save(tmp, format="PNG")
        alpha, masked = res.alpha_image(), res.masked_image()
        if alpha is not None and masked is not None:
            files["alpha"], files["masked"] = str(out / f"{slug}_alpha.png"), str(out / f"{slug}_masked.png")
            with atomic_path(files["alpha"]) as tmp:
                alpha.save(tmp, format="PNG")
            with atomic_path(files["masked"]) as tmp:
                masked.save(tmp, format="PNG")
        record = res.to_dict()
        record["model_identity"] = identity
        unit = parse_unit(res.unit) if res.unit else None
        if unit is not None and unit.layer == LOGITS and model.num_classes is not None:
            record["classes"] = {"count": model.num_classes, "name": model.label(unit.channel)}
        if args.start is not None:
            record["start"] = args.start
        record["scores"] = score_image(res.raw_image(), record, judges) if judges_wanted else None
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
                "distance": res.distance,
                "scores": record["scores"],
                "files": files,
            }
        )
        if res.dead:
            print(f"{res.unit}: dead unit (gradient exactly 0 at step {res.dead_step})", file=sys.stderr)
    labels = [(f"{r.label or ''}" if r.label else (r.unit or r.objective)) for r in results]
    mont = out / "montage.png"
    picture = montage([r.display_image() for r in results], labels=labels, tile=min(160, max(results[0].size)))
    texts = [f"{lab}: {summary_line(row['scores'])}" for lab, row in zip(labels, rows) if row["scores"] and summary_line(row["scores"])]
    lines = [part for text in texts for part in textwrap.wrap(text, max(12, picture.width // 6 - 1))]  # ~6 px a character
    if lines:  # the quality figures under the grid (* marks a judge that is the optimized model)
        cap = caption(lines, picture.width)
        framed = Image.new("RGB", (picture.width, picture.height + cap.height), (20, 20, 20))
        framed.paste(picture, (0, 0))
        framed.paste(cap, (0, picture.height))
        picture = framed
    with atomic_path(mont) as tmp:
        picture.save(tmp, format="PNG")
    if args.json:
        print_json(
            {
                "output": str(out),
                "montage": str(mont),
                "model": model.name,
                "weights": model.weights.label,
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
            dist = row["distance"]
            reach = f" (RMS change {dist['pixel_rms']:.3g} of {dist['radius']:.3g} levels)" if dist else ""
            figures = summary_line(row["scores"]) if row["scores"] else ""
            print(
                f"{name}: {row['start_value']:.4g} -> {row['value']:.4g} at step {row['best_step']}{reach}{state}"
                + (f"  [{figures}]" if figures else "")
            )
        print(f"wrote {len(rows)} units and {mont}", file=sys.stderr)
    others = sorted(set(earlier) - {Path(r["files"]["record"]).name for r in rows})
    if others:
        print(
            f"note: {out} also holds {len(others)} result(s) of an earlier run ({', '.join(others[:3])}"
            + (", ..." if len(others) > 3 else "")
            + f"), not in this montage; `deepvis score {out}` reads them too",
            file=sys.stderr,
        )
    if interrupted.is_set():
        cut = sum(r.stopped for r in results)
        print(
            f"deepvis: interrupted: wrote {len(results)} of the {len(units)} units"
            + (f" ({cut} stopped before their last step: 'stopped' in their records)" if cut else ""),
            file=sys.stderr,
        )
        return 130
    return 0


def _stop_on_interrupt(event: threading.Event) -> Callable[[], None]:
    """Make the first SIGINT set ``event`` (and put the default handler back, so a second one interrupts at
    once); returns the function that restores the previous handler. Off the main thread: nothing to do."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.getsignal(signal.SIGINT)

    def handler(_signum: int, _frame: object) -> None:
        event.set()
        signal.signal(signal.SIGINT, previous)

    def restore() -> None:
        signal.signal(signal.SIGINT, previous)

    signal.signal(signal.SIGINT, handler)
    return restore
