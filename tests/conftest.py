"""Shared fixtures. Nothing here downloads anything."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` are skipped, with the reason, where PyTorch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none here); scripts/gpu_check.py covers the rest on a GPU machine")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def default_model():
    """The built-in EfficientNet-Lite0 with its ImageNet weights (loaded once per test session)."""
    from deepvis.models import load_model

    return load_model("default", device="cpu")


@pytest.fixture(scope="session")
def sample_images():
    """name -> RGB Pillow image of the offline sample photos used in tests."""
    from deepvis.io import load_image, sample_path

    return {n: load_image(sample_path(n)) for n in ("coffee", "chelsea", "rocket", "astronaut")}
