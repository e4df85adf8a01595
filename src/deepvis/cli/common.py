"""Options shared by the sub-commands (one declaration per option group), and their use.

Like every module of :mod:`deepvis.cli`, this one imports only argparse-level things at its top (the
lists of choices come from :mod:`deepvis.choices`, which imports nothing heavy); the library is imported
when a command runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._progress import progress_bar
from ..choices import COLORMAPS, ENGINES, MODEL_SPEC_HELP, PRESET_NAMES
from ..errors import DeepvisError, InputError

if TYPE_CHECKING:
    from ..models import Model

__all__ = [
    "add_common_options",
    "add_model_options",
    "add_autocast_option",
    "add_json_option",
    "add_output_option",
    "add_colormap_option",
    "add_synthesis_options",
    "add_engine_options",
    "engine_from_args",
    "image_format",
    "existing_input",
    "model_from_args",
    "run_command",
    "untrained_note",
    "print_json",
    "progress",
    "IMAGE_FORMATS",
    "SAMPLE_HELP",
    "AUTOCAST_CHOICES",
]

#: how the help texts name the bundled sample photos (``sample:NAME``; an unknown name lists them all)
SAMPLE_HELP = "sample:NAME for a bundled photo (e.g. sample:coffee; a wrong name lists them)"

#: output picture suffixes -> Pillow format names
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}

#: the ``--autocast`` choices: the words of :data:`deepvis.runtime.AUTOCAST_DTYPES` (written out here,
#: since the CLI's modules do not import torch at ``--help``; a test keeps the two lists equal)
AUTOCAST_CHOICES = ("bf16", "fp16")


def add_common_options(p: argparse.ArgumentParser) -> None:
    """``--debug``: every command has it."""
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def at_least(low: float, kind: type = int) -> Callable[[str], Any]:
    """An argparse ``type=``: a number (``kind``) of at least ``low``; a one-line argument error otherwise."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text} is less than {low:g}")
        return value

    return parse


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --weights, --labels, --input-size, --device, --layout, --deterministic (and --debug).

    ``--deterministic`` applies :func:`deepvis.runtime.deterministic` around the whole command
    (:func:`run_command`).

    Marks the command as one that runs a model: :func:`deepvis.cli.main` restarts the process once with
    the allocator settings before it runs (see :mod:`deepvis.allocator`).
    """
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default", help=f"the model: {MODEL_SPEC_HELP} (default: %(default)s)")
    g.add_argument(
        "--weights",
        metavar="FILE|random",
        help="checkpoint to load: .safetensors or a PyTorch state dict (never unpickles code); or 'random': the architecture "
        "untrained, with random weights (seed 0, the same every run; built-ins, torchvision:NAME, timm:NAME)",
    )
    g.add_argument("--labels", metavar="FILE", help="class names, one per line (or a JSON list)")
    g.add_argument("--input-size", type=at_least(1), metavar="PX", help="override the model's input size (square)")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)")
    g.add_argument(
        "--layout",
        action="append",
        metavar="LAYER=KIND",
        help="declare a layer's layout when deepvis cannot tell it: nchw, nhwc, tokens:P, tokens:P:HxW, attention:P, attention:P:HxW, vector or none (repeatable)",
    )
    g.add_argument(
        "--deterministic",
        action="store_true",
        help="deterministic GPU kernels for the whole command (cuDNN deterministic, no TF32; see docs/gpu.md); "
        "the CPU is deterministic without it",
    )
    p.set_defaults(runs_model=True)
    add_common_options(p)


def add_autocast_option(p: argparse._ActionsContainer, what: str = "the forward passes over the data") -> None:
    """``--autocast {bf16,fp16}`` (default off): ``what`` runs under :func:`deepvis.runtime.autocast`.
    Commands that run forward passes over data have it (activations, atlas, report, serve); it is read
    back as ``args.autocast`` (None: off) and handed to the library's ``autocast=``."""
    p.add_argument(
        "--autocast",
        choices=AUTOCAST_CHOICES,
        help=f"run {what} under autocast: the weights stay float32, convolutions and matmuls compute in bfloat16 or "
        "float16 (faster, and about 1%% (bf16) or 0.1%% (fp16) off float32); statistics still add up in float32. On a GPU "
        "both help; on the CPU bf16 is the useful one (fp16 there is slow). Default: off (see docs/gpu.md)",
    )


def add_json_option(p: argparse._ActionsContainer, help: str = "print JSON") -> None:
    """``--json``: machine-readable output on stdout."""
    p.add_argument("--json", action="store_true", help=help)


def add_output_option(p: argparse._ActionsContainer, *, metavar: str, help: str, required: bool = True) -> None:
    """``-o/--output``: where the command writes its result."""
    p.add_argument("-o", "--output", required=required, metavar=metavar, help=help)


def add_colormap_option(p: argparse._ActionsContainer, what: str = "colormap") -> None:
    """``--colormap``: a built-in colormap (:data:`deepvis.choices.COLORMAPS`) or any matplotlib name."""
    p.add_argument("--colormap", default="gray", help=f"{what}: {', '.join(COLORMAPS)} or any matplotlib name (default: %(default)s)")


