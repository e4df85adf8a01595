"""``deepvis info``: versions, device and allocator settings (for bug reports).

``info`` runs no model, so it does not restart with the allocator settings itself: it reports the ones
the model commands run with (see :mod:`deepvis.allocator`).
"""

from __future__ import annotations

import argparse
import os
import platform

from .. import __version__
from ..allocator import allocator_env, allocator_tuned
from .common import add_common_options, add_json_option, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show versions, devices and allocator settings",
        description="Show the versions, compute devices and the memory-allocator settings deepvis runs models with.",
    )
    add_json_option(p)
    add_common_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    model_env = allocator_env() or os.environ  # what model commands run with, after their one restart
    info = {
        "deepvis": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "allocator_tuned": allocator_tuned(model_env),
        "GLIBC_TUNABLES": model_env.get("GLIBC_TUNABLES"),
    }
    if args.json:
        print_json(info)
    else:
        for k, v in info.items():
            print(f"{k:<16} {v}")
    return 0
