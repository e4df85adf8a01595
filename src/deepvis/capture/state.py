"""Context managers that change a model temporarily and always restore it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from torch import nn

__all__ = ["eval_mode", "frozen"]


@contextlib.contextmanager
def eval_mode(module: nn.Module, modules: Sequence[nn.Module] | None = None) -> Iterator[nn.Module]:
    """Put every submodule in eval mode; restore each one's own ``training`` flag on exit.

    ``modules`` may pass ``list(module.modules())`` precomputed (a hot loop saves walking the tree).
    """
    training = [m for m in (module.modules() if modules is None else modules) if m.training]
    if training:
        module.eval()
    try:
        yield module
    finally:
        for m in training:
            m.training = True


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """Eval mode and no parameter gradients (gradients flow to the input only); restored on exit."""
    grads = [(p, p.requires_grad) for p in module.parameters()]
    with eval_mode(module):
        for p, _ in grads:
            p.requires_grad_(False)
        try:
            yield module
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)
