"""Summaries, not only pictures: unit activity, locality, sensitivity, transferability, clusters, and the report.

>>> from deepvis.analysis import SummaryOptions, summarize, write_report
>>> summary = summarize(model, open_dataset("demo"), SummaryOptions(max_images=128))
>>> summary.layer_summary("blocks.4")          # what the live toolbox shows for a layer
>>> write_report(summary, "report.html")         # report.html + report.json
"""

from .activity import ACTIVE_THRESHOLD, LayerActivity, TopInput, activity_from_unit_stats, layer_activity
from .clusters import ClusterResult, cluster_features, cluster_map, umap_available
from .locality import DEFAULT_RADIUS, LayerLocality, LocalityAccumulator, MapLocality, map_locality
from .plots import Figure, Series, render_svg
from .probe import ProbeResult, pool_features, probe_accuracy
from .report import build_figures, render_html, report_data, report_paths, write_report
from .scan import FeatureAccumulator, ScanPlan, ScanResult, ThumbnailAccumulator, scan, scan_dataset
from .sensitivity import KINDS, SensitivityResult, measure_sensitivity, perturbation_directions
from .summary import DEFAULT_EPSILONS, DatasetSummary, SummaryOptions, default_layers, select_indices, summarize

__all__ = [
    "ACTIVE_THRESHOLD",
    "LayerActivity",
    "TopInput",
    "layer_activity",
    "activity_from_unit_stats",
    "DEFAULT_RADIUS",
    "MapLocality",
    "map_locality",
    "LocalityAccumulator",
    "LayerLocality",
    "KINDS",
    "SensitivityResult",
    "perturbation_directions",
    "measure_sensitivity",
    "ProbeResult",
    "pool_features",
    "probe_accuracy",
    "ClusterResult",
    "cluster_features",
    "cluster_map",
    "umap_available",
    "Figure",
    "Series",
    "render_svg",
    "DEFAULT_EPSILONS",
    "SummaryOptions",
    "DatasetSummary",
    "ScanPlan",
    "ScanResult",
    "FeatureAccumulator",
    "ThumbnailAccumulator",
    "default_layers",
    "select_indices",
    "scan",
    "scan_dataset",
    "summarize",
    "report_paths",
    "build_figures",
    "report_data",
    "render_html",
    "write_report",
]
