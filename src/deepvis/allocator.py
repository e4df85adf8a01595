"""The memory allocator: glibc settings that make batched CPU backward passes several times faster.

Measured on 2-core machines (docs/performance.md): with glibc's default malloc, a batched
forward+backward pass spends most of its time in page faults, because every step frees and
re-allocates large activation buffers through mmap. These settings keep those buffers in the heap.
They only take effect when set before the process starts, so the ``deepvis`` command re-executes
itself once with them, for the commands that run a model (see :mod:`deepvis.cli`); the environment
variable ``DEEPVIS_REEXECED`` marks the restarted process. This module imports nothing heavy.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

__all__ = ["ALLOCATOR_TUNABLES", "allocator_env", "allocator_tuned", "ensure_allocator_tuning"]

#: huge pages for the heap, buffers served by mmap only above 32 MiB, never trimmed back mid-run.
ALLOCATOR_TUNABLES = "glibc.malloc.hugetlb=1:glibc.malloc.mmap_threshold=33554432:glibc.malloc.trim_threshold=4294967296"


def allocator_env(environ: dict[str, str] | None = None) -> dict[str, str] | None:
    """Return a copy of ``environ`` with deepvis's glibc tunables added, or None if nothing would change.

    Only applies on Linux with glibc, when the user has not set ``GLIBC_TUNABLES`` or preloaded another
    allocator themselves, and when ``DEEPVIS_NO_ALLOCATOR_TUNING`` is unset.
    """
    env = dict(os.environ if environ is None else environ)
    if not sys.platform.startswith("linux"):
        return None
    if "GLIBC_TUNABLES" in env or "LD_PRELOAD" in env or env.get("DEEPVIS_NO_ALLOCATOR_TUNING"):
        return None
    if platform.libc_ver()[0] != "glibc":
        return None
    env["GLIBC_TUNABLES"] = ALLOCATOR_TUNABLES
    return env


def allocator_tuned(environ: Mapping[str, str] | None = None) -> bool:
    """True when ``environ`` (default: this process's) holds deepvis's allocator settings (or the user's own)."""
    env = os.environ if environ is None else environ
    return "GLIBC_TUNABLES" in env or "LD_PRELOAD" in env


def ensure_allocator_tuning(extra_env: Mapping[str, str] | None = None) -> None:
    """Restart the current process once with :data:`ALLOCATOR_TUNABLES` (Linux/glibc only).

    Call it first thing in a script that runs batched backward passes on the CPU, before torch is
    imported (the ``deepvis`` command does, for the commands that run a model, once their arguments parse). It does nothing when the settings (or the user's own ``GLIBC_TUNABLES`` /
    ``LD_PRELOAD``) are already in place, when ``DEEPVIS_NO_ALLOCATOR_TUNING`` is set, or when the
    process cannot be re-executed; the restart keeps the interpreter, its flags and the arguments.
    ``extra_env`` holds other variables that only act at process start (e.g. ``OMP_WAIT_POLICY``) to
    set in the same single restart; variables the user already set are left alone.
    """
    if os.environ.get("DEEPVIS_REEXECED"):
        return
    extra = {k: v for k, v in (extra_env or {}).items() if k not in os.environ}
    env = allocator_env()
    if env is None and not extra:
        return
    env = dict(os.environ) if env is None else env
    env.update(extra)
    env["DEEPVIS_REEXECED"] = "1"
    argv = list(getattr(sys, "orig_argv", [])) or [sys.executable, *sys.argv]
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, argv, env)
    except OSError:
        return  # keep running as we are
