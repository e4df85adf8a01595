"""Loading checkpoints safely: safetensors or a state dict read with ``weights_only=True``."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError

__all__ = ["read_state_dict", "load_weights"]


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``{name: tensor}`` dict on the CPU.

    ``.safetensors`` files are read with safetensors; anything else with ``torch.load(weights_only=True)``
    so that pickled code is never executed. A checkpoint that wraps its weights under ``state_dict`` or
    ``model`` is unwrapped, and a ``module.`` prefix (DataParallel) is dropped.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights {path} is a folder, not a checkpoint file" if path.is_dir() else f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise WeightsError(f"weights file is empty: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: object = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "Unsupported global" in text or "GLOBAL" in text:
            raise WeightsError(
                f"{path} holds pickled Python objects besides tensors, which deepvis never unpickles: "
                "save model.state_dict() or use .safetensors"
            ) from exc
        raise WeightsError(f"cannot read weights from {path}: not a PyTorch checkpoint or safetensors file") from exc
    except Exception as exc:  # corrupt zip, truncated file, safetensors header error, ...
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
        raise WeightsError(f"cannot read weights from {path}: {type(exc).__name__}: {first}") from exc
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(sd, Mapping) and key in sd and isinstance(sd[key], Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    out = {str(k): v for k, v in sd.items()}
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def _listing(keys: list[str], n: int = 4) -> str:
    shown = ", ".join(keys[:n])
    return shown + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_weights(
    module: nn.Module,
    source: str | os.PathLike[str] | Mapping[str, torch.Tensor],
    *,
    rename: Callable[[str], str] | None = None,
    what: str | None = None,
) -> None:
    """Load a checkpoint into ``module`` strictly; any missing, unexpected or mis-shaped key is one clear error.

    ``rename`` maps checkpoint key names to the module's (used for checkpoints in another naming scheme).
    """
    sd = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    what = what or (str(source) if not isinstance(source, Mapping) else "the checkpoint")
    if rename is not None:
        sd = {rename(k): v for k, v in sd.items()}
    own = module.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_listing(unexpected)}")
    if shapes:
        problems.append(f"shape mismatch (checkpoint vs model): {_listing(shapes, 3)}")
    if problems:
        raise WeightsError(f"{what} does not fit the model: " + "; ".join(problems))
    module.load_state_dict(sd, strict=True)
