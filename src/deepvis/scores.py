"""Quality figures for synthesized images: how much a visualization can be trusted, judged by other models.

A synthesized image without a quality figure invites over-reading (Borowski, Zimmermann et al. 2021:
people predict a unit better from natural top images than from synthetic ones). Four figures:

* **contrast** (every image whose record gives the mean image): how far the raw image lies from the
  mean image (:func:`deepvis.optimize.contrast`: ``rms`` and ``peak`` in 0–255 levels, the display
  version's ``stretch``). A *faint* image (RMS under :data:`deepvis.optimize.FAINT_RMS` levels) is flagged:
  it looks flat grey as the model saw it, and its display version shows a pattern magnified many times.

* **transfer** (class objectives): the rank (1 = top) and softmax probability of the intended class
  under other models, the *judges* (:data:`DEFAULT_JUDGES`: EfficientNet-Lite1 and -Lite2, or any
  model spec). A judge whose class list differs from the optimized model's is skipped, with a note.
* **beats-top-k** (with an atlas of the optimized model): the unit's activation on the image (its
  spatial maximum, as the atlas ranks dataset images) against its top-9 dataset images: ``beats`` how
  many of them, ``ratio`` to the best one, ``ratio_mean`` to their mean.
* **plausibility** (with an atlas): the cosine similarity, in a judge's penultimate features (the
  layer feeding its classifier, spatially averaged when it is a map), between the image and each of the
  unit's top-9 dataset crops (MACO's measure, with the atlas's inputs as the natural references):
  ``mean`` over the references, and ``min`` / ``max``.

**Never only the optimized model.** Every judge's identity (:func:`deepvis.models.model_identity`:
weights hash and input size) is compared with the optimized model's; a judge that *is* the optimized
model is kept but flagged (``same_model`` True, and a line in ``flags``), since an image optimized
against a model says little when that same model judges it. beats-top-k is read on the optimized model
by definition (it compares the unit with itself); it always comes with the judges' figures and says so
(``judge`` ``"optimized model"``).

Images are given to judges as the model saw them (the ``_raw.png`` picture), resized to the judge's
input size without cropping. :func:`score_folder` scores a folder of ``deepvis optimize`` results from
the JSON records next to the images.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from .atlas.store import Atlas, AtlasError, UnitRecord
from .capture import LOGITS, Unit, capture, layer_table, parse_unit, unit_activation
from .errors import InputError, ModelError
from .io import load_image
from .models import Model, load_model
from .models.identity import identity_mismatch, model_identity
from .optimize.images import contrast, contrast_caption, faint_flag

__all__ = [
    "DEFAULT_JUDGES",
    "TOP_K",
    "Judge",
    "load_judges",
    "penultimate_layer",
    "transfer",
    "plausibility",
    "beats_top_k",
    "synth_beats_top_k",
    "unit_value",
    "objective_value",
    "score_image",
    "score_folder",
    "result_records",
    "summary_line",
]

#: the judges used when none is given (other models than the default one)
DEFAULT_JUDGES = ("lite1", "lite2")
#: how many of a unit's top dataset images the atlas-based figures compare with
TOP_K = 9


@dataclass(frozen=True)
class Judge:
    """A model that judges images: its ``spec`` (as given), the loaded ``model`` and its ``identity``."""

    spec: str
    model: Model
    identity: Mapping[str, Any]

    def same_as(self, identity: Mapping[str, Any] | None) -> bool:
        """Whether this judge is the model ``identity`` describes (same weights hash and input size)."""
        return identity is not None and identity_mismatch(identity, self.model, current=self.identity) is None


def load_judges(specs: Sequence[str], device: torch.device | str = "cpu") -> list[Judge]:
    """Load the judge models ``specs`` (model specs: ``lite1``, ``timm:NAME``, ``file.py:factory``, ...)."""
    out = []
    for spec in dict.fromkeys(specs):
        try:
            m = load_model(spec, device=device)
        except ModelError as exc:  # a judge needs trained weights: the model options' advice (--weights) is not for it
            raise ModelError(
                f"judge {spec}: {re.split(r'[;:] pass --weights', str(exc))[0]}; a judge needs trained weights that are here"
            ) from exc
        out.append(Judge(spec, m, model_identity(m)))
    return out


def _as_batch(model: Model, images: Sequence[Image.Image]) -> torch.Tensor:
    mode = model.preprocessing.pil_mode
    return model.preprocess([im.convert(mode) for im in images], crop=False)


def penultimate_layer(model: Model) -> str:
    """The layer whose output feeds the classifier: the layer before the deepest one whose output has the
    logits' shape (the classifier, and any dropout or identity after it); for EfficientNet-Lite ``global_pool``."""
    table = [i for i in layer_table(model) if i.name != LOGITS]
    if len(table) < 2:
        raise InputError(f"model {model.name} has no layer before its classifier to take features from")
    out_shape = table[-1].shape
    k = len(table) - 1
    while k > 0 and table[k - 1].shape == out_shape:
        k -= 1
    return table[k - 1].name if k > 0 else table[-2].name


