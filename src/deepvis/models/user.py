"""A user's own ``nn.Module``: ``path/to/file.py:factory`` or ``package.module:factory``."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

from torch import nn

from ..errors import ModelError
from .hubs import default_preprocessing_for
from .model import Model

__all__ = ["build_user_model", "is_user_spec"]


def is_user_spec(spec: str) -> bool:
    """True for ``something.py:factory`` and ``pkg.module:factory``."""
    left, sep, right = spec.rpartition(":")
    return bool(sep and left and right.isidentifier())


def build_user_model(spec: str) -> Model:
    """Import the file or module, call the factory with no arguments and wrap the result.

    The factory returns an ``nn.Module`` (or a :class:`~deepvis.models.Model`). Preprocessing comes
    from a timm-style ``pretrained_cfg`` dict on the module when present (see
    :func:`~deepvis.models.hubs.default_preprocessing_for`).
    """
    left, _, factory_name = spec.rpartition(":")
    if left.endswith(".py") or "/" in left or Path(left).is_file():
        path = Path(left)
        if not path.is_file():
            raise ModelError(f"model file not found: {path}")
        mod_name = f"deepvis_user_model_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ModelError(f"cannot import {path} as Python code")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as exc:
            sys.modules.pop(mod_name, None)
            raise ModelError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    else:
        try:
            module = importlib.import_module(left)
        except ImportError as exc:
            raise ModelError(f"cannot import module {left!r}: {exc}") from exc
    factory = getattr(module, factory_name, None)
    if factory is None or not callable(factory):
        raise ModelError(f"{left} has no callable named {factory_name!r}")
    try:
        made = factory()
    except Exception as exc:
        raise ModelError(f"{spec}: the factory raised {type(exc).__name__}: {exc}") from exc
    if isinstance(made, Model):
        made.name = spec
        return made
    if not isinstance(made, nn.Module):
        raise ModelError(f"{spec} returned {type(made).__name__}, not a torch.nn.Module")
    return Model(made, default_preprocessing_for(made), name=spec)
