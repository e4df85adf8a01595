"""``deepvis info``: versions, device and allocator settings (for bug reports)."""

from __future__ import annotations

import argparse
import os
import platform

from .common import add_common_options, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "info",
        help="show versions, devices and allocator settings",
        description="Show the versions, compute devices and memory-allocator settings deepvis runs with.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    add_common_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from .. import __version__
    from ..allocator import allocator_tuned

    info = {
        "deepvis": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "cpu_threads": torch.get_num_threads(),
        "allocator_tuned": allocator_tuned(),
        "GLIBC_TUNABLES": os.environ.get("GLIBC_TUNABLES"),
    }
    if args.json:
        print_json(info)
    else:
        for k, v in info.items():
            print(f"{k:<16} {v}")
    return 0