def _features(model: Model, images: Sequence[Image.Image]) -> torch.Tensor:
    """Penultimate features (N, D) of ``images``: spatially averaged when the layer is a map."""
    layer = penultimate_layer(model)
    with torch.no_grad():
        a = capture(model, _as_batch(model, images), [layer])[layer].float()
    return a.flatten(2).mean(2) if a.ndim > 2 else a


def transfer(judge: Judge, image: Image.Image, class_index: int, class_name: str | None, *, same_model: bool = False) -> dict[str, Any]:
    """The intended class's ``rank`` (1 = top) and ``probability`` under ``judge`` for ``image``; ``note``
    instead when the judge's classes differ (``class_name`` must be its name there) or when the optimized
    model's class names are unknown (``class_name`` None: an index alone does not say which class it is;
    a judge that is the optimized model itself is still scored)."""
    m = judge.model
    row: dict[str, Any] = {"judge": judge.spec, "same_model": same_model}
    if class_name is None and not same_model:  # an index alone says nothing about which class it is
        row["note"] = "the optimized model's classes are unknown (no class names): its output cannot be matched to the judge's classes"
        return row
    if m.num_classes is None or class_index >= m.num_classes or (class_name is not None and m.label(class_index) != class_name):
        row["note"] = "the judge's classes differ from the optimized model's"
        return row
    with torch.no_grad():
        logits = capture(m, _as_batch(m, [image]), [LOGITS])[LOGITS][0].float()
    row["rank"] = int((logits > logits[class_index]).sum()) + 1
    row["probability"] = float(logits.softmax(0)[class_index])
    return row


def plausibility(judge: Judge, image: Image.Image, references: Sequence[Image.Image], *, same_model: bool = False) -> dict[str, Any]:
    """Cosine similarity in ``judge``'s penultimate features between ``image`` and each reference image:
    ``mean``, ``min``, ``max`` over the ``n`` references."""
    if not references:
        raise InputError("plausibility needs reference images (the unit's top images in an atlas)")
    f = _features(judge.model, [image, *references])
    cos = torch.nn.functional.cosine_similarity(f[:1], f[1:], dim=1)
    return {
        "judge": judge.spec,
        "same_model": same_model,
        "mean": float(cos.mean()),
        "min": float(cos.min()),
        "max": float(cos.max()),
        "n": int(cos.numel()),
    }


def beats_top_k(value: float, top_values: Sequence[float]) -> dict[str, Any]:
    """The unit's activation ``value`` on the image against its top dataset ``top_values`` (best first):
    ``beats`` (how many it exceeds) of ``k``, ``ratio`` (to the best) and ``ratio_mean`` (to their mean)."""
    tops = [float(v) for v in top_values][:TOP_K]
    if not tops:
        raise InputError("beats-top-k needs the unit's top values (an atlas with the unit mined)")
    best, mean = max(tops), sum(tops) / len(tops)
    return {
        "judge": "optimized model",
        "value": float(value),
        "beats": sum(float(value) > v for v in tops),
        "k": len(tops),
        "ratio": float(value) / best if best else None,
        "ratio_mean": float(value) / mean if mean else None,
    }


def synth_beats_top_k(rec: UnitRecord) -> dict[str, Any] | None:
    """beats-top-k of an atlas unit's own synthesized image, from what the atlas stores (no model run):
    the objective value synthesis reached (a neuron at the map's center, or the channel's mean: at most the
    spatial maximum, so the figure errs low) against the unit's top values. None without both."""
    if rec.synth is None or rec.synth.value is None or not rec.top or not math.isfinite(rec.synth.value):
        return None
    return beats_top_k(rec.synth.value, [t.value for t in rec.top])


