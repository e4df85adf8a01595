"""Feature accentuation (Hamblin et al. 2024): start from a real image and raise a unit while staying close to it.

The start replaces the noise: element ``i`` begins at the given image (resized to the canvas). Two
anchors keep the result an accentuation of that image, not a new one:

* **in pixels** (:class:`~deepvis.optimize.regularizers.StayClose`): after every step the change from
  the start is projected back into an RMS ball of ``radius`` levels (0–255 pixels, default
  :data:`DEFAULT_RADIUS`), so the result is never farther than that; the paper's regularizers act on
  the change from the start (a blur smooths the change, not the photo);
* **in features** (:class:`FeatureAnchor`): the objective becomes
  ``a(x) − feature_weight · |a(x0)| · ‖φ(x) − φ(x0)‖ / ‖φ(x0)‖`` with φ the activations of
  ``feature_layer`` (default: the layer the unit is in, read in the same forward pass, so it costs
  nothing): with the default weight :data:`DEFAULT_FEATURE_WEIGHT` = 1, changing the layer's features by
  100 % of their norm costs as much as the unit's whole starting activation. ``|a(x0)|`` makes the weight
  mean the same on any network (floored at 1e-3).

The best image is still the one with the highest unit activation; the result states the distances it
reached (:attr:`Result.distance <deepvis.optimize.Result>`): ``pixel_rms`` and ``pixel_max`` (levels)
and ``feature`` (the relative feature distance), beside the bound ``radius``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import DeepvisError
from .objectives import Objective

__all__ = ["Accentuation", "FeatureAnchor", "StartImage", "start_tensor", "DEFAULT_RADIUS", "DEFAULT_FEATURE_WEIGHT"]

#: the default pixel bound: RMS distance from the start in 0–255 levels
DEFAULT_RADIUS = 24.0
#: the default weight of the feature anchor (see the module docstring)
DEFAULT_FEATURE_WEIGHT = 1.0

#: what ``start=`` accepts: a Pillow image (``deepvis.io.load_image`` reads files), or 0–255 pixels as an
#: array or tensor, (C, H, W) or (N, C, H, W)
StartImage = Image.Image | np.ndarray | torch.Tensor


@dataclass(frozen=True)
class Accentuation:
    """The anchors of feature accentuation: ``radius`` (RMS levels, 0–255 pixels), ``feature_weight``
    (0: no feature anchor) and ``feature_layer`` (None: each unit's own layer)."""

    radius: float = DEFAULT_RADIUS
    feature_weight: float = DEFAULT_FEATURE_WEIGHT
    feature_layer: str | None = None

    def __post_init__(self) -> None:
        if not self.radius > 0:
            raise DeepvisError(f"the accentuation distance must be > 0 levels, not {self.radius}")
        if self.feature_weight < 0:
            raise DeepvisError(f"the feature weight must be >= 0, not {self.feature_weight}")

    def to_dict(self) -> dict[str, object]:
        """A JSON-ready record of the anchors."""
        return {"radius": self.radius, "feature_weight": self.feature_weight, "feature_layer": self.feature_layer}


def start_tensor(start: StartImage, n: int, channels: int, size: tuple[int, int]) -> torch.Tensor:
    """The start images (n, channels, H, W) in 0–255 pixels (float32, CPU) from ``start``: a Pillow image
    (resized to ``size`` (H, W), bilinear), or pixels (C, H, W) / (n, C, H, W) in 0–255 (resized when
    their size differs). One image is used for every element."""
    if isinstance(start, Image.Image):
        im = start.convert("L" if channels == 1 else "RGB")
        if im.size != (size[1], size[0]):
            im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
        arr = np.asarray(im, dtype=np.float32)
        t = torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1).copy())
    else:
        t = torch.as_tensor(start, dtype=torch.float32).detach().cpu()
    if t.ndim == 3:
        t = t.unsqueeze(0)
    if t.ndim != 4 or t.shape[1] != channels:
        raise DeepvisError(f"a start image has shape (C, H, W) or (N, C, H, W) with C = {channels}, not {tuple(t.shape)}")
    if tuple(t.shape[-2:]) != tuple(size):
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
    if t.shape[0] == 1:
        t = t.expand(n, -1, -1, -1)
    if t.shape[0] != n:
        raise DeepvisError(f"{t.shape[0]} start images for {n} units: give one, or one per unit")
    return t.clamp(0, 255).contiguous()


class FeatureAnchor:
    """The feature term of accentuation for a batch: per element, ``weight · |a(x0)| · ‖φ(x) − φ(x0)‖ / ‖φ(x0)‖``.

    Built from the activations of the start images: ``layers[i]`` is element ``i``'s feature layer,
    ``reference`` the start's activations ``{layer: (N, ...)}`` and ``start_values`` (N,) its objective.
    """

    def __init__(self, weight: float, layers: Sequence[str], reference: Mapping[str, torch.Tensor], start_values: torch.Tensor) -> None:
        self.weight = float(weight)
        self.element_layers = list(layers)
        self.layers = tuple(dict.fromkeys(layers))
        self.reference = {k: reference[k].detach().flatten(1) for k in self.layers}
        self.scale = start_values.detach().abs().clamp_min(1e-3)
        dev = start_values.device
        self._masks = {k: torch.tensor([lay == k for lay in layers], device=dev) for k in self.layers}

    @staticmethod
    def layers_for(objectives: Sequence[Objective], feature_layer: str | None) -> list[str]:
        """Each element's feature layer: ``feature_layer``, or its objective's first layer."""
        return [feature_layer or o.layers[0] for o in objectives]

    def distance(self, acts: Mapping[str, torch.Tensor], sl: slice) -> torch.Tensor:
        """The relative feature distance (N_sl,) of elements ``sl`` from their starts."""
        out: torch.Tensor | None = None
        for k in self.layers:
            ref = self.reference[k][sl]
            if k not in acts:
                raise DeepvisError(f"the feature layer {k!r} was not captured")
            a = acts[k].flatten(1)
            norm2 = ref.pow(2).sum(1).clamp_min(1e-24)
            # sqrt(Σ(a − ref)² + ε): differentiable at the start itself, where the distance is 0
            d = ((a - ref).pow(2).sum(1) + 1e-12 * norm2).sqrt() / norm2.sqrt()
            d = d * self._masks[k][sl].to(d.dtype)
            out = d if out is None else out + d
        assert out is not None
        return out

    def penalty(self, acts: Mapping[str, torch.Tensor], sl: slice) -> torch.Tensor:
        """The term subtracted from the objective of elements ``sl`` (N_sl,)."""
        return self.weight * self.scale[sl] * self.distance(acts, sl)
