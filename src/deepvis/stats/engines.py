"""Where streaming statistics run: ``local`` (this process) or ``ray`` (a pool of Ray actors, local or on a cluster).

Both engines do the same two kinds of work and give bit-identical results on the same hardware:

* **statistics** (:meth:`Engine.mine`) — the batches of a sample list (consecutive runs of
  ``batch_size`` samples, see :func:`batch_indices`) are folded into :class:`~.accumulators.Accumulator`
  states (the atlas's per-layer top-k and statistics; the report's activity, locality, pooled features
  and thumbnails); the Ray engine hands groups of batches to its actors and merges the partial states
  exactly;
* **jobs** (:meth:`Engine.map`) — ``fn(model, dataset, job)`` for independent jobs (the atlas's unit
  tasks: views and synthesized images), wherever the engine sends them.

Work is always split on the same boundaries (whole batches; whole jobs), so every tensor a result
depends on is computed from the same inputs in the same batch composition on every engine.

Autocast: a plan's ``autocast`` (``"bf16"``, ``"fp16"``; None: off) runs the statistics passes' forward
pass under :func:`deepvis.runtime.autocast`; the states still accumulate in float32 (top-k values,
extremes) and exact float64 sums, since every accumulator casts what it reads. Jobs (:meth:`Engine.map`:
the atlas's receptive-field crops, backprop views and synthesized images) never run under it.
"""

from __future__ import annotations

import copy
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch

from ..capture import LOGITS, capture
from ..choices import ENGINES
from ..datasets import Batch, ImageDataset, iter_batches
from ..errors import DeepvisError
from ..models.model import Model
from ..runtime import Autocast
from .accumulators import INPUT, Accumulator

__all__ = [
    "ENGINES",
    "StatsPlan",
    "MiningStep",
    "MiningProgress",
    "Engine",
    "LocalEngine",
    "RayEngine",
    "make_engine",
    "worker_device",
    "mine",
    "update_states",
    "num_batches",
    "batch_indices",
]

_J = TypeVar("_J")
_R = TypeVar("_R")


class StatsPlan(Protocol):
    """What an engine needs to make empty states on a worker: ``batch_size`` samples per batch,
    ``autocast`` the forward pass's autocast (None: off; see :func:`deepvis.runtime.autocast`), and
    ``empty_states(device, names)``, the fresh states of the given names (None: all)."""

    @property
    def batch_size(self) -> int: ...

    @property
    def autocast(self) -> Autocast: ...

    def empty_states(self, device: torch.device | str = "cpu", names: Iterable[str] | None = None) -> dict[str, Accumulator]: ...


