"""Objectives: what activation maximization maximizes.

An :class:`Objective` maps the activations captured in one forward pass, ``{layer: (N, ...)}``, to one
value per batch element, a tensor of shape (N,). Objectives name themselves from their arguments and
compose with ``+``, ``-``, unary ``-``, and ``*`` / ``/`` by a number::

    obj = neuron("blocks.3", 7) - 0.5 * channel("blocks.3", 9)
    obj.name   # 'neuron(blocks.3:7@center) - 0.5*channel(blocks.3:9)'

A prefix token of a token layer (``token="cls"``) is a vector of C units: ``neuron("blocks.5", 17,
token="cls")`` maximizes channel 17 of the class token (it reads the pseudo-layer ``blocks.5@cls``);
the values are read through :func:`deepvis.capture.unit_activation`, the one place that says what a
unit is.

Objectives that are linear in the activations (neurons, channel means, class logits and any linear
combination of them) also expose :meth:`Objective.linear_weights`; the optimization loop uses it to
evaluate a batch in which every element has its own objective with one multiply-and-sum, so that
element ``i``'s value depends on element ``i``'s activations only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from ..capture.units import LOGITS, Unit, unit_activation, unit_index
from ..choices import OBJECTIVE_KINDS

__all__ = [
    "Objective",
    "Neuron",
    "Channel",
    "LinearCombination",
    "CustomObjective",
    "neuron",
    "channel",
    "class_logit",
    "objective_for_unit",
    "custom",
    "BatchObjective",
    "OBJECTIVE_KINDS",
]


Shapes = Mapping[str, tuple[int, ...]]


class Objective:
    """Base class: ``obj(acts) -> (N,)`` values to maximize; ``layers`` names the layers it reads."""

    name: str = "objective"
    layers: tuple[str, ...] = ()

    def __call__(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def linear_weights(self, shapes: Shapes) -> dict[str, torch.Tensor] | None:
        """Per-layer weights ``w`` (one example's shape) such that the value is ``Σ_layers Σ w ∘ a``, or
        None when the objective is not linear in the activations. ``shapes`` gives each layer's
        per-example output shape, (C, H, W) or (C,)."""
        return None

    # -- composition ---------------------------------------------------------------------------------
    def _terms(self) -> list[tuple[float, Objective]]:
        return [(1.0, self)]

    def __add__(self, other: object) -> Objective:
        if isinstance(other, (int, float)) and other == 0:
            return self  # lets sum([...]) start from 0
        if not isinstance(other, Objective):
            return NotImplemented
        return LinearCombination([*self._terms(), *other._terms()])

    def __radd__(self, other: object) -> Objective:
        if isinstance(other, (int, float)) and other == 0:
            return self
        return NotImplemented

    def __sub__(self, other: object) -> Objective:
        if not isinstance(other, Objective):
            return NotImplemented
        return LinearCombination([*self._terms(), *[(-c, o) for c, o in other._terms()]])

    def __neg__(self) -> Objective:
        return LinearCombination([(-c, o) for c, o in self._terms()])

    def __mul__(self, k: object) -> Objective:
        if not isinstance(k, (int, float)) or isinstance(k, bool):
            return NotImplemented
        return LinearCombination([(float(k) * c, o) for c, o in self._terms()])

    __rmul__ = __mul__

    def __truediv__(self, k: object) -> Objective:
        if not isinstance(k, (int, float)) or isinstance(k, bool):
            return NotImplemented
        return self * (1.0 / float(k))

    def __repr__(self) -> str:
        return f"<Objective {self.name}>"


def _center(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[1] // 2, shape[2] // 2


@dataclass(frozen=True, eq=False)
class Neuron(Objective):
    """The activation of one unit: channel ``channel`` of ``layer`` at ``position`` (row, column); for a
    spatial layer without a position, the center of the map (the paper's choice). On a (N, C) layer,
    the channel's value (e.g. a class logit when ``layer`` is ``logits``); with ``token`` (``cls``,
    ``dist``, ``reg0``, ``#0``), the channel's value in that prefix token of a token layer."""

    layer: str
    channel: int
    position: tuple[int, int] | None = None
    label: str | None = None
    token: str | None = None

    @property
    def unit(self) -> Unit:
        """The unit this objective reads (its position as given)."""
        return Unit(self.layer, self.channel, self.position, self.token)

    @property
    def layers(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.unit.layer_key,)

    @property
    def name(self) -> str:  # type: ignore[override]
        if self.layer == LOGITS:
            return f"class({self.channel}{' ' + self.label if self.label else ''})"
        if self.token is not None:
            return f"neuron({self.unit})"
        pos = "" if self.position is None else f"@{self.position[0]},{self.position[1]}"
        return f"neuron({self.layer}:{self.channel}{pos or '@center'})"

    def _at(self, shape: tuple[int, ...]) -> Unit:
        """The unit read on an output of one example's ``shape``: a map's center when no position is given."""
        if len(shape) == 3 and self.position is None:
            return Unit(self.layer, self.channel, _center(shape), self.token)
        return self.unit

    def __call__(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return unit_activation(acts, self._at(tuple(acts[self.layers[0]].shape[1:])))

    def linear_weights(self, shapes: Shapes) -> dict[str, torch.Tensor]:
        key = self.layers[0]
        shape = shapes[key]
        w = torch.zeros(shape)
        w[unit_index(self._at(shape), shape)] = 1.0
        return {key: w}


@dataclass(frozen=True, eq=False)
class Channel(Objective):
    """The mean of channel ``channel`` of ``layer`` over all positions (its value on a (N, C) layer, and
    in prefix token ``token`` of a token layer)."""

    layer: str
    channel: int
    token: str | None = None

    @property
    def unit(self) -> Unit:
        """The unit this objective reads (the whole channel)."""
        return Unit(self.layer, self.channel, None, self.token)

    @property
    def layers(self) -> tuple[str, ...]:  # type: ignore[override]
        return (self.unit.layer_key,)

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"channel({self.unit})"

    def __call__(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return unit_activation(acts, self.unit, reduce="mean")

    def linear_weights(self, shapes: Shapes) -> dict[str, torch.Tensor]:
        key = self.layers[0]
        w = torch.zeros(shapes[key])
        index = unit_index(self.unit, shapes[key])
        w[index] = 1.0 / w[index].numel()
        return {key: w}


def _fmt_coef(c: float) -> str:
    return f"{c:g}"


class LinearCombination(Objective):
    """``Σ c_k · objective_k``; made by ``+``, ``-`` and ``*`` on objectives."""

    def __init__(self, terms: Sequence[tuple[float, Objective]]) -> None:
        self.terms: list[tuple[float, Objective]] = [(float(c), o) for c, o in terms]
        if not self.terms:
            raise ValueError("a linear combination needs at least one term")

    def _terms(self) -> list[tuple[float, Objective]]:
        return list(self.terms)

    @property
    def layers(self) -> tuple[str, ...]:  # type: ignore[override]
        return tuple(dict.fromkeys(layer for _, o in self.terms for layer in o.layers))

    @property
    def name(self) -> str:  # type: ignore[override]
        out = ""
        for i, (c, o) in enumerate(self.terms):
            mag = abs(c)
            body = o.name if mag == 1 else f"{_fmt_coef(mag)}*{o.name}"
            if i == 0:
                out = body if c >= 0 else f"-{body}"
            else:
                out += f" {'+' if c >= 0 else '-'} {body}"
        return out

    def __call__(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for c, o in self.terms:
            v = c * o(acts)
            total = v if total is None else total + v
        return total  # type: ignore[return-value]

    def linear_weights(self, shapes: Shapes) -> dict[str, torch.Tensor] | None:
        out: dict[str, torch.Tensor] = {}
        for c, o in self.terms:
            w = o.linear_weights(shapes)
            if w is None:
                return None
            for layer, t in w.items():
                out[layer] = out[layer] + c * t if layer in out else c * t
        return out


class CustomObjective(Objective):
    """Any function of the captured activations, ``fn(acts) -> (N,)``, reading ``layers``.

    It must compute each batch element's value from that element's activations only (no batch
    statistics), or batched results will depend on the batch's composition.
    """

    def __init__(self, fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], layers: Sequence[str], name: str) -> None:
        self.fn = fn
        self.layers = tuple(layers)
        self.name = name

    def __call__(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(acts)


def neuron(layer: str, unit: int, position: tuple[int, int] | None = None, *, token: str | None = None) -> Neuron:
    """One unit's activation; on a spatial layer at ``position`` (default: the map's center); with
    ``token``, the channel's value in that prefix token (``cls``, ``dist``, ``reg0``, ``#0``) of a token layer."""
    return Neuron(layer, int(unit), position, None, token)


def channel(layer: str, unit: int, *, token: str | None = None) -> Channel:
    """A channel's mean activation over the whole map (with ``token``: its value in that prefix token)."""
    return Channel(layer, int(unit), token)


def class_logit(index: int, label: str | None = None) -> Neuron:
    """A class's pre-softmax logit (the model's output ``index``); ``label`` only names it."""
    return Neuron(LOGITS, int(index), None, label)


def custom(fn: Callable[[Mapping[str, torch.Tensor]], torch.Tensor], layers: Sequence[str], name: str) -> CustomObjective:
    """Wrap ``fn(acts) -> (N,)`` as an objective (see :class:`CustomObjective`)."""
    return CustomObjective(fn, layers, name)


def objective_for_unit(unit: Unit, kind: str = "neuron", label: str | None = None) -> Objective:
    """The objective of a :class:`~deepvis.capture.Unit`: a class logit for ``logits:N``; otherwise the
    neuron at the unit's position (``kind="neuron"``, the map's center when the unit has none) or the
    channel mean (``kind="channel"``; only for units without a position). A prefix-token unit
    (``blocks.5:17@cls``) is that token's channel value either way (named by ``kind``)."""
    if kind not in OBJECTIVE_KINDS:
        raise ValueError(f"kind must be one of {OBJECTIVE_KINDS}, not {kind!r}")
    if unit.is_class:
        return class_logit(unit.channel, label)
    if kind == "channel" and unit.position is None:
        return channel(unit.layer, unit.channel, token=unit.token)
    return neuron(unit.layer, unit.channel, unit.position, token=unit.token)


class BatchObjective:
    """Evaluates a batch in which element ``i`` has its own objective ``objectives[i]``.

    Linear objectives are evaluated together as ``Σ W ∘ A`` with per-element weights (built once per
    activation shape); otherwise each distinct objective is evaluated on the elements that use it.
    Either way element ``i``'s value depends only on element ``i``'s activations.
    """

    def __init__(self, objectives: Sequence[Objective]) -> None:
        if not objectives:
            raise ValueError("no objectives")
        self.objectives = list(objectives)
        self.layers: tuple[str, ...] = tuple(dict.fromkeys(layer for o in self.objectives for layer in o.layers))
        self._weights: dict[str, torch.Tensor] | None = None
        self._key: object = None
        groups: dict[int, list[int]] = {}
        for i, o in enumerate(self.objectives):
            groups.setdefault(id(o), []).append(i)
        self._groups = [(self.objectives[idx[0]], idx) for idx in groups.values()]

    def _linear(self, acts: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        key = tuple((name, tuple(acts[name].shape), acts[name].device, acts[name].dtype) for name in self.layers)
        if key == self._key:
            return self._weights
        shapes = {name: tuple(acts[name].shape[1:]) for name in self.layers}
        per: list[dict[str, torch.Tensor]] = []
        for o in self.objectives:
            w = o.linear_weights(shapes)
            if w is None:
                per = []
                break
            per.append(w)
        weights = None
        if per:
            weights = {}
            for name in self.layers:
                a = acts[name]
                weights[name] = torch.stack([w[name] if name in w else torch.zeros(shapes[name]) for w in per]).to(a.device, a.dtype)
        self._key, self._weights = key, weights
        return weights

    def __call__(self, acts: Mapping[str, torch.Tensor]) -> torch.Tensor:
        n = next(iter(acts.values())).shape[0]
        if n != len(self.objectives):
            raise ValueError(f"batch of {n} activations for {len(self.objectives)} objectives")
        weights = self._linear(acts)
        if weights is not None:
            total = None
            for name, w in weights.items():
                v = (acts[name] * w).flatten(1).sum(1)
                total = v if total is None else total + v
            return total  # type: ignore[return-value]
        first = next(iter(acts.values()))
        out = first.new_zeros(n)
        for o, idx in self._groups:
            if len(idx) == n:
                return o(acts)
            index = torch.tensor(idx, device=first.device)
            sub = {name: acts[name].index_select(0, index) for name in o.layers}
            out = out.index_put((index,), o(sub))
        return out
