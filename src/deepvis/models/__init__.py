"""Models: the registry of named models, their preprocessing and class names.

>>> model = load_model("default")            # EfficientNet-Lite0, ImageNet, offline
>>> model = load_model("torchvision:resnet18", weights="resnet18.pth")
>>> model = load_model("timm:vit_tiny_patch16_224", weights="random")   # untrained, seed 0; model.weights says so
"""

from .efficientnet_lite import build_efficientnet_lite
from .identity import IDENTITY_KEYS, check_identity, identity_mismatch, model_hash, model_identity
from .labels import imagenet_class_names, read_labels
from .model import RANDOM_SEED, RANDOM_WEIGHTS, Model, WeightsKind, WeightsSource
from .preprocessing import IMAGENET_MEAN, IMAGENET_STD, Preprocessing
from .registry import MODEL_SPEC_HELP, ModelEntry, ModelRegistry, is_random_weights, load_model, register_model, registry
from .weights import load_weights, read_state_dict

__all__ = [
    "Model",
    "WeightsSource",
    "WeightsKind",
    "RANDOM_WEIGHTS",
    "RANDOM_SEED",
    "is_random_weights",
    "Preprocessing",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_model",
    "register_model",
    "registry",
    "ModelEntry",
    "ModelRegistry",
    "MODEL_SPEC_HELP",
    "build_efficientnet_lite",
    "imagenet_class_names",
    "read_labels",
    "load_weights",
    "read_state_dict",
    "IDENTITY_KEYS",
    "model_hash",
    "model_identity",
    "identity_mismatch",
    "check_identity",
]
