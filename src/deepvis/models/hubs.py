"""Models from torchvision and timm: with their published weights, a user's checkpoint, or random weights.

Published weights are read from the local caches with no network call at all when they are there (the
Hugging Face hub cache for timm's ``hf_hub_id``, torch.hub's ``checkpoints`` folder for torchvision's
and timm's URLs). Otherwise the network is tried only after a fast reachability check (one socket to
the host, :data:`REACH_TIMEOUT_S`); when the host cannot be reached the load fails at once with one
line, and nothing else is printed (no retries, no "Downloading").
"""

from __future__ import annotations

import contextlib
import difflib
import os
import random
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError
from .labels import imagenet_class_names
from .model import RANDOM_SEED, Model, WeightsSource
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .weights import load_weights, read_state_dict

__all__ = [
    "build_torchvision",
    "build_timm",
    "seeded_init",
    "host_reachable",
    "OFFLINE_HINT",
    "REACH_TIMEOUT_S",
]

OFFLINE_HINT = (
    "pass --weights FILE (a checkpoint downloaded on a machine with internet access) or --weights random (the architecture untrained)"
)

#: seconds the reachability check waits for a connection to a weights host
REACH_TIMEOUT_S = 3.0

#: the Hugging Face file names timm reads, with the safetensors file tried first
_HF_SAFE_ALTERNATIVE = {"pytorch_model.bin": "model.safetensors", "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _unknown(kind: str, name: str, known: list[str]) -> ModelError:
    close = difflib.get_close_matches(name, known, n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ModelError(f"unknown {kind} model {name!r}{hint} (see `deepvis models`)")


@contextlib.contextmanager
def seeded_init(seed: int = RANDOM_SEED) -> Iterator[None]:
    """Run the block with torch's, Python's and numpy's global random generators seeded with ``seed``,
    and restore their states afterwards (a forked RNG: the caller's random streams are untouched).

    Building an architecture inside it gives the same random weights every time (on the CPU).
    """
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def host_reachable(url: str, timeout: float = REACH_TIMEOUT_S) -> bool:
    """True when a TCP connection to the host of ``url`` (or to the proxy the environment names for it)
    opens within ``timeout`` seconds. Sends nothing."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy and not urllib.request.proxy_bypass(host):
        parts = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _unreachable(spec: str, url: str, why: str | None = None) -> ModelError:
    host = urllib.parse.urlsplit(url).hostname or url
    reason = why or f"{host} cannot be reached"
    return ModelError(f"cannot fetch pretrained weights for {spec}: they are not in the local cache and {reason}; {OFFLINE_HINT}")


def _torch_hub_file(url: str) -> str:
    """Where torch.hub keeps the download of ``url`` (``$TORCH_HOME/hub/checkpoints/NAME``)."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urllib.parse.urlsplit(url).path))


def build_torchvision(
    name: str, weights: str | os.PathLike[str] | None = None, *, seed: int | None = None, img_size: tuple[int, int] | None = None
) -> Model:
    """``torchvision:NAME``: the architecture with its DEFAULT pretrained weights, with ``weights`` (a
    file), or, with ``seed``, with random weights made by that seed (see :func:`seeded_init`). With random
    weights, a ViT (``vit_*``, whose position embeddings are sized at construction) is built for a
    square ``img_size``; every other case keeps the architecture's own construction.

    Published weights come from torch.hub's cache (``$TORCH_HOME``) with no network call when they are
    there; otherwise they are downloaded when the host answers, and a one-line :class:`ModelError` says
    how to pass a checkpoint (or random weights) when it does not.
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
    spec = f"torchvision:{name}"
    if seed is not None:
        kwargs: dict[str, object] = {}
        if name in ("googlenet", "inception_v3"):  # the pretrained architecture: no auxiliary heads
            kwargs = {"aux_logits": False, "init_weights": True, "transform_input": default is not None}
        if name.startswith("vit_") and img_size is not None and img_size[0] == img_size[1]:
            kwargs["image_size"] = img_size[0]
        with seeded_init(seed):
            module = tvm.get_model(name, weights=None, **kwargs)
        source = WeightsSource.random(seed)
    elif weights is None:
        if default is None:
            raise ModelError(f"{spec} has no published weights: pass --weights FILE or --weights random")
        cached = os.path.isfile(_torch_hub_file(default.url))
        if not cached and not host_reachable(default.url):
            raise _unreachable(spec, default.url)
        try:
            module = tvm.get_model(name, weights=default)  # from the cache: no network call
        except Exception as exc:  # URLError, ConnectionError, hash mismatch, ...
            raise ModelError(f"cannot fetch pretrained weights for {spec} ({_short(exc)}): {OFFLINE_HINT}") from exc
        source = WeightsSource.pretrained(f"{type(default).__name__}.{default.name}")
    else:
        sd = read_state_dict(weights)
        kwargs = {}
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
        source = WeightsSource.file(str(weights))
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
    return Model(module, prep, name=spec, class_names=names, weights=source)


def _timm_cached(cfg: Any) -> tuple[dict[str, Any], str, str] | None:
    """(the pretrained-config overlay that makes timm load ``cfg``'s published weights from a local cache
    file, that file, where the weights were published), or None when no cache holds them. Looks only at
    the disk."""
    from huggingface_hub import try_to_load_from_cache  # a dependency of timm

    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id and getattr(cfg, "custom_load", False) != "hf":
        repo, _, revision = hub_id.partition("@")
        want = getattr(cfg, "hf_hub_filename", None) or "pytorch_model.bin"
        for filename in (_HF_SAFE_ALTERNATIVE.get(want), want):
            path = try_to_load_from_cache(repo, filename, revision=revision or None) if filename else None
            if isinstance(path, str) and os.path.isfile(path):  # (a "known missing" marker is not a str)
                return {"file": path, "source": "", "custom_load": False}, path, f"hf-hub:{hub_id}"
    url = getattr(cfg, "url", None)
    if url and os.path.isfile(_torch_hub_file(url)):
        return {"file": _torch_hub_file(url), "source": ""}, _torch_hub_file(url), str(url)
    return None


def _timm_create(name: str, img_size: tuple[int, int] | None, **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, built for input ``img_size`` (H, W) where the architecture
    takes one (ViTs, Swin: their patch grid and position embeddings are sized at construction, and timm
    resamples published position embeddings to it); architectures without an ``img_size`` argument
    (convnets) are built as they are, since they take any input size."""
    import timm

    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as exc:
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, **kwargs)


def _timm_pretrained(name: str, img_size: tuple[int, int] | None = None) -> tuple[nn.Module, WeightsSource]:
    """timm's model ``name`` with its published weights: from a local cache without any network call,
    else downloaded when the host answers the reachability check; a one-line ModelError otherwise."""
    import huggingface_hub.constants
    import timm

    spec = f"timm:{name}"
    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError as exc:  # a pretrained tag the architecture does not have
        raise ModelError(f"{spec}: {_short(exc)}") from exc
    hub_id, url = (getattr(cfg, "hf_hub_id", None), getattr(cfg, "url", None)) if cfg is not None else (None, None)
    if not hub_id and not url:
        raise ModelError(f"{spec} has no published weights: pass --weights FILE or --weights random")
    cached = _timm_cached(cfg)
    if cached is not None:
        overlay, path, published = cached
        try:
            module = _timm_create(name, img_size, pretrained=True, pretrained_cfg_overlay=overlay)
        except Exception as exc:  # a truncated or foreign cache file
            raise ModelError(f"cannot load the cached pretrained weights of {spec} from {path} ({_short(exc)}): {OFFLINE_HINT}") from exc
        return module, WeightsSource.pretrained(published)
    where = huggingface_hub.constants.ENDPOINT if hub_id else str(url)
    if hub_id and huggingface_hub.constants.HF_HUB_OFFLINE:
        raise _unreachable(spec, where, "HF_HUB_OFFLINE is set")
    if not host_reachable(where):
        raise _unreachable(spec, where)
    try:
        module = _timm_create(name, img_size, pretrained=True)
    except Exception as exc:  # hub errors, a missing file, ...
        raise ModelError(f"cannot fetch pretrained weights for {spec} ({_short(exc)}): {OFFLINE_HINT}") from exc
    return module, WeightsSource.pretrained(f"hf-hub:{hub_id}" if hub_id else str(url))


def build_timm(
    name: str, weights: str | os.PathLike[str] | None = None, *, seed: int | None = None, img_size: tuple[int, int] | None = None
) -> Model:
    """``timm:NAME``: the architecture with timm's pretrained weights (read from the Hugging Face hub
    cache or torch.hub's when there, else downloaded when the host answers), with ``weights`` (a file),
    or, with ``seed``, with random weights made by that seed (see :func:`seeded_init`). ``img_size``
    (H, W) builds architectures whose patch grid is fixed at construction for that input size."""
    import timm

    if not timm.is_model(name):
        raise _unknown("timm", name, timm.list_models())
    if seed is not None:
        with seeded_init(seed):
            module = _timm_create(name, img_size, pretrained=False)
        source = WeightsSource.random(seed)
    elif weights is None:
        module, source = _timm_pretrained(name, img_size)
    else:
        sd = read_state_dict(weights)
        kwargs: dict[str, Any] = {}
        head = getattr(timm.create_model(name, pretrained=False), "default_cfg", {}).get("classifier")
        if isinstance(head, str) and f"{head}.weight" in sd:
            kwargs["num_classes"] = int(sd[f"{head}.weight"].shape[0])
        module = _timm_create(name, img_size, pretrained=False, **kwargs)
        load_weights(module, sd, what=str(weights))
        source = WeightsSource.file(str(weights))
    module.eval()
    cfg = timm.data.resolve_data_config({}, model=module)
    c, h, w = cfg["input_size"]
    prep = Preprocessing(
        (h, w), tuple(cfg["mean"]), tuple(cfg["std"]), cfg.get("interpolation", "bicubic"), float(cfg.get("crop_pct", 0.875)), c
    )
    names = imagenet_class_names() if _num_outputs(module) == 1000 else None
    return Model(module, prep, name=f"timm:{name}", class_names=names, weights=source)


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
    has one (at the size its patch embedding was built for, when it has one), else 224 px with channels taken from its first convolution (ImageNet mean/std for RGB,
    0.5/0.5 for grayscale)."""
    cfg = getattr(module, "pretrained_cfg", None) or getattr(module, "default_cfg", None)
    if isinstance(cfg, dict) and "input_size" in cfg:
        c, h, w = cfg["input_size"]
        # a timm ViT or Swin built with img_size= keeps its pretrained config's size: its patch grid tells
        built = getattr(getattr(module, "patch_embed", None), "img_size", None)
        if isinstance(built, (tuple, list)) and len(built) == 2 and all(isinstance(v, int) for v in built):
            h, w = built
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