def num_batches(n: int, batch_size: int) -> int:
    """How many batches of ``batch_size`` cover ``n`` samples."""
    return -(-n // batch_size)


def batch_indices(batch: int, batch_size: int, n: int) -> range:
    """The positions (in the sample list) of batch number ``batch``: consecutive runs of ``batch_size``.

    The engines always split work on these boundaries, so every input meets the same neighbours in its
    batch wherever it is processed (which keeps results bit-identical across engines and resumes).
    """
    return range(batch * batch_size, min(n, (batch + 1) * batch_size))


@dataclass
class MiningStep:
    """What one batch of :func:`mine` did: its number, how many inputs it counted, and the files skipped."""

    batch: int
    images: int
    skipped: list[tuple[int, str]]


def _batch_samples(batches: Iterable[int], batch_size: int, order: Sequence[int]) -> list[tuple[int, list[int]]]:
    return [(b, [order[i] for i in batch_indices(b, batch_size, len(order))]) for b in batches]


def update_states(
    model: Model, x: torch.Tensor, samples: torch.Tensor, states: Iterable[Accumulator], *, autocast: Autocast = None
) -> None:
    """Fold one batch into ``states``: ``x`` (B, C, H, W) the preprocessed inputs, ``samples`` (B,) int64
    their dataset indices (moved to ``x``'s device once, without a host sync). One forward pass captures
    the layers the states read (stopping after the deepest), under ``autocast`` when given (``"bf16"``,
    ``"fp16"``; the states accumulate in float32 whatever the activations' dtype); a state reading
    :data:`~.accumulators.INPUT` gets ``x``. Does not touch ``done``."""
    samples = _on_device(samples, x.device)
    states = list(states)
    layers = list(dict.fromkeys(st.layer for st in states if st.layer != INPUT))
    acts = capture(model, x, layers, stop_early=LOGITS not in layers, autocast=autocast) if layers else {}
    acts[INPUT] = x
    for st in states:
        st.update(acts[st.layer], samples)


def _on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` (a small CPU tensor) on ``device``; to CUDA through pinned memory without a host sync."""
    if t.device == device or device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def _fold(
    model: Model,
    dataset: ImageDataset,
    states: Mapping[str, Accumulator],
    jobs: Sequence[tuple[int, list[int]]],
    batch_size: int,
    workers: int,
    autocast: Autocast = None,
) -> Iterator[MiningStep]:
    """Fold the batches ``jobs`` ((batch number, its samples), ascending) into ``states``, the forward
    passes under ``autocast``. Every batch but the sample list's last holds ``batch_size`` samples, so
    the loader's batches line up with them."""
    todo = [(b, s) for b, s in jobs if any(b not in st.done for st in states.values())]
    stream = iter_batches(dataset, model, batch_size, indices=[i for _b, s in todo for i in s], workers=workers)
    for (b, want), batch in zip(todo, stream):
        _expect(batch, b, want)
        need = [st for st in states.values() if b not in st.done]
        if batch.indices:
            update_states(model, batch.x, torch.tensor(batch.indices, dtype=torch.int64), need, autocast=autocast)
        for st in need:
            st.done.add(b)
        yield MiningStep(b, len(batch.indices), batch.skipped)


def mine(
    model: Model,
    dataset: ImageDataset,
    states: Mapping[str, Accumulator],
    batches: Iterable[int],
    batch_size: int,
    *,
    indices: Sequence[int] | None = None,
    workers: int = 2,
    autocast: Autocast = None,
) -> Iterator[MiningStep]:
    """Run the model over the given batches and fold them into ``states`` (each reads its ``layer``).

    Batch ``b`` holds the samples at positions :func:`batch_indices` of ``indices`` (default: the whole
    dataset in order). A batch already in a state's ``done`` set is not counted again for that state.
    Yields one :class:`MiningStep` per batch, after the states include it (so the caller may
    checkpoint). Decoding runs in ``workers`` threads, overlapping the forward passes; the forward pass
    stops at the deepest layer needed and runs under ``autocast`` when given (``"bf16"``, ``"fp16"``:
    see :func:`deepvis.runtime.autocast`; the states still accumulate in float32).
    """
    order: Sequence[int] = range(len(dataset)) if indices is None else indices
    todo = sorted({b for b in batches if any(b not in st.done for st in states.values())})
    yield from _fold(model, dataset, states, _batch_samples(todo, batch_size, order), batch_size, workers, autocast)


def _expect(batch: Batch, b: int, want: Sequence[int]) -> None:
    got = set(batch.indices) | {i for i, _ in batch.skipped}
    if got != set(want):  # a programming error, not bad input
        raise RuntimeError(f"batch {b} holds samples {sorted(got)[:4]}..., expected {sorted(want)[:4]}...")


@dataclass
class MiningProgress:
    """Batches just folded into the states, the inputs they counted and the files skipped in them."""

    batches: list[int]
    images: int
    skipped: list[tuple[int, str]] = field(default_factory=list)


class Engine(ABC):
    """Runs statistics passes and jobs; see the module docs."""

    #: where states are kept while the engine updates them
    state_device: torch.device = torch.device("cpu")

    @abstractmethod
    def mine(
        self, plan: StatsPlan, states: Mapping[str, Accumulator], batches: Sequence[int], *, indices: Sequence[int] | None = None
    ) -> Iterator[MiningProgress]:
        """Fold ``batches`` of ``indices`` (default: the whole dataset) into ``states`` (in place); yield
        after each step so the caller can checkpoint."""

    @abstractmethod
    def map(self, fn: Callable[[Model, ImageDataset, _J], _R], jobs: Sequence[_J]) -> Iterator[_R]:
        """Run ``fn(model, dataset, job)`` for each job; yield each result as it finishes (in any order).

        ``fn`` must be a module-level function (the Ray engine sends it to its workers by name)."""

    @abstractmethod
    def close(self) -> None:
        """Release the engine's workers."""

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LocalEngine(Engine):
    """Everything in this process, on the model's device; decoding in ``decode_threads`` threads."""

    def __init__(self, model: Model, dataset: ImageDataset, *, decode_threads: int = 2) -> None:
        self.model = model
        self.dataset = dataset
        self.decode_threads = decode_threads
        self.state_device = model.device

    def mine(
        self, plan: StatsPlan, states: Mapping[str, Accumulator], batches: Sequence[int], *, indices: Sequence[int] | None = None
    ) -> Iterator[MiningProgress]:
        steps = mine(
            self.model, self.dataset, states, batches, plan.batch_size, indices=indices, workers=self.decode_threads, autocast=plan.autocast
        )
        for step in steps:
            yield MiningProgress([step.batch], step.images, step.skipped)

    def map(self, fn: Callable[[Model, ImageDataset, _J], _R], jobs: Sequence[_J]) -> Iterator[_R]:
        for job in jobs:
            yield fn(self.model, self.dataset, job)

    def close(self) -> None:
        """Nothing to release."""


# -- Ray --------------------------------------------------------------------------------------------------


class _Worker:
    """A Ray actor: one copy of the model and the dataset, on the driver's device type (``cpu``, or
    ``cuda``: the GPU Ray assigned to this actor, which it sees as ``cuda:0``)."""

    def __init__(self, model: Model, dataset: ImageDataset, threads: int, decode_threads: int, device: str = "cpu") -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.model = model.to(torch.device(device))
        self.dataset = dataset
        self.decode_threads = decode_threads

    def mine(
        self, plan: StatsPlan, names: list[str], jobs: list[tuple[int, list[int]]]
    ) -> tuple[dict[str, bytes], int, list[tuple[int, str]]]:
        states = plan.empty_states(self.model.device, names)
        images, skipped = 0, []
        for step in _fold(self.model, self.dataset, states, jobs, plan.batch_size, self.decode_threads, plan.autocast):
            images += step.images
            skipped += step.skipped
        return {name: st.to_bytes() for name, st in states.items()}, images, skipped

    def run(self, fn: Callable[[Model, ImageDataset, Any], Any], job: Any) -> Any:
        return fn(self.model, self.dataset, job)

    def ready(self) -> str:
        return str(self.model.device)


def worker_device(device: torch.device) -> str:
    """The device a Ray worker computes on for a driver model on ``device``: ``cpu`` or ``cuda``
    (each worker's own GPU); other device types are refused in one line."""
    if device.type in ("cpu", "cuda"):
        return device.type
    raise DeepvisError(f"the ray engine runs workers on cpu or cuda, not on {device}: use --device cpu or cuda")


def _portable(model: Model) -> Model:
    """A CPU copy of the model to ship to workers (the model itself when it already lives on the CPU)."""
    if model.device.type == "cpu":
        return model
    out = copy.deepcopy(model)
    return out.to("cpu")


class RayEngine(Engine):
    """A pool of Ray actors, each holding the model and the dataset on the driver's device type.

    Device policy: the workers compute on the device type of the model given here (the driver's
    ``--device``). A CPU model gives CPU workers that reserve no GPU, also on a cluster that has GPUs;
    a CUDA model gives workers that each reserve a GPU share from Ray and use the GPU Ray assigns
    them (the driver's device index does not carry over: Ray chooses the GPUs), and a cluster without
    GPUs is refused in one line.

    With no ``address`` Ray starts locally in this process (``workers`` actors, default 2 for CPU
    workers, else one per GPU); with an address (``ray://host:10001`` or ``auto``) it joins that
    cluster. Each actor reserves ``cpus_per_worker`` CPUs (default: an equal share) and runs PyTorch
    with ``threads`` threads (default: as many as this process, so CPU results match the local engine
    bit for bit). The model and the dataset's sample list are sent through Ray's object store, so the nodes
    need deepvis installed and the image files reachable at the same paths (a shared filesystem), but
    not the model's weights file.
    """

    def __init__(
        self,
        model: Model,
        dataset: ImageDataset,
        *,
        address: str | None = None,
        workers: int | None = None,
        cpus_per_worker: float | None = None,
        threads: int | None = None,
        decode_threads: int = 2,
    ) -> None:
        try:
            import ray  # an optional dependency, imported only for this engine
        except ImportError as exc:
            raise DeepvisError("the ray engine needs Ray: pip install 'deepvis[ray]' (or pip install ray)") from exc
        self._ray = ray
        self._started = False
        self._samples = len(dataset)
        self.actors: list[Any] = []
        #: the device type every worker computes on (``cpu`` or ``cuda``) and what each worker reported
        self.device: str = worker_device(model.device)
        self.worker_devices: list[str] = []
        if not ray.is_initialized():
            kwargs: dict[str, Any] = dict(include_dashboard=False, logging_level="ERROR", log_to_driver=True)
            if address is None:
                local_cpus = os.cpu_count() or 1
                kwargs["num_cpus"] = max(local_cpus, workers or 0)
            try:
                ray.init(address=address, **kwargs)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise DeepvisError(f"cannot start or join Ray at {address or 'localhost'}: {exc}") from exc
            self._started = True
        try:
            res = ray.cluster_resources()
            cpus = int(res.get("CPU", 1))
            gpus = int(res.get("GPU", 0)) if self.device == "cuda" else 0
            if self.device == "cuda" and gpus == 0:
                raise DeepvisError(
                    f"the model is on {model.device} but the Ray cluster has no GPUs: use --device cpu or join a cluster with GPUs"
                )
            n = workers or (gpus if gpus else min(2, cpus))
            if n < 1:
                raise DeepvisError("the ray engine needs at least one worker")
            per_gpu = (1 if gpus >= n else gpus / n) if gpus else 0
            per_cpu = cpus_per_worker if cpus_per_worker is not None else max(1, cpus // n)
            # the driver's thread count by default: CPU kernels may sum in another order with another
            # number of threads, and the Ray engine promises the local engine's exact results
            threads = threads or torch.get_num_threads()
            actor = ray.remote(_Worker).options(num_cpus=per_cpu, num_gpus=per_gpu, max_concurrency=1)
            model_ref = ray.put(_portable(model))
            data_ref = ray.put(dataset)
            self.actors = [actor.remote(model_ref, data_ref, threads, decode_threads, self.device) for _ in range(n)]
            self.worker_devices = ray.get([a.ready.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise
        self.state_device = torch.device("cpu")

    @property
    def workers(self) -> int:
        """How many actors the pool holds."""
        return len(self.actors)

    def _pool(self, method: str, jobs: Sequence[tuple[Any, ...]], inflight: int = 2) -> Iterator[tuple[int, Any]]:
        """Run ``method(*job)`` for each job on the actors (up to ``inflight`` queued per actor); yield
        (job number, result) as they complete."""
        ray = self._ray
        queue = list(enumerate(jobs))[::-1]
        running: dict[Any, tuple[int, int]] = {}
        load = [0] * len(self.actors)

        def feed() -> None:
            while queue:
                a = min(range(len(self.actors)), key=load.__getitem__)
                if load[a] >= inflight:
                    return
                j, args = queue.pop()
                running[getattr(self.actors[a], method).remote(*args)] = (j, a)
                load[a] += 1

        feed()
        while running:
            done, _ = ray.wait(list(running), num_returns=1)
            for ref in done:
                j, a = running.pop(ref)
                load[a] -= 1
                result = ray.get(ref)
                feed()
                yield j, result

    def mine(
        self, plan: StatsPlan, states: Mapping[str, Accumulator], batches: Sequence[int], *, indices: Sequence[int] | None = None
    ) -> Iterator[MiningProgress]:
        todo = sorted({b for b in batches if any(b not in st.done for st in states.values())})
        if not todo:
            return
        # only states still needing a batch are computed for it; group batches by that need
        groups: dict[tuple[str, ...], list[int]] = {}
        for b in todo:
            groups.setdefault(tuple(n for n, st in states.items() if b not in st.done), []).append(b)
        # a task is a run of batches through one loader; big runs keep the pipeline full, 4+ per worker
        # balance the load (results do not depend on the split: merging is exact)
        size = max(1, min(64, math.ceil(len(todo) / (4 * len(self.actors)))))
        order: Sequence[int] = range(self._samples) if indices is None else indices
        jobs: list[tuple[Any, ...]] = []
        for names, bs in groups.items():
            for i in range(0, len(bs), size):
                part = bs[i : i + size]
                jobs.append((plan, list(names), _batch_samples(part, plan.batch_size, order)))
        for j, (parts, images, skipped) in self._pool("mine", jobs):
            for name, data in parts.items():
                st = states[name]
                st.merge(type(st).from_bytes(st.layer, data, self.state_device))
            yield MiningProgress([b for b, _s in jobs[j][2]], images, skipped)

    def map(self, fn: Callable[[Model, ImageDataset, _J], _R], jobs: Sequence[_J]) -> Iterator[_R]:
        for _j, result in self._pool("run", [(fn, job) for job in jobs]):
            yield result

    def close(self) -> None:
        ray = self._ray
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False


def make_engine(
    name: str | Engine,
    model: Model,
    dataset: ImageDataset,
    *,
    ray_address: str | None = None,
    workers: int | None = None,
    decode_threads: int = 2,
) -> Engine:
    """An engine by name: ``local`` or ``ray`` (an :class:`Engine` instance is returned as is)."""
    if isinstance(name, Engine):
        return name
    if name == "local":
        return LocalEngine(model, dataset, decode_threads=decode_threads)
    if name == "ray":
        return RayEngine(model, dataset, address=ray_address, workers=workers, decode_threads=decode_threads)
    raise DeepvisError(f"unknown engine {name!r}: use {' or '.join(ENGINES)}")