def _value(model: Model, image: Image.Image, unit: Unit, reduce: Literal["mean", "max"]) -> float:
    prep = model.preprocessing.with_size((image.height, image.width))
    x = prep.to_tensor(image.convert(prep.pil_mode), crop=False)[None].to(model.device, model.dtype)
    with torch.no_grad():
        acts = capture(model, x, [unit.layer_key])
    return float(unit_activation(acts, unit, reduce=reduce)[0])


def unit_value(model: Model, image: Image.Image, unit: Unit) -> float:
    """The unit's activation on ``image`` as the atlas ranks images: its channel's spatial maximum (the
    position of ``unit`` is ignored), the image at its own size (as the optimized model saw it)."""
    return _value(model, image, Unit(unit.layer, unit.channel, None, unit.token), "max")


def objective_value(model: Model, image: Image.Image, unit: Unit) -> float:
    """The value an optimization of ``unit`` raises, on ``image`` at its own size: the unit's value at its
    position (or token) when it names one, else its channel's mean over the map (``kind="channel"``).
    Unlike :func:`unit_value`, this is the figure to compare before and after an accentuation."""
    return _value(model, image, unit, "mean")


def _references(atlas: Atlas, unit: Unit) -> tuple[list[float], list[Image.Image]]:
    rec = atlas.unit(unit.layer_key, unit.channel)
    values = [t.value for t in rec.top[:TOP_K]]
    refs = [load_image(t.crop) for t in rec.top[:TOP_K] if t.crop is not None and t.crop.is_file()]
    return values, refs


def score_image(
    image: Image.Image,
    record: Mapping[str, Any],
    judges: Sequence[Judge],
    *,
    atlas: Atlas | None = None,
    optimized: Model | None = None,
) -> dict[str, Any]:
    """The quality figures of one optimized image.

    Args:
        image: the image as the optimized model saw it (the ``_raw.png`` picture).
        record: its JSON record (:meth:`deepvis.optimize.Result.to_dict` plus ``model_identity`` and
            ``classes``, as ``deepvis optimize`` writes it): the unit, the optimized model's identity.
        judges: the models that judge (:func:`load_judges`).
        atlas: an atlas of the optimized model, for beats-top-k and plausibility (None: those are skipped).
        optimized: the optimized model (needed for beats-top-k; its identity must match the atlas's).

    Returns:
        ``{"contrast": {...} | None, "transfer": [...], "beats_top_k": {...} | None, "plausibility": [...],
        "flags": [...], "judges": [{"judge", "same_model"}]}``; ``contrast`` needs the record's
        ``mean_pixel`` (one 0–255 value per channel).
    """
    identity = record.get("model_identity")
    out: dict[str, Any] = {"contrast": None, "transfer": [], "beats_top_k": None, "plausibility": [], "flags": []}
    mean = record.get("mean_pixel")
    if mean is not None:
        try:
            out["contrast"] = contrast(image, [float(m) for m in mean])
        except (TypeError, ValueError):
            out["flags"].append("contrast skipped: the record's mean_pixel is not one number per channel of the image")
        else:
            if out["contrast"]["faint"]:
                out["flags"].append(faint_flag(out["contrast"]))
    same = {j.spec: j.same_as(identity) for j in judges}
    out["judges"] = [{"judge": j.spec, "model": j.model.name, "same_model": same[j.spec]} for j in judges]
    if identity is None:
        out["flags"].append("the record has no model identity: judges cannot be checked against the optimized model")
    for j in judges:
        if same[j.spec]:
            out["flags"].append(f"judge {j.spec} is the optimized model: its figures are not independent")
    if judges and all(same.values()):
        out["flags"].append("no independent judge: every judge is the optimized model")
    unit_text = record.get("unit")
    unit = parse_unit(unit_text) if unit_text else None
    if unit is not None and unit.layer == LOGITS:
        classes = record.get("classes") or {}
        for j in judges:
            out["transfer"].append(transfer(j, image, unit.channel, classes.get("name"), same_model=same[j.spec]))
    if atlas is not None and unit is not None:
        try:
            values, refs = _references(atlas, unit)
        except AtlasError as err:
            out["flags"].append(f"beats-top-k and plausibility skipped: {err}")
            return out
        if not values:
            out["flags"].append(f"beats-top-k and plausibility skipped: the atlas has no top images for {unit} (mine its layer)")
            return out
        if optimized is not None:
            mismatch = identity_mismatch(atlas.meta, optimized)
            if mismatch is None:
                out["beats_top_k"] = beats_top_k(unit_value(optimized, image, unit), values)
            else:
                out["flags"].append(f"beats-top-k skipped: the atlas was made {mismatch}")
        if refs:
            out["plausibility"] = [plausibility(j, image, refs, same_model=same[j.spec]) for j in judges]
        else:
            out["flags"].append("plausibility skipped: the atlas has no crops for this unit (build its views)")
    return out


