"""``deepvis report``: summaries of a model on a dataset, as a self-contained HTML report plus JSON."""

from __future__ import annotations

import argparse
import sys

from ..choices import DATASET_SPEC_HELP, EMBEDDINGS
from .common import (
    add_autocast_option,
    add_engine_options,
    add_json_option,
    add_model_options,
    add_output_option,
    at_least,
    engine_from_args,
    model_from_args,
    print_json,
    print_skipped,
)


def _floats(text: str) -> list[float]:
    from ..errors import DeepvisError

    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise DeepvisError(
            f"--epsilons {text!r}: give comma-separated numbers of 0-255 pixel steps, e.g. 1,2,4,8 (or 0 for none)"
        ) from None
    if any(v < 0 or v != v or v == float("inf") for v in values):
        raise DeepvisError(f"--epsilons {text!r}: sizes must be positive numbers of 0-255 pixel steps")
    return [v for v in values if v > 0]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="summarize a model on a dataset: unit activity, locality, sensitivity, probes, clusters",
        description="Run the model over DATASET and write a self-contained HTML report (no network needed to view it) "
        "and a JSON file with every number: per layer, the most active and dead units and sparsity; how local units' "
        "responses are; how much each layer changes under small random and adversarial input perturbations; linear-probe "
        "accuracy per layer (labelled datasets); k-means clusters with a 2-D map. Without --layers, the end of each "
        "resolution stage and the logits are used (see docs/report.md). A token layer with a class token (ViT) is "
        "followed by that token as its own layer of C units, LAYER@cls (--no-class-token to leave it out); any prefix "
        "token can be named in --layers (blocks.5@reg0).",
    )
    p.add_argument("dataset", metavar="DATASET", help=DATASET_SPEC_HELP)
    add_output_option(
        p, metavar="REPORT", help="REPORT.html (the JSON goes beside it as REPORT.json) or a folder for report.html and report.json"
    )
    p.add_argument(
        "--layers", metavar="L1,L2", help="comma-separated layers (see `deepvis layers`); default: each stage's output and logits"
    )
    p.add_argument("--no-class-token", action="store_true", help="do not add each token layer's class token as its own layer LAYER@cls")
    p.add_argument("--max-images", type=int, metavar="N", help="use N inputs spread evenly over the dataset (default: all)")
    p.add_argument(
        "--epsilons",
        default="1,2,4,8",
        metavar="E1,E2",
        help="perturbation sizes in 0-255 pixel steps; 0 for no sensitivity analysis (default: %(default)s)",
    )
    p.add_argument(
        "--sensitivity-images",
        type=int,
        default=32,
        metavar="N",
        help="inputs perturbed for the sensitivity analysis; 0 for none, as --epsilons 0 (default: %(default)s)",
    )
    p.add_argument("--clusters", type=int, default=8, metavar="K", help="k-means clusters per layer (default: %(default)s)")
    p.add_argument("--cluster-layers", metavar="L1,L2", help="layers to cluster (default: every summarized layer)")
    p.add_argument(
        "--map",
        choices=EMBEDDINGS,
        default="auto",
        help="2-D map of the clusters: UMAP when installed (auto), or PCA (default: %(default)s)",
    )
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds of the linear probes (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=4, metavar="K", help="top inputs kept per unit (default: %(default)s)")
    p.add_argument(
        "--radius", type=float, default=0.15, help="locality neighbourhood radius as a fraction of the map side (default: %(default)s)"
    )
    p.add_argument(
        "--atlas", metavar="ATLAS", help="reuse the per-unit statistics of an atlas of the same model and dataset (`deepvis atlas`)"
    )
    p.add_argument("--batch-size", type=at_least(1), default=32, help="inputs per forward pass (default: %(default)s)")
    p.add_argument("--decode-threads", type=int, default=2, metavar="N", help="image decoding threads per process (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random perturbations, folds and k-means (default: %(default)s)")
    add_json_option(p, help="print a per-layer summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_engine_options(p)
    add_autocast_option(p, "the scan's forward passes (not the sensitivity analysis)")
    add_model_options(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..analysis import SummaryOptions, report_paths, summarize, write_report
    from ..datasets import open_dataset

    engine = engine_from_args(args)
    options = SummaryOptions(  # checks every value before the long work
        layers=_names(args.layers) or None,
        max_images=args.max_images,
        batch_size=args.batch_size,
        decode_threads=args.decode_threads,
        top_k=args.top_k,
        locality_radius=args.radius,
        epsilons=tuple(_floats(args.epsilons)),
        sensitivity_images=args.sensitivity_images,
        probe_folds=args.folds,
        cluster_k=args.clusters,
        cluster_layers=_names(args.cluster_layers) if args.cluster_layers is not None else None,
        embedding=args.map,
        atlas=args.atlas,
        seed=args.seed,
        class_token=not args.no_class_token,
        autocast=args.autocast,
    )
    report_paths(args.output)  # reject a bad output before the long work
    dataset = open_dataset(args.dataset)
    model = model_from_args(args)
    summary = summarize(model, dataset, options, progress=False if args.no_progress else None, **engine)
    html_path, json_path = write_report(summary, args.output)
    rows = []
    for n in summary.layer_names:
        a = summary.activity[n]
        loc = summary.locality.get(n)
        probe = summary.probes.get(n)
        rows.append(
            {
                "layer": n,
                "units": a.units,
                "dead": len(a.dead_units),
                "sparsity": a.layer_sparsity,
                "median_locality": _median(loc.locality) if loc is not None else None,
                "probe_accuracy": probe.accuracy if probe is not None and probe.skipped is None else None,
            }
        )
    if args.json:
        print_json({"html": str(html_path), "json": str(json_path), "images": len(summary.samples), "layers": _clean(rows)})
    else:
        print(f"{'layer':<24} {'units':>6} {'dead':>5} {'sparsity':>9} {'locality':>9} {'probe acc':>9}")
        for r in rows:
            print(
                f"{r['layer']:<24} {r['units']:>6} {r['dead']:>5} {_f(r['sparsity']):>9} {_f(r['median_locality']):>9} {_f(r['probe_accuracy']):>9}"
            )
        print(f"wrote {html_path} and {json_path}", file=sys.stderr)
    for note in summary.notes:  # what the report says about what it left out, on the terminal too
        print(f"deepvis: note: {note}", file=sys.stderr)
    print_skipped([(dataset.samples[i].key, reason) for i, reason in summary.skipped])
    return 0


def _names(text: str | None) -> tuple[str, ...] | None:
    """Comma-separated names as a tuple (None for None; an empty tuple for an empty list)."""
    return None if text is None else tuple(n.strip() for n in text.split(",") if n.strip())


def _median(values) -> float | None:
    import numpy as np

    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else None


def _f(v: object) -> str:
    """A table cell: a number to 3 decimals, or - when missing or not finite."""
    return f"{v:.3f}" if isinstance(v, (int, float)) and v == v else "-"


def _clean(rows):
    return [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.items()} for r in rows]
