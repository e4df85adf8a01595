"""Calibration: the paper's learning rate and progress target mapped onto the network at hand.

The paper's θ were tuned on CaffeNet. deepvis already optimizes every model in CaffeNet's pixel units
(:mod:`.presets`), so decay, blur and the clipping percentiles mean the same everywhere. Two θ do
not: ``lr`` multiplies a gradient (activation per pixel) and ``desired_prog`` is an activation change,
and each network has its own activation (hence gradient) scale. Calibration measures that scale per
unit and rescales those two θ so that **each step moves the image by the pixel amount the paper's
settings give at the reference gradient norm** G_ref (:data:`REFERENCE`):

* **measured**, per unit: ``grad_norm`` G = ‖∂a/∂x‖ (L2 over the image, in 0–255 pixels) at the start
  image: the gradient of the first step, so it costs no extra pass;
* **mapped**: ``lr ← lr · G_ref / G`` and ``desired_prog ← desired_prog · G / G_ref``: a constant-lr
  step ``lr·g`` then moves the image by ``lr·G_ref`` pixels (L2) and a progress step
  ``(desired_prog / ‖g‖²)·g`` by ``desired_prog / G_ref``, whatever the network's scale. A unit whose
  value and gradient are ``k`` times larger gets the same steps, hence the same image.
* **recorded** beside them, from one forward pass without backward of :data:`PHOTOS` (natural photos,
  offline, resized to the canvas) for the whole batch: the unit's ``act_scale`` (standard deviation over
  the photos) and ``photo_max`` (its highest value on them), so that a record says whether the image
  beats every photo.

Adam (``robust``, ``maco``) normalizes its gradient itself: it is not calibrated.
``Settings(calibrate=False)`` (``--calibrate off``) runs the literal values. A unit whose gradient is
exactly 0 at the start (dead) keeps the literal values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from ..capture.hooks import capture
from ..io.images import load_image
from ..io.samples import sample_photos
from ..models.model import Model
from .objectives import Objective
from .presets import Settings

__all__ = ["Reference", "REFERENCE", "PHOTOS", "Calibration", "Calibrator", "photo_values", "needs_calibration"]

#: the natural photos (offline sample photos, :func:`deepvis.io.sample_photos`) the activation scale is measured on
PHOTOS = ("astronaut", "chelsea", "coffee", "china", "flower", "grace_hopper", "motorcycle", "rocket")


@dataclass(frozen=True)
class Reference:
    """The gradient norm the paper's ``lr`` and ``desired_prog`` are read against: ``grad_norm``
    (G_ref), ‖∂a/∂x‖ in 0–255 pixels, L2 over the image."""

    grad_norm: float


#: G_ref = sqrt(desired_prog / lr) of preset 1 = sqrt(2 / 100) ≈ 0.141. CaffeNet cannot be measured
#: here (its weights are not in the tree), so the figure comes from Table 1 itself: it is the gradient
#: norm at which the paper's two learning-rate rules take the same step (``lr·‖g‖ = desired_prog/‖g‖``),
#: where its progress policy hands over from the lr cap to the progress target. At G_ref the paper's
#: constant lr (100) and its progress target (2) both mean a step of sqrt(2·100) ≈ 14.1 px (L2), and
#: a calibrated preset takes that step on any network.
REFERENCE = Reference(grad_norm=(2.0 / 100.0) ** 0.5)


@dataclass(frozen=True)
class Calibration:
    """One unit's measured scale and the θ it ran with (see the module docstring).

    ``grad_norm`` G at the start image; ``lr_factor`` = G_ref / G and ``prog_factor`` = G / G_ref (1.0
    for a dead unit); ``lr`` and ``desired_prog`` the calibrated values the unit ran with;
    ``act_scale`` and ``photo_max``: the unit's standard deviation and maximum over :data:`PHOTOS`
    (NaN when fewer than two photos are installed).
    """

    grad_norm: float
    lr_factor: float
    prog_factor: float
    lr: float
    desired_prog: float
    act_scale: float
    photo_max: float

    def to_dict(self) -> dict[str, float]:
        """A JSON-ready record (the reference figure included)."""
        return {**asdict(self), "reference_grad_norm": REFERENCE.grad_norm}


def needs_calibration(settings: Settings) -> bool:
    """Whether ``settings`` are calibrated: ``calibrate`` on and plain gradient ascent (SGD); Adam
    normalizes its gradient itself."""
    return settings.calibrate and settings.optimizer == "sgd"


def photo_values(model: Model, objectives: Sequence[Objective], size: tuple[int, int], micro_batch: int = 32) -> torch.Tensor:
    """Every objective on every photo of :data:`PHOTOS` at the canvas ``size``: (N, photos).

    One forward pass (no backward) of the photos for the whole batch, in micro-batches of
    ``micro_batch`` photos; every objective reads its value from the same activations. Photos that
    are not installed are left out (then the result may have no columns).
    """
    found = sample_photos()
    paths = [found[n] for n in PHOTOS if n in found]
    if not paths:
        return torch.zeros(len(objectives), 0)
    prep = model.preprocessing.with_size(size)
    images = torch.stack([prep.to_tensor(load_image(p, prep.pil_mode)) for p in paths]).to(model.device)
    layers = list(dict.fromkeys(layer for o in objectives for layer in o.layers))
    values: list[torch.Tensor] = []  # each (N, photos in the micro-batch)
    with torch.no_grad():
        for i in range(0, len(paths), micro_batch):
            acts = {k: v.float() for k, v in capture(model, images[i : i + micro_batch], layers).items()}
            values.append(torch.stack([o(acts) for o in objectives]))
    return torch.cat(values, 1).cpu()


class Calibrator:
    """The calibration of one batch: ``rates(g)`` with the first step's gradient gives each element's
    (lr, desired_prog); :attr:`records` then holds one :class:`Calibration` per element."""

    def __init__(self, model: Model, objectives: Sequence[Objective], settings: Settings, size: tuple[int, int]) -> None:
        self.model, self.objectives, self.settings, self.size = model, objectives, settings, size
        self.records: list[Calibration] = []

    def rates(self, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per element (N,): the calibrated lr and desired_prog from the gradient ``g`` (N, …) of the
        first step (0–255 pixels), on ``g``'s device and in its dtype."""
        s = self.settings
        grad = g.detach().flatten(1).norm(dim=1).double().cpu()
        lr_factor = torch.where(grad > 0, REFERENCE.grad_norm / grad, torch.ones_like(grad))
        lr, prog = s.lr * lr_factor, s.desired_prog / lr_factor
        photos = photo_values(self.model, self.objectives, self.size).double()
        nan = torch.full((len(self.objectives),), float("nan"), dtype=torch.float64)
        act, top = (photos.std(1), photos.amax(1)) if photos.shape[1] >= 2 else (nan, nan)
        self.records = [
            Calibration(float(gn), float(f), float(1 / f), float(r), float(d), float(a), float(m))
            for gn, f, r, d, a, m in zip(grad, lr_factor, lr, prog, act, top)
        ]
        return lr.to(g.device, g.dtype), prog.to(g.device, g.dtype)
