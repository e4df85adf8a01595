"""Image datasets: a folder of images, a text file listing paths, or the offline ``demo`` dataset.

* A **folder** is read recursively (hidden files and folders are ignored) and its images are sorted by
  their path relative to the folder. When every image lies in a first-level subfolder (the
  ImageFolder layout ``root/CLASS/.../img.jpg``), the subfolder names are the class labels.
* A **.txt file** lists one image path per line, relative to the file's folder (absolute paths are kept);
  a line may carry a label after a tab (``path<TAB>label``); blank lines and ``#`` comments are skipped.
* ``demo`` is built from the sample photos that ship inside installed packages (scikit-image,
  scikit-learn, matplotlib; see :func:`deepvis.io.sample_photos`), each seen through 16 deterministic
  crops and flips, so that there are a few hundred inputs, labelled by their source photo.

:func:`iter_batches` turns a dataset into preprocessed batches, decoding images in background threads
while the caller runs the model; an unreadable file is skipped and reported, never fatal.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image, ImageOps

from .choices import DATASET_SPEC_HELP
from .errors import InputError
from .io import IMAGE_SUFFIXES, load_image, sample_photos
from .models.model import Model

__all__ = [
    "Sample",
    "ImageDataset",
    "Batch",
    "DemoView",
    "open_dataset",
    "iter_batches",
    "DEMO",
    "DEMO_VIEWS",
    "DATASET_SPEC_HELP",
]

#: the name of the built-in offline dataset
DEMO = "demo"


@dataclass(frozen=True, slots=True)
class Sample:
    """One input of a dataset.

    ``index`` is its position in the dataset, ``key`` a stable id (the path relative to the dataset
    root, or e.g. ``demo/coffee/crop03``), ``label`` its class name when the dataset has classes, and
    ``source`` the file its pixels come from.
    """

    index: int
    key: str
    label: str | None
    source: str


@dataclass(frozen=True, slots=True)
class DemoView:
    """A deterministic view of a photo: a square crop (center and side as fractions) and a mirror flip.

    ``side`` is a fraction of the photo's shorter side; ``cx``, ``cy`` place the crop's center as a
    fraction of the room left for it (0 = left/top edge, 1 = right/bottom edge).
    """

    side: float
    cx: float
    cy: float
    flip: bool

    def apply(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        s = max(1, round(self.side * min(w, h)))
        left = round(self.cx * (w - s))
        top = round(self.cy * (h - s))
        out = image.crop((left, top, left + s, top + s)) if self.side < 1 else image
        return ImageOps.mirror(out) if self.flip else out


def _demo_views() -> tuple[DemoView, ...]:
    views = [DemoView(1.0, 0.5, 0.5, False), DemoView(1.0, 0.5, 0.5, True)]
    places = ((0.5, 0.5), (0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.0, 1.0))
    for side in (0.8, 0.6):
        for cx, cy in places:
            views.append(DemoView(side, cx, cy, len(views) % 2 == 1))
    for cx, cy in places[1:]:
        views.append(DemoView(0.45, cx, cy, len(views) % 2 == 1))
    return tuple(views)


#: the 16 views of each photo in the ``demo`` dataset (index = the ``cropNN`` number in its keys)
DEMO_VIEWS: tuple[DemoView, ...] = _demo_views()


@dataclass(eq=False)
class ImageDataset:
    """A list of image samples with an optional class list; :meth:`load` reads one as a Pillow image.

    ``spec`` is the string the dataset was opened from (a worker can reopen it with
    :func:`open_dataset`). Views (``views[i]``) apply to the ``demo`` dataset only.
    """

    samples: list[Sample]
    classes: list[str] | None = None
    spec: str = ""
    views: list[DemoView | None] | None = None
    _cache: dict[str, Image.Image] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __len__(self) -> int:
        return len(self.samples)

    def __getstate__(self) -> dict[str, object]:  # picklable for process/Ray workers: no lock, no cache
        state = dict(self.__dict__)
        state["_cache"] = {}
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def load(self, i: int, mode: str = "RGB") -> Image.Image:
        """Read sample ``i`` as a Pillow image in ``mode`` (``"RGB"`` or ``"L"``).

        Raises :class:`~deepvis.errors.InputError` for a missing, unreadable or damaged file.
        """
        sample = self.samples[i]
        view = self.views[i] if self.views is not None else None
        if view is None:
            return load_image(sample.source, mode)
        return view.apply(self._photo(sample.source, mode))

    def _photo(self, source: str, mode: str) -> Image.Image:
        # demo sources are a couple of dozen photos, each seen 16 times: decode each once per dataset
        key = f"{mode}:{source}"
        with self._lock:
            im = self._cache.get(key)
        if im is None:
            im = load_image(source, mode)
            with self._lock:
                self._cache[key] = im
        return im

    def fingerprint(self) -> str:
        """A short hash of the sample keys in order (two datasets with equal fingerprints list the same inputs)."""
        h = hashlib.sha256()
        for s in self.samples:
            h.update(s.key.encode("utf-8", "surrogateescape"))
            h.update(b"\0")
        return h.hexdigest()[:16]

    def label_indices(self) -> list[int] | None:
        """The class index of each sample (None when the dataset has no classes)."""
        if self.classes is None:
            return None
        lookup = {c: k for k, c in enumerate(self.classes)}
        return [lookup[s.label] if s.label is not None else -1 for s in self.samples]


def open_dataset(spec: str | os.PathLike[str]) -> ImageDataset:
    """Open a dataset: a folder, a ``.txt`` list of paths, or ``"demo"`` (see the module docs).

    Raises :class:`~deepvis.errors.InputError` when the spec names nothing usable or no image.
    """
    text = os.fspath(spec)
    if text == DEMO:
        return _demo()
    path = Path(text)
    if not path.exists():
        raise InputError(f"dataset not found: {text} (give {DATASET_SPEC_HELP})")
    if path.is_dir():
        ds = _folder(path)
    elif path.suffix.lower() == ".txt":
        ds = _listing(path)
    else:
        raise InputError(f"dataset {text} is neither a folder nor a .txt list of image paths")
    if not ds.samples:
        raise InputError(f"dataset {text} holds no images (looked for {', '.join(IMAGE_SUFFIXES)})")
    return ds


def _demo() -> ImageDataset:
    photos = sample_photos()
    if not photos:
        raise InputError("the demo dataset needs scikit-image, scikit-learn or matplotlib installed (none has sample photos here)")
    samples: list[Sample] = []
    views: list[DemoView | None] = []
    for name, path in sorted(photos.items()):
        for k, view in enumerate(DEMO_VIEWS):
            samples.append(Sample(len(samples), f"demo/{name}/crop{k:02d}", name, str(path)))
            views.append(view)
    return ImageDataset(samples, sorted(photos), DEMO, views)


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_SUFFIXES)


def _folder(root: Path) -> ImageDataset:
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = os.path.relpath(dirpath, root)
        for f in filenames:
            if _is_image(f):
                rels.append(f if rel_dir == "." else f"{Path(rel_dir).as_posix()}/{f}")
    rels.sort()
    classed = bool(rels) and all("/" in r for r in rels)
    classes = sorted({r.split("/", 1)[0] for r in rels}) if classed else None
    samples = [Sample(i, r, r.split("/", 1)[0] if classed else None, str(root / r)) for i, r in enumerate(rels)]
    return ImageDataset(samples, classes, os.fspath(root))


def _listing(path: Path) -> ImageDataset:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read the dataset list {path}: {exc}") from exc
    base = path.parent
    entries: list[tuple[str, str | None]] = []
    for line in lines:
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, _, label = line.rstrip("\r\n").partition("\t")
        name = name.strip()
        entries.append((name, label.strip() or None))
    labelled = bool(entries) and all(lab is not None for _, lab in entries)
    classes = sorted({lab for _, lab in entries if lab is not None}) if labelled else None
    samples = [
        Sample(i, name, lab if labelled else None, str(Path(name) if os.path.isabs(name) else base / name))
        for i, (name, lab) in enumerate(entries)
    ]
    return ImageDataset(samples, classes, os.fspath(path))


# -- batches -------------------------------------------------------------------------------------------

Preprocess = Model | Callable[[list[Image.Image]], torch.Tensor]


@dataclass
class Batch:
    """Preprocessed inputs: ``x`` (N, C, H, W) holds the samples ``indices`` (in order); ``skipped``
    lists ``(index, reason)`` for the samples of this batch that could not be read. When every sample
    of a batch is unreadable, ``indices`` is empty and ``x`` has zero rows."""

    indices: list[int]
    x: torch.Tensor
    skipped: list[tuple[int, str]]


def _prepare(dataset: ImageDataset, i: int, mode: str, fn: Callable[[Image.Image], torch.Tensor]) -> torch.Tensor | str:
    try:
        return fn(dataset.load(i, mode))
    except InputError as exc:
        return str(exc)


def iter_batches(
    dataset: ImageDataset,
    preprocess: Preprocess,
    batch_size: int,
    *,
    indices: Sequence[int] | Iterable[int] | None = None,
    workers: int = 2,
    mode: str | None = None,
    prefetch: int = 2,
) -> Iterator[Batch]:
    """Yield :class:`Batch` es of ``batch_size`` samples (the last may be smaller), in order.

    ``preprocess`` is a :class:`~deepvis.models.Model` (its preprocessing; batches land on the model's
    device, pinned and non-blocking on CUDA) or a function from a list of Pillow images to an
    (N, C, H, W) tensor. ``indices`` restricts and orders the samples (default: all). Decoding and
    preprocessing run in ``workers`` background threads (0: in the calling thread), up to ``prefetch``
    batches ahead, so they overlap the caller's forward pass. ``mode`` is the Pillow mode the images are
    read in (default: the model's, or ``"RGB"``). Unreadable files are reported in ``Batch.skipped``.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    order = list(range(len(dataset))) if indices is None else list(indices)
    device: torch.device | None = None
    if isinstance(preprocess, Model):
        pre = preprocess.preprocessing
        mode = mode or pre.pil_mode
        device = preprocess.device

        def one(im: Image.Image) -> torch.Tensor:
            return pre.to_tensor(im)
    else:
        fn = preprocess
        mode = mode or "RGB"

        def one(im: Image.Image) -> torch.Tensor:
            return fn([im])[0]

    chunks = [order[k : k + batch_size] for k in range(0, len(order), batch_size)]

    def collect(chunk: list[int], results: list[torch.Tensor | str]) -> Batch:
        good = [(i, r) for i, r in zip(chunk, results) if isinstance(r, torch.Tensor)]
        skipped = [(i, r) for i, r in zip(chunk, results) if isinstance(r, str)]
        if not good:
            return Batch([], torch.empty(0), skipped)
        x = torch.stack([r for _, r in good])
        if device is not None and device.type != "cpu":
            x = x.pin_memory().to(device, non_blocking=True)
        return Batch([i for i, _ in good], x, skipped)

    if workers <= 0:
        for chunk in chunks:
            yield collect(chunk, [_prepare(dataset, i, mode, one) for i in chunk])
        return

    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="deepvis-decode")
    pending: deque[tuple[list[int], list[Future]]] = deque()
    try:
        it = iter(chunks)

        def submit() -> bool:
            chunk = next(it, None)
            if chunk is None:
                return False
            pending.append((chunk, [pool.submit(_prepare, dataset, i, mode, one) for i in chunk]))
            return True

        for _ in range(max(1, prefetch) + 1):
            if not submit():
                break
        while pending:
            chunk, futures = pending.popleft()
            submit()
            yield collect(chunk, [f.result() for f in futures])
    finally:
        for _, futures in pending:
            for f in futures:
                f.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
