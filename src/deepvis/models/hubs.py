"""Models from torchvision and timm, with their published weights or a user's checkpoint."""

from __future__ import annotations

import difflib
import os
from typing import Any

from torch import nn

from ..errors import ModelError
from .labels import imagenet_class_names
from .model import Model
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .weights import load_weights, read_state_dict

__all__ = ["build_torchvision", "build_timm", "OFFLINE_HINT"]

OFFLINE_HINT = "download the weights on a machine with internet access and pass them with --weights FILE"


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _unknown(kind: str, name: str, known: list[str]) -> ModelError:
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ModelError(f"unknown {kind} model {name!r}{hint} (see `deepvis models`)")


def build_torchvision(name: str, weights: str | os.PathLike[str] | None = None) -> Model:
    """``torchvision:NAME``: the architecture with its DEFAULT pretrained weights, or with ``weights`` (a file).

    Published weights are fetched through torchvision (torch.hub cache, ``$TORCH_HOME``); when they
    cannot be fetched (offline) the error says how to pass a checkpoint instead.
    """
    import torchvision.models as tvm

    known = tvm.list_models()
    if name not in known:
        raise _unknown("torchvision", name, known)
    try:
        enum = tvm.get_model_weights(name)
        default = enum.DEFAULT
    except (ValueError, AttributeError):
        default = None
    if weights is None:
        if default is None:
            raise ModelError(f"torchvision:{name} has no published weights: pass --weights FILE")
        try:
            module = tvm.get_model(name, weights=default)
        except Exception as exc:  # URLError, ConnectionError, hash mismatch, ...
            raise ModelError(f"cannot fetch pretrained weights for torchvision:{name} ({_short(exc)}): {OFFLINE_HINT}") from exc
    else:
        sd = read_state_dict(weights)
        kwargs: dict[str, object] = {}
        if name in ("googlenet", "inception_v3"):
            kwargs["aux_logits"] = any(k.startswith("Aux") or k.startswith("aux") for k in sd)
            kwargs["init_weights"] = False
            kwargs["transform_input"] = default is not None
        fc = [v for k, v in sd.items() if k.endswith("weight") and v.ndim == 2]
        if fc:
            kwargs["num_classes"] = int(fc[-1].shape[0])
        try:
            module = tvm.get_model(name, weights=None, **kwargs)
        except TypeError:
            kwargs.pop("num_classes", None)
            module = tvm.get_model(name, weights=None, **kwargs)
        load_weights(module, sd, what=str(weights))
    module.eval()
    prep = Preprocessing()
    names = None
    if default is not None:
        t = default.transforms()
        crop = int(t.crop_size[0])
        resize = int(t.resize_size[0]) if t.resize_size else crop
        interp = getattr(t.interpolation, "value", str(t.interpolation))
        prep = Preprocessing(
            (crop, crop),
            tuple(t.mean),
            tuple(t.std),
            interp if interp in ("bilinear", "bicubic", "nearest") else "bilinear",
            min(1.0, crop / resize),
            3,
        )
        cats = default.meta.get("categories")
        out = _num_outputs(module)
        if cats and (out is None or out == len(cats)):
            names = list(imagenet_class_names()) if len(cats) == 1000 else list(cats)
    return Model(module, prep, name=f"torchvision:{name}", class_names=names)


def build_timm(name: str, weights: str | os.PathLike[str] | None = None) -> Model:
    """``timm:NAME``: the architecture with timm's pretrained weights (Hugging Face hub cache) or ``weights``."""
    import timm

    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models())
    if weights is None:
        try:
            module = timm.create_model(name, pretrained=True)
        except Exception as exc:  # hub offline, missing cache entry, ...
            raise ModelError(f"cannot fetch pretrained weights for timm:{name} ({_short(exc)}): {OFFLINE_HINT}") from exc
    else:
        sd = read_state_dict(weights)
        kwargs: dict[str, Any] = {}
        head = getattr(timm.create_model(name, pretrained=False), "default_cfg", {}).get("classifier")
        if isinstance(head, str) and f"{head}.weight" in sd:
            kwargs["num_classes"] = int(sd[f"{head}.weight"].shape[0])
        module = timm.create_model(name, pretrained=False, **kwargs)
        load_weights(module, sd, what=str(weights))
    module.eval()
    cfg = timm.data.resolve_data_config({}, model=module)
    c, h, w = cfg["input_size"]
    prep = Preprocessing(
        (h, w), tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"), float(cfg.get("crop_pct", 0.875)), c
    )
    names = imagenet_class_names() if _num_outputs(module) == 1000 else None
    return Model(module, prep, name=f"timm:{name}", class_names=names)


def _num_outputs(module: nn.Module) -> int | None:
    n = getattr(module, "num_classes", None)
    if isinstance(n, int):
        return n
    last = None
    for m in module.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last.out_features if last is not None else None


def default_preprocessing_for(module: nn.Module) -> Preprocessing:
    """Preprocessing of a user's module: from its timm-style ``pretrained_cfg``/``default_cfg`` dict when it
    has one, else 224 px with channels taken from its first convolution (ImageNet mean/std for RGB,
    0.5/0.5 for grayscale)."""
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        c, h, w = cfg["input_size"]
        mean = tuple(cfg.get("mean", IMAGENET_MEAN if c == 3 else (0.5,)))
        std = tuple(cfg.get("std", IMAGENET_STD if c == 3 else (0.5,)))
        return Preprocessing((h, w), mean, std, cfg.get("interpolation", "bicubic"), float(cfg.get("crop_pct", 0.875)), c)
    channels = 3
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            channels = m.in_channels
            break
    if channels not in (1, 3):
        raise ModelError(f"the model's first convolution takes {channels} channels; deepvis handles 1 (grayscale) or 3 (RGB)")
    if channels == 1:
        return Preprocessing(channels=1, mean=(0.5,), std=(0.5,))
    return Preprocessing()
