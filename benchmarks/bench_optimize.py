"""Activation maximization: throughput vs Lucent, step overhead, and recognizability of class images.

Default model (EfficientNet-Lite0), CPU (or ``--device cuda``). Three sections, printed as they finish:

* ``speed`` — seconds per unit (wall clock, and CPU time, which other processes on a shared machine
  disturb less) for ``--units`` units of ``--layers`` optimized together by deepvis
  (``--preset``, ``--steps`` steps at ``--size`` px), and for Lucent's ``render_vis`` one unit at a
  time on the same model (its defaults: 128 px Fourier image upsampled to 224, standard transforms,
  Adam, the whole network every step; ``--lucent-units`` units timed). Target: deepvis >= 6x.
* ``ratio`` — one deepvis step (forward, backward, update, regularizers) over a bare forward+backward of
  the same batch to the same layer, medians of interleaved runs, for presets 1 and 4 (the paper's
  most expensive regularizers), ``robust``, 3 and ``maco`` (``--ratio-presets``). Target: <= 1.15; and
  MACO's step over preset 3's (its pixel counterpart without regularizers between steps): <= 1.2.
* ``recog`` — the fraction of class images that lite2 ranks in its top 5 for the intended class, for
  each paper preset, unregularized ascent, deepvis's ``robust`` preset and Lucent's defaults (six
  ImageNet classes; raw images, resized whole to lite2's input). Presets 1-4 and ``none`` run with
  their default calibration (:mod:`deepvis.optimize.calibrate`); ``table`` has both.
* ``table`` — one row per setting: presets 1–4 and ``none``, each calibrated (the default) and literal
  (``calibrate=False``), ``robust`` and ``maco`` (when that preset exists): seconds per unit for
  ``--table-units`` units of each of ``--layers`` optimized together (``--steps`` steps, ``--size``
  px), the share of those units whose image beats every photo of :data:`deepvis.optimize.calibrate.PHOTOS`
  (objective above the photos' maximum), and the class images' share in lite2's and lite1's top 5 with
  the mean probability of the intended class (``--classes`` at ``--recog-size`` px, ``--recog-steps``).

Lucent is not a deepvis dependency: install it into the venv for this benchmark only
(``pip install --no-deps torch-lucent decorator kornia kornia_rs ipython traitlets pygments``); without
it the Lucent rows are skipped with a message. Runs with the allocator settings the deepvis command
uses. Run: ``python benchmarks/bench_optimize.py [--sections speed,ratio,recog,table]``.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from deepvis.allocator import allocator_tuned, ensure_allocator_tuning

ensure_allocator_tuning()

from deepvis.capture import capture  # noqa: E402
from deepvis.models import load_model  # noqa: E402
from deepvis.optimize import PRESETS, get_preset, optimize_batch, resolve_targets, visualize  # noqa: E402
from deepvis.optimize.calibrate import photo_values  # noqa: E402
from deepvis.pixels import to_uint8  # noqa: E402
from deepvis.runtime import synchronize  # noqa: E402

CLASSES = ("goldfinch", "flamingo", "monarch", "jellyfish", "volcano", "strawberry")


def lucent():
    """Lucent's render pieces, or None with a message when it is not installed."""
    try:
        import kornia
        from kornia.geometry import transform as kt
        from lucent.optvis import objectives, render, transform
    except ImportError as exc:
        print(
            f"  Lucent not installed ({exc.name}); skipping the Lucent rows. Install it for benchmarks only: "
            "pip install --no-deps torch-lucent decorator kornia kornia_rs ipython traitlets pygments"
        )
        return None
    # Lucent 0.1.8 calls functions that current kornia moved into kornia.geometry.transform
    for name in ("get_rotation_matrix2d", "warp_affine"):
        if not hasattr(kornia, name):
            setattr(kornia, name, getattr(kt, name))
    return render, objectives, transform


def lucent_model(device: torch.device):
    """A separate copy of the default model for Lucent, which hooks every module and never unhooks."""
    return copy.deepcopy(load_model("default", device=device).module).eval()


def lucent_render(lib, base, layer: str, unit: int, *, steps: int, normalize_like=None):
    """One unit by Lucent, on a fresh copy of ``base`` (Lucent adds hooks on every call and never
    removes them; reusing one module would make every later unit slower)."""
    render, objectives, transform = lib
    module = copy.deepcopy(base)
    kw = {}
    if normalize_like is not None:  # the model's own normalization instead of Lucent's ImageNet one
        mean = torch.tensor(normalize_like.mean).view(1, -1, 1, 1)
        std = torch.tensor(normalize_like.std).view(1, -1, 1, 1)
        kw = {"preprocess": False, "transforms": [*transform.standard_transforms, lambda x: (x - mean) / std]}
    imgs = render.render_vis(module, objectives.channel(layer, unit), thresholds=(steps,), show_image=False, progress=False, **kw)
    return imgs[-1][0]  # (H, W, 3) in 0-1


