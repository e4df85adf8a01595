"""The ``deepvis`` command: a thin layer over the library.

Each sub-command lives in its own module under ``deepvis.cli`` and exposes ``register(subparsers)``.
Errors a user can cause print one line on stderr and exit with status 2 (``--debug`` shows the
traceback): bad arguments (argparse's own errors too), bad input, an ``--output`` that cannot be
written (checked before the work starts) and what the file system refuses while writing; anything
else is reported as an internal error with status 1.

**The command answers at once.** ``--help``, ``--version`` and argument errors never import torch
(about 2 s): the modules of this package import only argparse-level things at their top (argparse,
:mod:`deepvis.choices` for the lists of choices, :mod:`deepvis.errors`, :mod:`deepvis.allocator`,
:mod:`.common`), and ``register`` builds the parser from them alone; the library is imported inside
each command's ``run``, when the command runs. ``import deepvis`` itself imports nothing heavy.
tests/test_cli.py checks this for every sub-command's ``--help``.

**One restart, for model commands only.** After the arguments parse, a command that runs a model
(its parser has :func:`.common.add_model_options`) restarts the process once, before torch is
imported, with the settings that only act at process start (:mod:`deepvis.allocator`; plus
:data:`START_ENV` for its command); other commands, ``--help`` and errors run as they are.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import NoReturn

from .. import __version__
from ..allocator import ensure_allocator_tuning
from ..errors import DeepvisError
from .common import run_command

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
    "score",
    "serve",
)


#: environment a model command wants set before the process starts, besides the allocator's (see :func:`main`)
START_ENV: Mapping[str, Mapping[str, str]] = MappingProxyType({"serve": MappingProxyType({"OMP_WAIT_POLICY": "PASSIVE"})})


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose errors are one line (``deepvis optimize: error: ... (see --help)``), not
    the usage block followed by the message; sub-command parsers are of this class too."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The ``deepvis`` parser with every sub-command of :data:`COMMAND_MODULES` (imports no torch)."""
    parser = _Parser(
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
    """Entry point of the ``deepvis`` command; returns the exit status.

    ``argv`` None: a real command-line run (``sys.argv``), which may restart the process once (see the
    module docstring); a list: a call from Python (tests), which never restarts.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args_list
    parser = build_parser()
    args = parser.parse_args(args_list)  # --help, --version and bad arguments exit here, torch not imported
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if argv is None and getattr(args, "runs_model", False):
        # one restart with the settings that only act at process start: the allocator tunables
        # (batched CPU backward passes 3-5x faster) and, for the live server, passive OpenMP waiting
        # (spinning threads starve the browser and the background workers on small machines)
        ensure_allocator_tuning(START_ENV.get(args.command, {}))
    try:
        return int(run_command(args) or 0)
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
    except OSError as exc:  # the file system refused (full disk, a folder gone): not a bug, and one line
        if debug:
            raise
        print(f"deepvis: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # a bug, not bad input: still one line unless --debug
        if debug:
            raise
        print(f"deepvis: internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)", file=sys.stderr)
        return 1
