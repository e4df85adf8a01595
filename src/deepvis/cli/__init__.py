"""The ``deepvis`` command: a thin layer over the library.

Each sub-command lives in its own module under ``deepvis.cli`` and exposes ``register(subparsers)``.
Errors a user can cause print one line on stderr and exit with status 2 (``--debug`` shows the
traceback); anything else is reported as an internal error with status 1.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

#: sub-command modules, in the order ``--help`` lists them
COMMAND_MODULES = (
    "info",
    "models",
    "layers",
    "predict",
    "activations",
    "backprop",
    "rf",
    "optimize",
    "atlas",
    "atlas_show",
    "report",
    "serve",
)


#: environment each sub-command wants set before the process starts (see :func:`main`)
START_ENV: dict[str, dict[str, str]] = {"serve": {"OMP_WAIT_POLICY": "PASSIVE"}}


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="deepvis",
        description="Deep Visualization Toolbox for PyTorch convnets: activations, unit views, "
        "activation maximization, unit atlases and layer summaries.",
    )
    parser.add_argument("--version", action="version", version=f"deepvis {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``deepvis`` command; returns the exit status."""
    if argv is None:  # a real command-line run, not a call from Python
        from ..allocator import ensure_allocator_tuning

        # one restart with the settings that only act at process start: the allocator tunables
        # (batched CPU backward passes 3-5x faster) and, for the live server, passive OpenMP waiting
        # (spinning threads starve the browser and the background workers on small machines)
        ensure_allocator_tuning(START_ENV.get(sys.argv[1] if len(sys.argv) > 1 else "", {}))
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    parser = build_parser()
    args = parser.parse_args(args_list)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ..errors import DeepvisError

    try:
        return int(args.func(args) or 0)
    except DeepvisError as exc:
        if debug:
            raise
        print(f"deepvis: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("deepvis: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # a bug, not bad input: still one line unless --debug
        if debug:
            raise
        print(f"deepvis: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1