# -- speed ---------------------------------------------------------------------------------------------
def bench_speed(args, model) -> None:
    print(f"\n== speed: {args.units} units, {args.steps} steps, {args.size} px, preset {args.preset} ==")
    lib = lucent()
    lmod = lucent_model(model.device) if lib else None
    for layer in args.layers:
        units = [f"{layer}:{i}" for i in range(args.units)]
        visualize(model, units[:2], preset=args.preset, steps=2, size=args.size)  # warm-up: layer table, first allocations
        if lib:
            lucent_render(lib, lmod, layer.replace(".", "_"), 0, steps=2)
        t, c = time.perf_counter(), time.process_time()
        visualize(model, units, preset=args.preset, steps=args.steps, size=args.size, batch_size=args.units)
        dv, dvc = (time.perf_counter() - t) / args.units, (time.process_time() - c) / args.units
        line = f"{layer:10s} deepvis {dv:6.2f} s/unit (CPU {dvc:6.2f} s)"
        if lib:
            t, c = time.perf_counter(), time.process_time()
            for i in range(args.lucent_units):
                lucent_render(lib, lmod, layer.replace(".", "_"), i, steps=args.steps)
            lu, luc = (time.perf_counter() - t) / args.lucent_units, (time.process_time() - c) / args.lucent_units
            line += (
                f" | Lucent {lu:6.2f} s/unit (CPU {luc:6.2f} s; {args.lucent_units} units)"
                f" | deepvis throughput {lu / dv:5.1f}x wall, {luc / dvc:5.1f}x CPU time (target >= 6)"
            )
        print(line, flush=True)


