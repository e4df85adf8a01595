"""Shared fixtures. Nothing here downloads anything."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread per process unless OMP_NUM_THREADS says otherwise, set before torch is imported so
# that the kernels, CLI runs and workers the tests start inherit it. The tests' tensors are small, and
# the suite runs servers, kernels, browsers and subprocesses beside the test's own torch: two OpenMP
# threads that must meet at every barrier while other processes hold the cores ran one test 113 s
# instead of 3 s (test_batched_equals_one_at_a_time_and_is_deterministic[1], 2 shared cores).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # after OMP_NUM_THREADS is set

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
