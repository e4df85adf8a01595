"""Options shared by the sub-commands, and their use."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from ..models.registry import MODEL_SPEC_HELP

__all__ = ["add_model_options", "add_common_options", "model_from_args", "print_json", "progress"]


def add_common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """--model, --weights, --labels, --input-size, --device (and --debug)."""
    g = p.add_argument_group("model")
    g.add_argument("--model", default="default", help=f"the model: {MODEL_SPEC_HELP} (default: %(default)s)")
    g.add_argument("--weights", metavar="FILE", help="checkpoint to load: .safetensors or a PyTorch state dict (never unpickles code)")
    g.add_argument("--labels", metavar="FILE", help="class names, one per line (or a JSON list)")
    g.add_argument("--input-size", type=int, metavar="PX", help="override the model's input size (square)")
    g.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N (default: %(default)s)")
    add_common_options(p)


def model_from_args(args: argparse.Namespace):
    """Load the model the options name."""
    from ..models import load_model

    return load_model(args.model, weights=args.weights, labels=args.labels, device=args.device, input_size=args.input_size)


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def progress(iterable=None, **kwargs):
    """A progress bar on stderr (see :func:`deepvis._progress.progress_bar`)."""
    from .._progress import progress_bar

    return progress_bar(iterable, **kwargs)