# -- step overhead ---------------------------------------------------------------------------------------
def bench_ratio(args, model) -> None:
    n = args.units
    presets = args.ratio_presets
    print(
        f"\n== step overhead: batch {n}, {args.size} px, presets {', '.join(presets)} interleaved round by round "
        f"({args.ratio_rounds} rounds of {args.ratio_steps} steps; medians, wall clock and this process's CPU time) =="
    )
    for layer in args.layers:
        objs = resolve_targets(model, [f"{layer}:{i}" for i in range(n)], size=args.size)
        hw = (args.size, args.size)
        x = torch.randn(n, 3, *hw, requires_grad=True)
        ch = torch.arange(n)

        def bare(x=x, layer=layer, ch=ch):
            a = capture(model, x, [layer], grad=True)[layer]
            v = a[torch.arange(n), ch, a.shape[2] // 2, a.shape[3] // 2]
            torch.autograd.grad(v.sum(), [x])

        bare()
        settings = {p: get_preset(p).replace(steps=args.ratio_steps + 1) for p in presets}
        for s in settings.values():
            optimize_batch(model, objs, s.replace(steps=2), size=hw)  # warm-up
        bare_t: dict[str, list[float]] = {p: [] for p in presets}
        step_t: dict[str, list[float]] = {p: [] for p in presets}
        step_c: dict[str, list[float]] = {p: [] for p in presets}
        for _ in range(args.ratio_rounds):
            for p, s in settings.items():  # every preset once per round: the machine's load changes alike for all
                for _ in range(2):
                    synchronize(model.device)
                    t0 = time.perf_counter()
                    bare()
                    synchronize(model.device)
                    bare_t[p].append(time.perf_counter() - t0)
                stamps: list[tuple[float, float]] = []
                optimize_batch(
                    model,
                    objs,
                    s,
                    size=hw,
                    on_step=lambda t, stamps=stamps: (synchronize(model.device), stamps.append((time.perf_counter(), time.process_time()))),
                )
                step_t[p] += [b[0] - a[0] for a, b in zip(stamps, stamps[1:])]  # full steps (the last one is measure-only)
                step_c[p] += [b[1] - a[1] for a, b in zip(stamps, stamps[1:])]
        for p in presets:
            b, s_, c = statistics.median(bare_t[p]), statistics.median(step_t[p]), statistics.median(step_c[p])
            print(
                f"{layer:10s} preset {p:6s} bare fwd+bwd {b:6.3f} s | deepvis step {s_:6.3f} s (CPU {c:6.3f} s) | ratio {s_ / b:5.2f} (target <= 1.15)",
                flush=True,
            )
        if "maco" in settings and "3" in settings:  # MACO's step against the pixel preset 3's (issue 14: <= 1.2x)
            wall = statistics.median(step_t["maco"]) / statistics.median(step_t["3"])
            cpu = statistics.median(step_c["maco"]) / statistics.median(step_c["3"])
            print(f"{layer:10s} maco step / preset 3 step: {wall:5.2f}x wall, {cpu:5.2f}x CPU time (target <= 1.2)", flush=True)


# -- recognizability --------------------------------------------------------------------------------------
def bench_recog(args, model) -> None:
    from PIL import Image

    judge = load_model("lite2", device=model.device)
    idx = [model.class_index(c) for c in args.classes]
    units = [f"logits:{i}" for i in idx]
    print(
        f"\n== recognizability: {len(idx)} classes ({', '.join(args.classes)}), judged by lite2 top-5 on raw images; "
        f"deepvis at {args.recog_size} px, {'the preset' + chr(39) + 's own' if args.recog_steps == 0 else args.recog_steps} steps =="
    )

    def judge_images(images: list[Image.Image]) -> tuple[int, list[int], float]:
        """(images in lite2's top 5, lite2's rank of the intended class per image, its mean probability)"""
        xb = torch.stack([judge.preprocessing.to_tensor(im.convert("RGB"), crop=False) for im in images])
        with torch.no_grad():
            lg = judge.module(xb)
        ranks = [int((lg[i] > lg[i, j]).sum()) for i, j in enumerate(idx)]
        prob = float(torch.stack([lg[i].softmax(0)[j] for i, j in enumerate(idx)]).mean())
        return sum(r < 5 for r in ranks), ranks, prob

    out_dir = Path(args.save) if args.save else None
    for preset in args.recog_presets:
        t = time.perf_counter()
        steps = args.recog_steps or None
        res = visualize(model, units, preset=preset, steps=steps, size=args.recog_size, batch_size=len(units), seed=args.seed)
        hits, ranks, prob = judge_images([r.raw_image() for r in res])
        print(
            f"deepvis preset {preset:7s} {hits}/{len(idx)} in top-5  (lite2 ranks {ranks}, mean p {prob:.2f}; {res[0].steps_run} steps, {time.perf_counter() - t:.0f} s)",
            flush=True,
        )
        if out_dir:
            from deepvis.render import montage

            out_dir.mkdir(parents=True, exist_ok=True)
            montage([r.raw_image() for r in res], labels=list(args.classes), cols=len(res)).save(out_dir / f"recog_{preset}.png")
    lib = lucent()
    if lib:
        lmod = lucent_model(model.device)
        for label, norm in (("Lucent defaults", None), ("Lucent + model norm", model.preprocessing)):
            t = time.perf_counter()
            arrs = [lucent_render(lib, lmod, "labels", i, steps=args.lucent_steps, normalize_like=norm) for i in idx]
            ims = [Image.fromarray(to_uint8(a)) for a in arrs]
            hits, ranks, prob = judge_images(ims)
            print(
                f"{label:22s} {hits}/{len(idx)} in top-5  (lite2 ranks {ranks}, mean p {prob:.2f}; {args.lucent_steps} steps at 128 px, {time.perf_counter() - t:.0f} s)",
                flush=True,
            )


# -- the presets table: speed, units that beat the photos, recognizability, calibrated and literal -----------
def table_settings() -> list[tuple[str, str, bool | None]]:
    """(row label, preset, calibrate) for every row; calibrate None: the preset's own (not calibrated)."""
    rows: list[tuple[str, str, bool | None]] = []
    for p in ("1", "2", "3", "4", "none"):
        rows += [(f"{p} calibrated", p, True), (f"{p} literal", p, False)]
    rows.append(("robust", "robust", None))
    if "maco" in PRESETS:
        rows.append(("maco", "maco", None))
    return rows


def bench_table(args, model) -> None:
    from PIL import Image

    judges = {name: load_model(name, device=model.device) for name in ("lite2", "lite1")}
    idx = [model.class_index(c) for c in args.classes]
    classes = [f"logits:{i}" for i in idx]
    hidden = {layer: [f"{layer}:{i}" for i in range(args.table_units)] for layer in args.layers}
    hw = (args.size, args.size)
    photo_max = {layer: photo_values(model, resolve_targets(model, u, size=hw), hw).amax(1) for layer, u in hidden.items()}
    print(
        f"\n== presets table: {args.table_units} units of {', '.join(args.layers)} together, {args.steps} steps, {args.size} px "
        f"(s/unit; units above every photo's value); {len(idx)} classes at {args.recog_size} px, {args.recog_steps} steps, "
        "raw images judged by lite2 / lite1 (top-5 share, mean probability) =="
    )
    if "maco" not in PRESETS:
        print("  (the maco preset is missing: no maco row)")

    def judge(name: str, images: list[Image.Image]) -> tuple[int, float]:
        j = judges[name]
        xb = torch.stack([j.preprocessing.to_tensor(im.convert("RGB"), crop=False) for im in images]).to(model.device)
        with torch.no_grad():
            lg = j.module(xb)
        ranks = [int((lg[i] > lg[i, c]).sum()) for i, c in enumerate(idx)]
        return sum(r < 5 for r in ranks), float(torch.stack([lg[i].softmax(0)[c] for i, c in enumerate(idx)]).mean())

    header = (
        f"{'setting':17s} | "
        + " | ".join(f"{layer} s/unit, beats photos" for layer in args.layers)
        + " | lite2 top-5 (p) | lite1 top-5 (p)"
    )
    print(header, flush=True)
    rows = [r for r in table_settings() if args.table_rows is None or r[0] in args.table_rows]
    for label, preset, calibrate in rows:
        kw = {} if calibrate is None else {"calibrate": calibrate}
        cells = []
        for layer, units in hidden.items():
            synchronize(model.device)
            t = time.perf_counter()
            res = visualize(model, units, preset=preset, steps=args.steps, size=args.size, batch_size=len(units), seed=args.seed, **kw)
            synchronize(model.device)
            dt = (time.perf_counter() - t) / len(units)
            beats = sum(r.value > float(m) for r, m in zip(res, photo_max[layer]))
            cells.append(f"{dt:6.2f} s, {beats:2d}/{len(units)}")
        res = visualize(
            model, classes, preset=preset, steps=args.recog_steps, size=args.recog_size, batch_size=len(classes), seed=args.seed, **kw
        )
        images = [r.raw_image() for r in res]
        (h2, p2), (h1, p1) = judge("lite2", images), judge("lite1", images)
        print(f"{label:17s} | " + " | ".join(cells) + f" | {h2}/{len(idx)} ({p2:.2f}) | {h1}/{len(idx)} ({p1:.2f})", flush=True)
        if args.save:
            from deepvis.render import montage

            out_dir = Path(args.save)
            out_dir.mkdir(parents=True, exist_ok=True)
            montage(images, labels=list(args.classes), cols=len(images)).save(out_dir / f"table_{label.replace(' ', '_')}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="speed,ratio,recog,table")
    ap.add_argument("--layers", default="blocks.3,blocks.5", type=lambda s: s.split(","))
    ap.add_argument("--units", type=int, default=64)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--preset", default="1", help="preset for the speed section (default: %(default)s)")
    ap.add_argument("--lucent-units", type=int, default=4)
    ap.add_argument("--ratio-steps", type=int, default=4)
    ap.add_argument("--ratio-rounds", type=int, default=3)
    ap.add_argument("--ratio-presets", default="1,4,robust,3,maco", type=lambda s: s.split(","), help="presets of the ratio section")
    ap.add_argument("--classes", default=",".join(CLASSES), type=lambda s: s.split(","))
    ap.add_argument("--recog-presets", default="1,2,3,4,none,robust", type=lambda s: s.split(","))
    ap.add_argument("--recog-size", type=int, default=224)
    ap.add_argument("--recog-steps", type=int, default=256, help="steps for every preset (0: each preset's own)")
    ap.add_argument("--lucent-steps", type=int, default=512, help="Lucent's steps for the recognizability rows (its default)")
    ap.add_argument("--table-units", type=int, default=64, help="units per layer in the presets table (default: %(default)s)")
    ap.add_argument(
        "--table-rows",
        default=None,
        type=lambda s: s.split(","),
        help="only these rows of the presets table, by label (e.g. 'maco,3 calibrated'; default: all)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save", metavar="DIR", help="save the class images here")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (the judge and Lucent's copy run there too)")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = load_model("default", device=args.device)
    print(f"torch threads: {torch.get_num_threads()}, allocator tuned: {allocator_tuned()}, device: {model.device}")
    sections = args.sections.split(",")
    if "speed" in sections:
        bench_speed(args, model)
    if "ratio" in sections:
        bench_ratio(args, model)
    if "recog" in sections:
        bench_recog(args, model)
    if "table" in sections:
        bench_table(args, model)


if __name__ == "__main__":
    main()