def add_synthesis_options(p: argparse._ActionsContainer, *, what: str = "", size_default: str = "the model's input size") -> None:
    """--preset, --steps, --size, --seed: the activation-maximization settings ``optimize`` and ``atlas`` share.

    ``what`` prefixes each help text (e.g. ``"synthesis "``); ``size_default`` says what ``--size`` falls back to.
    """
    p.add_argument(
        "--preset",
        default="3",
        help=f"{what}preset: one of {', '.join(PRESET_NAMES)}; 1-4 are the paper's Table 1 (default: %(default)s)",
    )
    p.add_argument("--steps", type=int, metavar="N", help=f"{what}steps (default: the preset's)")
    p.add_argument("--size", type=int, metavar="PX", help=f"{what}image size in px (default: {size_default})")
    p.add_argument("--seed", type=int, default=0, help=f"{what}random seed (default: %(default)s)")


def image_format(path: Path) -> str:
    """The Pillow format of an output picture from its suffix (.png, .jpg or .webp); a one-line error otherwise."""
    fmt = IMAGE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DeepvisError(f"output {path} should be a .png, .jpg or .webp file")
    return fmt


def existing_input(text: str) -> Path:
    """The file an input argument names (a path or ``sample:NAME``); a one-line error when it does not exist."""
    from ..io import resolve_input  # Pillow and numpy are imported when a command runs, never at --help

    path = resolve_input(text)
    if not path.exists():
        raise InputError(f"input not found: {path}")
    return path


def model_from_args(args: argparse.Namespace) -> Model:
    """Load the model that the options of :func:`add_model_options` name.

    A model with random weights (``--weights random``) is announced with one line on stderr
    (:func:`untrained_note`), so that no output of an untrained network passes for a trained one's.
    """
    from ..capture import LOGITS, get_layer, parse_layout_options, resolve_module  # torch: when a command runs, never at --help
    from ..models import load_model

    layouts = parse_layout_options(getattr(args, "layout", None))  # a malformed --layout fails before the model loads
    model = load_model(args.model, weights=args.weights, labels=args.labels, device=args.device, input_size=args.input_size)
    for layer in layouts:  # a declaration for a layer the model does not have is a typo, said at once
        resolve_module(model.module, layer)
    model.layouts.update(layouts)
    if args.labels is not None and model.class_names is not None:
        try:
            outputs: int | None = get_layer(model, LOGITS).units
        except DeepvisError:  # an output that is not one vector of logits: names cannot be counted against it
            outputs = None
        if outputs is not None and outputs != len(model.class_names):
            raise InputError(f"labels file {args.labels} has {len(model.class_names)} names, but the model has {outputs} outputs")
    note = untrained_note(model)
    if note is not None:
        print(note, file=sys.stderr)
    return model


#: unreadable inputs listed on stderr at most (all of them are in the command's --json and its files)
LIST_SKIPPED = 100


def print_skipped(skipped: Sequence[tuple[str, str]]) -> None:
    """List unreadable inputs, (name, reason) each, on stderr: what a command skipped and went on without."""
    if not skipped:
        return
    print(f"skipped {len(skipped)} unreadable input(s):", file=sys.stderr)
    for name, reason in skipped[:LIST_SKIPPED]:
        print(f"  {name}: {reason}", file=sys.stderr)
    if len(skipped) > LIST_SKIPPED:
        print(f"  ... and {len(skipped) - LIST_SKIPPED} more (all are listed by --json and in the output)", file=sys.stderr)


def run_command(args: argparse.Namespace) -> Any:
    """Run the parsed command (``args.func(args)``), inside :func:`deepvis.runtime.deterministic` when
    its model options asked for ``--deterministic`` (the settings are restored when it returns). An
    ``--output`` that cannot be written is a one-line error before any work is done."""
    output = getattr(args, "output", None)
    if output:
        from .._fs import check_writable

        why = check_writable(output)
        if why is not None:
            raise InputError(f"cannot write {output}: {why}")
    if not getattr(args, "deterministic", False):
        return args.func(args)
    from ..runtime import deterministic  # torch is imported when a command runs, never at --help

    with deterministic():
        return args.func(args)


def untrained_note(model: Model) -> str | None:
    """The one-line stderr note for a model with random weights, or None for trained weights."""
    if not model.weights.untrained:
        return None
    return f"deepvis: note: {model.name} has random weights (seed {model.weights.seed}): untrained, for exploring the architecture only"


def print_json(obj: Any) -> None:
    """Write ``obj`` to stdout as indented JSON."""
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> Any:
    """A progress bar on stderr (see :func:`deepvis._progress.progress_bar`)."""
    return progress_bar(iterable, **kwargs)


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """--engine, --ray-address, --workers: where a command's pass over a dataset runs (``atlas``, ``report``);
    read them back with :func:`engine_from_args`."""
    g = p.add_argument_group("engine")
    g.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: this process; ray: Ray workers, local or on a cluster (default: %(default)s)",
    )
    g.add_argument(
        "--ray-address", metavar="ADDR", help="join this Ray cluster (e.g. ray://head:10001 or auto); default: start Ray locally"
    )
    g.add_argument("--workers", type=int, metavar="N", help="Ray workers (default: one per GPU, else 2)")


def engine_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The ``engine``, ``ray_address`` and ``workers`` keywords (of ``build_atlas``, ``summarize``) that the
    options of :func:`add_engine_options` give, checked (one-line errors)."""
    if args.ray_address and args.engine != "ray":
        raise DeepvisError("--ray-address needs --engine ray")
    if args.workers is not None and args.workers < 1:
        raise DeepvisError("--workers must be at least 1")
    return {"engine": args.engine, "ray_address": args.ray_address, "workers": args.workers}
