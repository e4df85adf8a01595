"""Datasets: folders, path lists, the offline demo set, and batching with bad files."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from deepvis.datasets import DEMO_VIEWS, ImageDataset, iter_batches, open_dataset
from deepvis.errors import InputError


def _png(path, value: int, size=(20, 16)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), value, np.uint8)).save(path)


def _to_tensor(images: list[Image.Image]) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.asarray(im.resize((8, 8)), np.float32).copy()).permute(2, 0, 1) / 255 for im in images])


def test_folder_with_class_subfolders(tmp_path):
    _png(tmp_path / "cat" / "b.png", 10)
    _png(tmp_path / "cat" / "a.png", 20)
    _png(tmp_path / "dog" / "deep" / "c.jpg", 30)
    _png(tmp_path / ".hidden" / "x.png", 40)
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = open_dataset(tmp_path)
    assert [s.key for s in ds.samples] == ["cat/a.png", "cat/b.png", "dog/deep/c.jpg"]
    assert [s.label for s in ds.samples] == ["cat", "cat", "dog"]
    assert ds.classes == ["cat", "dog"]
    assert ds.label_indices() == [0, 0, 1]
    assert [s.index for s in ds.samples] == [0, 1, 2]
    assert np.asarray(ds.load(1))[0, 0, 0] == 10


def test_flat_folder_has_no_labels(tmp_path):
    _png(tmp_path / "a.png", 1)
    _png(tmp_path / "sub" / "b.png", 2)
    ds = open_dataset(str(tmp_path))
    assert [s.key for s in ds.samples] == ["a.png", "sub/b.png"]
    assert ds.classes is None and all(s.label is None for s in ds.samples)


def test_text_listing_relative_to_the_file(tmp_path):
    _png(tmp_path / "imgs" / "one.png", 50)
    _png(tmp_path / "two.png", 60)
    lst = tmp_path / "lists" / "train.txt"
    lst.parent.mkdir()
    lst.write_text("# a comment\n../imgs/one.png\tfoo\n\n../two.png\tbar\n")
    ds = open_dataset(lst)
    assert [s.key for s in ds.samples] == ["../imgs/one.png", "../two.png"]
    assert ds.classes == ["bar", "foo"] and [s.label for s in ds.samples] == ["foo", "bar"]
    assert np.asarray(ds.load(1))[0, 0, 0] == 60


def test_open_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        open_dataset(tmp_path / "nope")
    with pytest.raises(InputError, match="no images"):
        open_dataset(tmp_path)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(InputError, match="neither"):
        open_dataset(tmp_path / "x.csv")


def test_demo_dataset_is_deterministic_and_labelled():
    ds = open_dataset("demo")
    assert len(ds) >= 200 and len(ds) == len(ds.classes) * len(DEMO_VIEWS)
    assert len(set(s.key for s in ds.samples)) == len(ds)
    s = next(s for s in ds.samples if s.key == "demo/coffee/crop03")
    assert s.label == "coffee"
    a = np.asarray(ds.load(s.index))
    again = open_dataset("demo")
    assert again.fingerprint() == ds.fingerprint()
    assert np.array_equal(np.asarray(again.load(s.index)), a)
    # the views really differ from one another
    first = np.asarray(ds.load(s.index - 3))
    assert first.shape != a.shape or not np.array_equal(first, a)
    flipped = np.asarray(ds.load(s.index - 2))
    assert np.array_equal(flipped, first[:, ::-1])
    # picklable for worker processes, and equal after the trip
    clone = pickle.loads(pickle.dumps(ds))
    assert isinstance(clone, ImageDataset) and np.array_equal(np.asarray(clone.load(s.index)), a)


def test_bad_files_are_skipped_and_reported(tmp_path):
    for k in range(7):
        _png(tmp_path / f"img{k}.png", 10 * k)
    (tmp_path / "img2.png").write_bytes(b"")  # empty
    (tmp_path / "img5.png").write_bytes((tmp_path / "img4.png").read_bytes()[:40])  # truncated
    ds = open_dataset(tmp_path)
    for workers in (0, 2):
        batches = list(iter_batches(ds, _to_tensor, 3, workers=workers))
        assert [b.indices for b in batches] == [[0, 1], [3, 4], [6]]
        assert [i for b in batches for i, _ in b.skipped] == [2, 5]
        assert all("img" in why for b in batches for _, why in b.skipped)
        assert [b.x.shape[0] for b in batches] == [2, 2, 1]
        assert torch.allclose(batches[1].x[0, 0, 0, 0], torch.tensor(30 / 255))


def test_a_batch_of_only_bad_files(tmp_path):
    _png(tmp_path / "a.png", 1)
    (tmp_path / "b.png").write_bytes(b"junk")
    ds = open_dataset(tmp_path)
    batches = list(iter_batches(ds, _to_tensor, 1, indices=[1, 0]))
    assert batches[0].indices == [] and batches[0].x.shape[0] == 0 and batches[0].skipped[0][0] == 1
    assert batches[1].indices == [0]


def test_batches_with_a_model_match_its_preprocess(default_model):
    ds = open_dataset("demo")
    idx = [5, 40, 41, 300, 7]
    got = list(iter_batches(ds, default_model, 2, indices=idx, workers=2))
    assert [i for b in got for i in b.indices] == idx
    x = torch.cat([b.x for b in got])
    want = default_model.preprocess([ds.load(i) for i in idx])
    assert torch.equal(x, want)
