"""The report's scan on the Ray engine (2 local workers) gives the local engine's numbers, bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from deepvis.analysis import SummaryOptions, summarize
from deepvis.datasets import open_dataset
from deepvis.errors import DeepvisError
from deepvis.models import Model, Preprocessing
from deepvis.stats import RayEngine, worker_device

ray = pytest.importorskip("ray")


def _model() -> Model:
    torch.manual_seed(0)
    module = nn.Sequential()
    module.add_module("conv1", nn.Conv2d(3, 8, 3, stride=2, padding=1))
    module.add_module("relu1", nn.ReLU())
    module.add_module("conv2", nn.Conv2d(8, 6, 3, stride=2, padding=1))
    module.add_module("relu2", nn.ReLU())
    module.add_module("pool", nn.AdaptiveAvgPool2d(1))
    module.add_module("flat", nn.Flatten())
    module.add_module("fc", nn.Linear(6, 2))
    return Model(module, Preprocessing((32, 32), (0.5,) * 3, (0.5,) * 3, crop_pct=1.0), name="tiny", class_names=["a", "b"])


def _dataset(root):
    rng = np.random.default_rng(0)
    for i in range(23):
        folder = root / ("a" if i % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        if i == 7:  # dataset index 3 (a/img07.png): among the 20 inputs picked
            (folder / f"img{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")  # skipped, and listed once
        else:
            Image.fromarray((rng.random((24, 24, 3)) * 255).astype(np.uint8)).save(folder / f"img{i:02d}.png")
    return open_dataset(root)


@pytest.mark.slow
def test_ray_scan_equals_local_scan(tmp_path):
    model, ds = _model(), _dataset(tmp_path / "data")
    options = SummaryOptions(
        layers=("relu1", "relu2", "fc"), max_images=20, batch_size=4, top_k=3, epsilons=(), cluster_layers=(), decode_threads=1
    )
    local = summarize(model, ds, options, progress=False)
    # one local Ray for both engines below (as RayEngine starts it; test_atlas_ray has the engine start its own Ray
    # and shut it down); each engine here joins this one and leaves it running: Ray starts once, not twice
    ray.init(num_cpus=max(os.cpu_count() or 1, 2), include_dashboard=False, logging_level="ERROR")
    try:
        remote = summarize(model, ds, options, engine="ray", workers=2, progress=False)
        # the driver's device reaches the workers: a CPU model gives CPU workers that reserve no GPU
        pool = RayEngine(model, ds, workers=1)
        try:
            assert pool.device == "cpu" and pool.worker_devices == ["cpu"]
        finally:
            pool.close()
    finally:
        if ray.is_initialized():
            ray.shutdown()
    a, b = local.to_dict(), remote.to_dict()
    assert a["settings"].pop("engine") == "local" and b["settings"].pop("engine") == "ray"
    for key in a:
        if key != "timings":
            assert a[key] == b[key], key
    bad = next(s.index for s in ds.samples if s.key == "a/img07.png")
    assert [i for i, _ in local.skipped] == [bad] and len(local.samples) == 19 and remote.skipped == local.skipped
    for n in ("relu1", "relu2", "fc"):  # the arrays themselves, not only their JSON
        for field in ("mean", "mean_max", "max", "sparsity", "frac_zero", "top_samples", "top_positions"):
            assert np.array_equal(getattr(local.activity[n], field), getattr(remote.activity[n], field)), (n, field)
    assert np.array_equal(local.locality["relu1"].locality, remote.locality["relu1"].locality, equal_nan=True)
    assert local.thumbnails.keys() == remote.thumbnails.keys()
    assert all(local.thumbnails[i].tobytes() == remote.thumbnails[i].tobytes() for i in local.thumbnails)


def test_worker_device_follows_the_driver():
    assert worker_device(torch.device("cpu")) == "cpu"
    assert worker_device(torch.device("cuda", 1)) == "cuda"  # Ray assigns each worker its GPU
    with pytest.raises(DeepvisError, match="cpu or cuda, not on meta"):
        worker_device(torch.device("meta"))
