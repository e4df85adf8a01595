"""Facts derived from a model's structure, computed once and dropped when the structure changes.

deepvis remembers a few expensive facts about a model between calls: its layer table per input shape
(:func:`deepvis.capture.layer_table`), which module each layer name resolves to, which layer outputs
the network later modifies in place, receptive-field geometry per layer and input size, the modules
that call nonlinearities without a backprop rule. They live on :attr:`Model.cache
<deepvis.models.Model.cache>`, a :class:`ModelCache`, in typed slots (:class:`CacheSlot`): each slot is
declared next to the code that computes its entries, with the types of its keys and values, so a
reader gets back what was stored without a cast.

**When entries are dropped.** Every read or write goes through :meth:`ModelCache.entries`, which
first compares the module's *structure* with the one the entries were computed for: the module tree
(the identity and type of every submodule, in order) and every parameter and buffer (its identity,
shape, dtype and device). Any difference — the model moved to another device or dtype, a submodule or
a parameter replaced, a module added or removed — drops every entry, so nothing stale is returned.
Parameter *values* are not part of it: the cached facts are structural (shapes, module lists, call
counts, which pixels can influence a unit), so training the weights or loading a checkpoint in place
keeps them. Keys that depend on the input (layer tables, receptive fields) carry the input shape.
Checking costs one walk over the module tree (0.1-0.3 ms for EfficientNet-Lite0's 273 modules on a
2-core CPU), so it runs once per call that uses the cache, not once per entry. The check holds the
submodules it saw, so a submodule replaced in the model is freed at the next check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from typing import Any, Generic, TypeVar

import torch
from torch import nn

__all__ = ["CacheSlot", "CacheEntries", "ModelCache", "structure_signature"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class CacheSlot(Generic[K, V]):
    """One kind of cached fact: entries of type ``V`` under keys of type ``K`` (e.g. layer tables by
    input shape). Declared once, at module level, by the code that computes the entries; two slots
    never share entries, even with equal names (the name is for ``repr`` only)."""

    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"CacheSlot({self.name!r})"


def structure_signature(module: nn.Module) -> tuple[Any, ...]:
    """What the cached facts of ``module`` depend on: every submodule in tree order (the objects
    themselves, so that their identities cannot be reused while the signature is held) and every
    parameter and buffer's (identity, shape, dtype, device). Two signatures compare equal exactly when
    no submodule, parameter or buffer was added, removed, replaced, moved or cast in between."""
    mods = [module]
    for m in mods:  # breadth-first: the list grows while it is walked (cheaper than named_modules())
        mods.extend([c for c in m._modules.values() if c is not None])
    # reading shape/dtype/device dispatches through any active TorchFunctionMode (the backprop rules run
    # capture inside one): skip that dispatch, these reads need none (3 per tensor, ~1000 on lite0)
    with torch._C.DisableTorchFunction():
        tensors = [
            (id(t), t.shape, t.dtype, t.device) for m in mods for t in (*m._parameters.values(), *m._buffers.values()) if t is not None
        ]
    return (mods, tensors)


class CacheEntries:
    """The entries of a :class:`ModelCache` that are valid for the module they were checked against
    (returned by :meth:`ModelCache.entries`; use it for the rest of one call, then ask again)."""

    __slots__ = ("_store",)

    def __init__(self, store: dict[tuple[CacheSlot[Any, Any], Hashable], Any]) -> None:
        self._store = store

    def get(self, slot: CacheSlot[K, V], key: K) -> V | None:
        """The entry of ``slot`` under ``key``, or None."""
        value: V | None = self._store.get((slot, key))
        return value

    def put(self, slot: CacheSlot[K, V], key: K, value: V) -> V:
        """Store ``value`` under ``key`` in ``slot`` and return it."""
        self._store[(slot, key)] = value
        return value

    def get_or_compute(self, slot: CacheSlot[K, V], key: K, compute: Callable[[], V]) -> V:
        """The entry of ``slot`` under ``key``, computed by ``compute()`` and stored when missing."""
        found = self.get(slot, key)
        return found if found is not None else self.put(slot, key, compute())

    def __len__(self) -> int:
        return len(self._store)


class ModelCache:
    """Per-model store of structural facts, dropped when the module's structure changes (see the
    module notes for the rule). Not part of the model's identity; safe to share between threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._signature: tuple[Any, ...] | None = None
        self._store: dict[tuple[CacheSlot[Any, Any], Hashable], Any] = {}

    def entries(self, module: nn.Module) -> CacheEntries:
        """The entries valid for ``module`` as it is now: all of them when its structure is the one they
        were computed for, none (a fresh, empty store) otherwise."""
        sig = structure_signature(module)
        with self._lock:
            if sig != self._signature:
                self._signature, self._store = sig, {}
            return CacheEntries(self._store)

    def __reduce__(self) -> tuple[type[ModelCache], tuple[()]]:
        """Pickled or deep-copied (a model sent to a Ray worker, the server's private copy), a cache
        starts empty: its entries describe the original module's objects, and its lock cannot travel."""
        return (ModelCache, ())

    def clear(self) -> None:
        """Drop every entry (they are recomputed on the next use)."""
        with self._lock:
            self._signature, self._store = None, {}

    def __len__(self) -> int:
        return len(self._store)

    def __repr__(self) -> str:
        return f"ModelCache({len(self._store)} entries)"
