"""A model as deepvis sees it: an ``nn.Module`` plus its preprocessing and class names."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from PIL import Image
from torch import nn

from ..errors import ModelError, UnitError
from .cache import ModelCache
from .preprocessing import Preprocessing

__all__ = ["Model", "WeightsSource", "WeightsKind", "RANDOM_WEIGHTS", "RANDOM_SEED", "module_dtype"]

#: where a model's weights came from: its published training (``pretrained``), a seeded random
#: initialization (``random``: the architecture untrained), a checkpoint file (``file``), or whatever
#: the module held when it was handed over (``module``: a user's factory or ``Model(module)``)
WeightsKind = Literal["pretrained", "random", "file", "module"]

#: the ``weights=`` value (and ``--weights`` word) that asks for the architecture with random weights
RANDOM_WEIGHTS = "random"
#: the seed of those random weights (two loads give the same weights and the same model hash)
RANDOM_SEED = 0


def module_dtype(module: nn.Module) -> torch.dtype:
    """The floating dtype the module computes in: that of its first floating parameter or buffer
    (``torch.float32`` for a module without any). Inputs deepvis makes or casts for it use this dtype."""
    for t in itertools.chain(module.parameters(), module.buffers()):
        if t.is_floating_point():
            return t.dtype
    return torch.float32


@dataclass(frozen=True)
class WeightsSource:
    """Where a model's weights came from (:attr:`Model.weights`).

    ``kind`` is one of :data:`WeightsKind`; ``detail`` says more: the checkpoint's path (``file``), where
    published weights were read from (``pretrained``: a hub id, a package or a URL), or nothing.
    ``seed`` is the seed of ``random`` weights. ``str()`` gives the short label that outputs record:
    ``"pretrained"``, ``"random (seed 0)"``, the checkpoint's path, or ``"the module's own"``.
    """

    kind: WeightsKind = "module"
    detail: str = ""
    seed: int | None = None

    @classmethod
    def pretrained(cls, detail: str = "") -> WeightsSource:
        """Published trained weights, read from ``detail`` (a hub id, a package, a URL)."""
        return cls("pretrained", detail)

    @classmethod
    def random(cls, seed: int = RANDOM_SEED) -> WeightsSource:
        """A random initialization with ``seed``: the architecture untrained."""
        return cls("random", "", seed)

    @classmethod
    def file(cls, path: str) -> WeightsSource:
        """A checkpoint file (its path as given)."""
        return cls("file", str(path))

    @property
    def untrained(self) -> bool:
        """True for random weights: every output of such a model says so."""
        return self.kind == "random"

    @property
    def label(self) -> str:
        """The short label recorded in outputs (see the class notes)."""
        if self.kind == "random":
            return f"random (seed {self.seed})"
        if self.kind == "file":
            return self.detail
        if self.kind == "pretrained":
            return "pretrained"
        return "the module's own"

    def __str__(self) -> str:
        return self.label


@dataclass(eq=False)
class Model:
    """A trained network ready for visualization.

    ``module`` is the user's network (deepvis never changes it permanently), ``preprocessing`` how it
    wants its input, ``class_names`` one name per output logit when known (ImageNet descriptions for
    ImageNet models). ``name`` is the string the model was loaded from, ``weights`` where its weights
    came from (:class:`WeightsSource`; ``weights.untrained`` for random weights).
    """

    module: nn.Module
    preprocessing: Preprocessing = field(default_factory=Preprocessing)
    name: str = "custom"
    class_names: list[str] | None = None
    #: where the weights came from (pretrained, random with its seed, a file, the module's own)
    weights: WeightsSource = field(default_factory=WeightsSource)
    #: declared layer layouts ``{layer: kind}`` (``nchw``, ``nhwc``, ``tokens:P``, ...; see
    #: :mod:`deepvis.capture.layouts`), for layers whose layout deepvis cannot tell
    layouts: dict[str, str] = field(default_factory=dict)
    #: facts derived from the module's structure (layer tables, resolved modules, receptive fields),
    #: dropped when the structure changes (moved, cast, a submodule replaced; see :mod:`.cache`);
    #: not part of the model's identity
    cache: ModelCache = field(default_factory=ModelCache, repr=False)

    @property
    def device(self) -> torch.device:
        """The device of the module's first parameter or buffer (CPU for a module without any)."""
        for t in (*self.module.parameters(), *self.module.buffers()):
            return t.device
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype of the module (:func:`module_dtype`: float32, or float16/bfloat16 for a
        half-precision model); :meth:`preprocess` makes its inputs in it."""
        return module_dtype(self.module)

    def to(self, device: torch.device | str) -> Model:
        """Move the module to ``device`` (in place) and return self."""
        self.module.to(device)
        return self

    def preprocess(self, images: Image.Image | Sequence[Image.Image], *, crop: bool = True) -> torch.Tensor:
        """One image or a list of images (in :attr:`Preprocessing.pil_mode`) → batch (N, C, H, W) on the
        model's device, in its floating dtype (:attr:`dtype`; normalized in float32 first)."""
        if isinstance(images, Image.Image):
            images = [images]
        batch = torch.stack([self.preprocessing.to_tensor(im, crop=crop) for im in images])
        return batch.to(self.device, self.dtype, non_blocking=True)

    @property
    def num_classes(self) -> int | None:
        """How many class names the model has (one per output logit), or None when they are unknown."""
        return len(self.class_names) if self.class_names is not None else None

    def label(self, index: int) -> str:
        """The class name of logit ``index`` (its number when names are unknown)."""
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return f"class {index}"

    def short_label(self, index: int) -> str:
        """The first synonym of a class name ("tabby, tabby cat" → "tabby")."""
        return self.label(index).split(",")[0].strip()

    def class_index(self, name_or_index: str | int) -> int:
        """Resolve a class given as an index or a name (any comma-separated synonym, case-insensitive)."""
        if isinstance(name_or_index, int) or str(name_or_index).strip().isdigit():
            idx = int(name_or_index)
            if self.class_names is not None and not 0 <= idx < len(self.class_names):
                raise UnitError(f"class index {idx} is out of range: the model has {len(self.class_names)} classes")
            return idx
        if self.class_names is None:
            raise UnitError(f"class {name_or_index!r} given by name but this model has no class names: use --labels FILE or an index")
        want = str(name_or_index).strip().lower()
        for i, full in enumerate(self.class_names):
            if want == full.lower() or want in (s.strip().lower() for s in full.split(",")):
                return i
        close = [n for n in self.class_names if want in n.lower()][:5]
        hint = f"; did you mean: {', '.join(repr(c) for c in close)}" if close else ""
        raise UnitError(f"no class named {name_or_index!r}{hint}")


def require_model(model: object) -> Model:
    """``model`` itself when it is a :class:`Model`; else a :class:`ModelError` that says how to make one
    (the library's functions read a Model's preprocessing and keep their caches on it)."""
    if isinstance(model, Model):
        return model
    if isinstance(model, nn.Module):
        raise ModelError(
            f"expected a deepvis Model, not the bare module {type(model).__name__}: wrap it once with "
            "deepvis.as_model(module) (its preprocessing inferred, or preprocessing=Preprocessing(...)) and pass that"
        )
    raise ModelError(f"expected a deepvis Model (deepvis.load_model(NAME) or deepvis.as_model(module)), not {type(model).__name__}")
