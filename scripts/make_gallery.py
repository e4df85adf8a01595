"""Make docs/gallery: activation maximization on the default model, presets side by side.

Two pictures, one row per target and one column per setting — unregularized gradient ascent (for
contrast), the paper's presets 1-4 (calibrated, their default) and deepvis's ``robust`` and ``maco``
presets — each tile the display version (contrast-stretched around the mean image), with its quality
figures under it, and under them its contrast (:func:`deepvis.optimize.contrast`: the raw image's RMS
distance from the mean image, ``faint`` below 2 levels, where the tile shows a pattern the model saw as flat
grey, magnified many times):

* ``classes.png`` — class logits of six ImageNet classes, at the model's input size (224 px); under
  each tile the intended class's rank and probability under EfficientNet-Lite2 (a judge that is not the
  optimized model: :func:`deepvis.scores.transfer`, on the raw image as the model saw it);
* ``units.png`` — hidden units (center neurons of ``blocks.3`` and ``blocks.5``) at 128 px; under each
  tile the unit's value on the image and its highest value on the natural sample photos
  (:func:`deepvis.optimize.calibrate.photo_values`): the image beats every photo when the first is larger.

``gallery.json`` records every setting, every value reached and every quality figure. Everything is seeded, so the same
command makes the same pictures (on the same machine and library versions). Run from the repository
root: ``python scripts/make_gallery.py`` (add ``--steps N`` to cap every preset's steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from deepvis.allocator import ensure_allocator_tuning

ensure_allocator_tuning()

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from deepvis._fs import atomic_path  # noqa: E402
from deepvis.models import load_model  # noqa: E402
from deepvis.optimize import get_preset, resolve_targets, visualize  # noqa: E402
from deepvis.optimize.calibrate import photo_values  # noqa: E402
from deepvis.optimize.images import contrast_caption  # noqa: E402
from deepvis.scores import load_judges, transfer  # noqa: E402

CLASSES = ("goldfinch", "flamingo", "monarch", "jellyfish", "volcano", "strawberry")
UNITS = ("blocks.3:2", "blocks.3:17", "blocks.3:41", "blocks.5:7", "blocks.5:64", "blocks.5:150")
COLUMNS = ("none", "1", "2", "3", "4", "robust", "maco")
#: the judge of the class images (not the optimized model)
JUDGE = "lite2"
#: the height of the two quality lines under each tile (px)
FIGURE_H = 25


def grid(rows: list[list[Image.Image]], figures: list[list[str]], row_names: list[str], col_names: list[str], tile: int) -> Image.Image:
    """Tiles in a labelled table: a header row of column names, a left column of row names, and each
    tile's quality figure under it."""
    font = ImageFont.load_default()
    left, top, pad = 92, 16, 2
    cell = tile + FIGURE_H + pad
    w = left + len(col_names) * (tile + pad)
    h = top + len(rows) * cell
    out = Image.new("RGB", (w, h), (20, 20, 20))
    draw = ImageDraw.Draw(out)
    for j, name in enumerate(col_names):
        draw.text((left + j * (tile + pad) + 2, 2), name, fill=(235, 235, 235), font=font)
    for i, (row, figs, name) in enumerate(zip(rows, figures, row_names)):
        y = top + i * cell
        draw.text((2, y + tile // 2 - 6), name[:15], fill=(235, 235, 235), font=font)
        for j, (im, fig) in enumerate(zip(row, figs)):
            x = left + j * (tile + pad)
            out.paste(im.resize((tile, tile), Image.Resampling.LANCZOS), (x, y))
            draw.text((x + 1, y + tile + 1), fig, fill=(200, 200, 200), font=font)
    return out


def run(model, targets, names, size: int, args, record: dict, quality) -> Image.Image:
    """One grid: every setting of COLUMNS on ``targets``; ``quality(results)`` gives each result's
    (caption, JSON record) of its quality figure."""
    columns, captions = [], []
    for preset in COLUMNS:
        steps = min(args.steps, get_preset(preset).steps) if args.steps else None
        t = time.perf_counter()
        res = visualize(model, targets, preset=preset, steps=steps, size=size, seed=args.seed, batch_size=len(targets))
        print(f"  {preset:7s} {res[0].steps_run} steps, {time.perf_counter() - t:.0f} s", file=sys.stderr, flush=True)
        columns.append([r.display_image() for r in res])
        figures = quality(res)
        contrasts = [r.contrast() for r in res]
        captions.append([f"{c}\n{contrast_caption(k)}" for (c, _), k in zip(figures, contrasts)])
        record[preset] = {
            "settings": res[0].settings.to_dict(),
            "size": size,
            "seed": args.seed,
            "values": {n: r.value for n, r in zip(names, res)},
            "quality": {n: q for n, (_, q) in zip(names, figures)},
            "contrast": dict(zip(names, contrasts)),
        }
    rows = [[col[i] for col in columns] for i in range(len(targets))]
    figs = [[col[i] for col in captions] for i in range(len(targets))]
    labels = ["none (plain)" if c == "none" else (c if c in ("robust", "maco") else f"preset {c}") for c in COLUMNS]
    return grid(rows, figs, list(names), labels, args.tile)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/gallery", help="output folder (default: %(default)s)")
    ap.add_argument("--steps", type=int, help="cap every preset's steps (default: each preset's own)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tile", type=int, default=112, help="tile size in px (default: %(default)s)")
    ap.add_argument("--unit-size", type=int, default=128)
    args = ap.parse_args()
    model = load_model("default", device="cpu")
    out = Path(args.out)
    record: dict = {
        "model": model.name,
        "command": "python scripts/make_gallery.py" + (f" --steps {args.steps}" if args.steps else ""),
        "classes": {},
        "units": {},
    }
    print("classes:", file=sys.stderr)
    idx = [model.class_index(c) for c in CLASSES]
    (judge,) = load_judges([JUDGE])

    def class_quality(res) -> list[tuple[str, dict]]:
        rows = [transfer(judge, r.raw_image(), i, model.label(i)) for r, i in zip(res, idx)]
        return [(f"{JUDGE} #{t['rank']} p {t['probability']:.2f}", t) for t in rows]

    classes = run(
        model, [f"logits:{i}" for i in idx], list(CLASSES), model.preprocessing.input_size[0], args, record["classes"], class_quality
    )
    print("hidden units:", file=sys.stderr)
    hw = (args.unit_size, args.unit_size)
    photo_max = photo_values(model, resolve_targets(model, list(UNITS), size=hw), hw).amax(1).tolist()

    def unit_quality(res) -> list[tuple[str, dict]]:
        return [(f"{r.value:.1f} (photos {m:.1f})", {"value": r.value, "photo_max": m}) for r, m in zip(res, photo_max)]

    units = run(model, list(UNITS), list(UNITS), args.unit_size, args, record["units"], unit_quality)
    for name, im in (("classes.png", classes), ("units.png", units)):
        with atomic_path(out / name) as tmp:
            im.save(tmp, format="PNG", optimize=True)
    with atomic_path(out / "gallery.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}/classes.png, {out}/units.png, {out}/gallery.json", file=sys.stderr)


if __name__ == "__main__":
    main()
