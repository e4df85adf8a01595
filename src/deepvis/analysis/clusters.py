"""Clusters of a dataset in a layer's representation, and a 2-D map with thumbnails.

The representation of an input at a layer is its spatially pooled activation vector (see
:func:`deepvis.analysis.probe.pool_features`), standardized per unit. k-means (scikit-learn,
``n_init=4``) groups the inputs; each cluster's **representatives** are its members closest to the
cluster's centre. The 2-D map is a PCA projection of the standardized vectors, or UMAP when the
``umap-learn`` package is installed and asked for. When labels are known, the agreement of clusters
with classes is measured by the adjusted Rand index and the purity (the share of inputs whose cluster's
most common class is their own).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ..choices import EMBEDDINGS
from ..errors import DeepvisError

__all__ = ["PALETTE", "ClusterResult", "cluster_features", "cluster_map", "umap_available"]

#: cluster colours (RGB), cycled when there are more clusters
PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
    (127, 127, 127),
    (174, 199, 232),
    (255, 187, 120),
)


def umap_available() -> bool:
    """True when ``umap-learn`` can be imported."""
    try:
        import umap  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class ClusterResult:
    """k-means clusters of one layer's representation.

    ``samples`` are the dataset indices of the rows; ``assignment`` (N,) each row's cluster;
    ``representatives[c]`` the dataset indices of cluster ``c``'s most central members (closest first);
    ``coords`` (N, 2) the 2-D map (``method`` ``"pca"`` or ``"umap"``; ``explained_variance`` the PCA
    components' variance ratios); ``ari``/``purity`` the agreement with labels (None without labels).
    """

    layer: str
    k: int
    samples: list[int]
    assignment: np.ndarray
    representatives: list[list[int]]
    coords: np.ndarray
    method: str
    explained_variance: list[float] | None
    ari: float | None = None
    purity: float | None = None

    @property
    def sizes(self) -> list[int]:
        return [int((self.assignment == c).sum()) for c in range(self.k)]

    def to_dict(self) -> dict[str, object]:
        return {
            "layer": self.layer,
            "k": self.k,
            "sizes": self.sizes,
            "samples": self.samples,
            "assignment": self.assignment.tolist(),
            "representatives": self.representatives,
            "map_method": self.method,
            "coords": self.coords.tolist(),
            "explained_variance": self.explained_variance,
            "ari": self.ari,
            "purity": self.purity,
        }


def cluster_features(
    layer: str,
    features: np.ndarray,
    samples: Sequence[int],
    *,
    k: int = 8,
    representatives: int = 6,
    labels: np.ndarray | None = None,
    seed: int = 0,
    embedding: str = "auto",
) -> ClusterResult:
    """Cluster ``features`` (N, D) (rows = ``samples``) into ``k`` groups (at most N) and map them to 2-D.

    ``embedding``: ``"pca"``, ``"umap"`` (needs ``umap-learn``) or ``"auto"`` (UMAP when installed).
    ``labels`` (N,) (−1 = unknown) adds the adjusted Rand index and purity.
    """
    # scikit-learn (heavy: about 1 s) is imported when clusters are computed, not with deepvis.analysis
    from sklearn.cluster import KMeans
    from sklearn.decomposition import PCA
    from sklearn.metrics import adjusted_rand_score
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    X = np.nan_to_num(np.asarray(features, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    n = len(X)
    if n != len(samples):
        raise ValueError("one sample index per feature row is needed")
    if n < 2:
        raise ValueError("clustering needs at least two inputs")
    if embedding not in EMBEDDINGS:
        raise ValueError(f"embedding must be one of {', '.join(EMBEDDINGS)}")
    if embedding == "umap" and not umap_available():
        raise DeepvisError("a UMAP map needs the umap-learn package (pip install umap-learn); or use PCA")
    Z = StandardScaler().fit_transform(X)
    k = max(1, min(int(k), n))
    with threadpool_limits(1):  # see probe.py: small problems run far faster on one thread beside torch
        km = KMeans(n_clusters=k, n_init=4, random_state=seed).fit(Z)
    assign = km.labels_.astype(np.int64)
    dist = np.linalg.norm(Z - km.cluster_centers_[assign], axis=1)
    reps = []
    for c in range(k):
        members = np.flatnonzero(assign == c)
        order = members[np.argsort(dist[members], kind="stable")]
        reps.append([int(samples[i]) for i in order[:representatives]])
    use_umap = embedding == "umap" or (embedding == "auto" and umap_available())
    explained: list[float] | None = None
    if use_umap:
        import umap

        coords = umap.UMAP(n_components=2, random_state=seed, n_neighbors=min(15, n - 1)).fit_transform(Z)
        method = "umap"
    else:
        dims = min(2, Z.shape[1], n)
        pca = PCA(n_components=dims, random_state=seed).fit(Z)
        coords = pca.transform(Z)
        if dims < 2:
            coords = np.pad(coords, ((0, 0), (0, 2 - dims)))
        explained = [float(v) for v in pca.explained_variance_ratio_]
        method = "pca"
    ari = purity = None
    if labels is not None:
        lab = np.asarray(labels)
        known = lab >= 0
        if known.sum() >= 2:
            ari = float(adjusted_rand_score(lab[known], assign[known]))
            hits = 0
            for c in range(k):
                members = lab[known & (assign == c)]
                if len(members):
                    hits += int(np.bincount(members).max())
            purity = hits / int(known.sum())
    return ClusterResult(
        layer, k, [int(s) for s in samples], assign, reps, np.asarray(coords, dtype=np.float64), method, explained, ari, purity
    )


def cluster_map(
    result: ClusterResult,
    thumbnails: Mapping[int, Image.Image] | Callable[[int], Image.Image | None] | None = None,
    *,
    size: int = 640,
    thumb: int = 36,
    max_thumbnails: int = 160,
) -> Image.Image:
    """The 2-D map as an RGB image: a dot per input coloured by cluster, thumbnails for up to ``max_thumbnails`` inputs.

    ``thumbnails`` maps (or a function turns) a dataset index into its image (None: no thumbnail).
    Thumbnails go first to the clusters' representatives, then to inputs spread over the dataset;
    each has a frame in its cluster's colour.
    """
    img = Image.new("RGB", (size, size), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    xy = result.coords
    margin = thumb // 2 + 4
    lo, hi = xy.min(0), xy.max(0)
    span = np.where(hi - lo > 0, hi - lo, 1.0)
    pix = margin + (xy - lo) / span * (size - 2 * margin)
    pix[:, 1] = size - pix[:, 1]  # y up
    row_of = {s: i for i, s in enumerate(result.samples)}
    for i, (x, y) in enumerate(pix):
        c = PALETTE[int(result.assignment[i]) % len(PALETTE)]
        draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=c)
    if thumbnails is not None:
        get = thumbnails.get if isinstance(thumbnails, Mapping) else thumbnails
        chosen: list[int] = []
        for reps in result.representatives:
            chosen += [row_of[s] for s in reps[:3] if s in row_of]
        step = max(1, len(result.samples) // max(1, max_thumbnails))
        chosen += list(range(0, len(result.samples), step))
        seen: set[int] = set()
        for i in chosen:
            if i in seen or len(seen) >= max_thumbnails:
                continue
            seen.add(i)
            im = get(result.samples[i])
            if im is None:
                continue
            c = PALETTE[int(result.assignment[i]) % len(PALETTE)]
            t = im.convert("RGB").resize((thumb, thumb), Image.Resampling.BILINEAR)
            x0, y0 = int(pix[i, 0] - thumb / 2), int(pix[i, 1] - thumb / 2)
            draw.rectangle((x0 - 2, y0 - 2, x0 + thumb + 1, y0 + thumb + 1), fill=c)
            img.paste(t, (x0, y0))
    return img
