"""Where atlas work runs: ``local`` (this process) or ``ray`` (a pool of Ray actors, local or on a cluster).

Both engines do the same three kinds of work and give bit-identical results on the same hardware:

* **mining** — the dataset's batches (consecutive runs of ``batch_size`` samples, see
  :func:`~deepvis.atlas.mining.batch_indices`) are mined into per-layer :class:`LayerMining` states;
  the Ray engine hands groups of batches to its actors and merges the partial states exactly;
* **unit tasks** — fixed groups of units (their crops and views, or their synthesized images), computed
  by :func:`deepvis.atlas.tasks.run_task` wherever the engine sends them.

Work is always split on the same boundaries (whole batches; fixed unit groups), so every tensor a
result depends on is computed from the same inputs in the same batch composition on every engine.
"""

from __future__ import annotations

import copy
import math
import os
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..datasets import ImageDataset
from ..errors import DeepvisError
from ..models.model import Model
from .mining import LayerMining, mine
from .tasks import UnitResult, UnitTask, run_task

__all__ = ["Engine", "LocalEngine", "RayEngine", "MiningProgress", "MiningPlan", "make_engine", "ENGINES"]

ENGINES = ("local", "ray")


@dataclass(frozen=True)
class MiningPlan:
    """What to mine: ``layers`` maps a layer to (units, map size (H, W) or None), ``k`` entries per unit."""

    layers: dict[str, tuple[int, tuple[int, int] | None]]
    k: int
    batch_size: int

    def empty_states(self, device: torch.device | str = "cpu") -> dict[str, LayerMining]:
        return {name: LayerMining(name, units, self.k, ms, device) for name, (units, ms) in self.layers.items()}


@dataclass
class MiningProgress:
    """Batches just folded into the states, the inputs they counted and the files skipped in them."""

    batches: list[int]
    images: int
    skipped: list[tuple[int, str]] = field(default_factory=list)


class Engine(ABC):
    """Runs mining and unit tasks; see the module docs."""

    #: where mining states are kept while the engine updates them
    state_device: torch.device = torch.device("cpu")

    @abstractmethod
    def mine(self, plan: MiningPlan, states: dict[str, LayerMining], batches: Sequence[int]) -> Iterator[MiningProgress]:
        """Fold ``batches`` into ``states`` (in place); yield after each step so the caller can checkpoint."""

    @abstractmethod
    def run_units(self, tasks: Sequence[UnitTask]) -> Iterator[list[UnitResult]]:
        """Run unit tasks; yield each task's results as it finishes (in any order)."""

    def close(self) -> None:  # noqa: B027 (optional hook: engines without workers have nothing to release)
        """Release workers."""

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

    def mine(self, plan: MiningPlan, states: dict[str, LayerMining], batches: Sequence[int]) -> Iterator[MiningProgress]:
        for step in mine(self.model, self.dataset, states, batches, plan.batch_size, workers=self.decode_threads):
            yield MiningProgress([step.batch], step.images, step.skipped)

    def run_units(self, tasks: Sequence[UnitTask]) -> Iterator[list[UnitResult]]:
        for task in tasks:
            yield run_task(self.model, self.dataset, task)


# -- Ray --------------------------------------------------------------------------------------------------


class _Worker:
    """A Ray actor: one copy of the model and the dataset, on its own GPU when it has one."""

    def __init__(self, model: Model, dataset: ImageDataset, threads: int, decode_threads: int) -> None:
        from ..runtime import resolve_device

        if threads > 0:
            torch.set_num_threads(threads)
        self.model = model.to(resolve_device("auto"))
        self.dataset = dataset
        self.decode_threads = decode_threads

    def mine(self, plan: MiningPlan, batches: list[int]) -> tuple[dict[str, bytes], int, list[tuple[int, str]]]:
        states = plan.empty_states(self.model.device)
        images, skipped = 0, []
        for step in mine(self.model, self.dataset, states, batches, plan.batch_size, workers=self.decode_threads):
            images += step.images
            skipped += step.skipped
        return {name: st.to_bytes() for name, st in states.items()}, images, skipped

    def run(self, task: UnitTask) -> list[UnitResult]:
        return run_task(self.model, self.dataset, task)

    def ready(self) -> str:
        return str(self.model.device)


def _portable(model: Model) -> Model:
    """A CPU copy of the model to ship to workers (the model itself when it already lives on the CPU)."""
    if model.device.type == "cpu":
        return model
    out = copy.deepcopy(model)
    return out.to("cpu")


class RayEngine(Engine):
    """A pool of Ray actors, each holding the model (on a GPU when the cluster has them) and the dataset.

    With no ``address`` Ray starts locally in this process (``workers`` actors, default 2 on a machine
    without GPUs, else one per GPU); with an address (``ray://host:10001`` or ``auto``) it joins that
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
            import ray
        except ImportError as exc:
            raise DeepvisError("the ray engine needs Ray: pip install 'deepvis[ray]' (or pip install ray)") from exc
        self._ray = ray
        self._started = False
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
            gpus = int(res.get("GPU", 0))
            cpus = int(res.get("CPU", 1))
            n = workers or (gpus if gpus else min(2, cpus))
            if n < 1:
                raise DeepvisError("the ray engine needs at least one worker")
            per_gpu = 1 if gpus >= n else (gpus / n if gpus else 0)
            per_cpu = cpus_per_worker if cpus_per_worker is not None else max(1, cpus // n)
            # the driver's thread count by default: CPU kernels may sum in another order with another
            # number of threads, and the Ray engine promises the local engine's exact results
            threads = threads or torch.get_num_threads()
            actor = ray.remote(_Worker).options(num_cpus=per_cpu, num_gpus=per_gpu, max_concurrency=1)
            model_ref = ray.put(_portable(model))
            data_ref = ray.put(dataset)
            self.actors = [actor.remote(model_ref, data_ref, threads, decode_threads) for _ in range(n)]
            ray.get([a.ready.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise
        self.state_device = torch.device("cpu")

    @property
    def workers(self) -> int:
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

    def mine(self, plan: MiningPlan, states: dict[str, LayerMining], batches: Sequence[int]) -> Iterator[MiningProgress]:
        todo = sorted({b for b in batches if any(b not in st.done for st in states.values())})
        if not todo:
            return
        # only layers still needing a batch are mined for it; group batches by that need
        groups: dict[tuple[str, ...], list[int]] = {}
        for b in todo:
            groups.setdefault(tuple(n for n, st in states.items() if b not in st.done), []).append(b)
        # a task is a run of batches through one loader; big runs keep the pipeline full, 4+ per worker
        # balance the load (results do not depend on the split: merging is exact)
        size = max(1, min(64, math.ceil(len(todo) / (4 * len(self.actors)))))
        jobs = []
        for names, bs in groups.items():
            sub = MiningPlan({n: plan.layers[n] for n in names}, plan.k, plan.batch_size)
            jobs += [(sub, bs[i : i + size]) for i in range(0, len(bs), size)]
        for j, (parts, images, skipped) in self._pool("mine", jobs):
            for name, data in parts.items():
                states[name].merge(LayerMining.from_bytes(name, data, self.state_device))
            yield MiningProgress(list(jobs[j][1]), images, skipped)

    def run_units(self, tasks: Sequence[UnitTask]) -> Iterator[list[UnitResult]]:
        for _j, results in self._pool("run", [(t,) for t in tasks]):
            yield results

    def close(self) -> None:
        ray = self._ray
        for a in getattr(self, "actors", []):
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