def summary_line(scores: Mapping[str, Any]) -> str:
    """A short text of the figures, for captions: ``lite1 #3 p.21 | beats 9/9 (1.8x) | plaus .54 | RMS 12``
    (``RMS 0.4 faint`` for a faint image)."""
    parts = []
    t = [r for r in scores.get("transfer", []) if "rank" in r]
    if t:
        parts.append(" ".join(f"{r['judge']}{'*' if r['same_model'] else ''} #{r['rank']} p{r['probability']:.2f}" for r in t))
    b = scores.get("beats_top_k")
    if b:
        parts.append(f"beats {b['beats']}/{b['k']}" + (f" ({b['ratio']:.2g}x)" if b["ratio"] is not None else ""))
    p = scores.get("plausibility", [])
    if p:
        parts.append("plaus " + " ".join(f"{r['mean']:.2f}{'*' if r['same_model'] else ''}" for r in p))
    c = scores.get("contrast")
    if c:
        parts.append(contrast_caption(c))
    return " | ".join(parts)


def _is_record(obj: Any) -> bool:
    """Whether a parsed JSON file is a ``deepvis optimize`` result record (it names its raw picture)."""
    return isinstance(obj, dict) and isinstance(obj.get("files"), dict) and "raw" in obj["files"]


def result_records(folder: str | Path) -> list[str]:
    """The file names of the ``deepvis optimize`` result records in ``folder`` (the ones :func:`score_folder`
    reads; unreadable JSON files and JSON files that are not records are not listed), sorted; [] for a folder
    that does not exist."""
    root = Path(folder)
    if not root.is_dir():
        return []
    names = []
    for path in sorted(root.glob("*.json")):
        try:
            if _is_record(json.loads(path.read_text())):
                names.append(path.name)
        except (OSError, ValueError):
            continue
    return names


def score_folder(
    folder: str | Path,
    judges: Sequence[Judge],
    *,
    atlas: Atlas | None = None,
    optimized: Model | None = None,
    skipped: list[tuple[str, str]] | None = None,
) -> list[dict[str, Any]]:
    """Score every ``deepvis optimize`` result in ``folder``: the JSON records (``<unit>.json``) whose
    ``files.raw`` picture lies beside them. One row per record: ``record`` (file name), ``unit``,
    ``objective`` and ``scores`` (:func:`score_image`).

    A record that cannot be read (not JSON, its picture missing or unreadable) is left out and appended
    to ``skipped`` as (file name, reason), so one broken result does not cost the others; JSON files that
    are not records are ignored. :class:`InputError` when no result can be scored (the first reason)."""
    root = Path(folder)
    if not root.is_dir():
        raise InputError(f"{root} is not a folder of optimize results")
    rows = []
    left_out: list[tuple[str, str]] = []
    for path in sorted(root.glob("*.json")):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            left_out.append((path.name, f"not a readable JSON record ({exc})"))
            continue
        if not _is_record(record):
            continue
        raw = root / str(record["files"]["raw"])
        if not raw.is_file():
            left_out.append((path.name, f"{path.name} names {raw.name}, which is not in {root}"))
            continue
        try:
            image = load_image(raw)
        except InputError as exc:
            left_out.append((path.name, str(exc)))
            continue
        scores = score_image(image, record, judges, atlas=atlas, optimized=optimized)
        rows.append({"record": path.name, "unit": record.get("unit"), "objective": record.get("objective"), "scores": scores})
    if skipped is not None:
        skipped += left_out
    if not rows:
        if left_out:
            raise InputError(
                left_out[0][1]
                if len(left_out) == 1
                else f"no result in {root} can be scored: {left_out[0][1]} (and {len(left_out) - 1} more)"
            )
        raise InputError(f"{root} holds no optimize results (<unit>.json records next to their _raw.png images)")
    return rows
