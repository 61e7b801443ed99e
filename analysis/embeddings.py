"""Figure 2, embedding quality on the test classes.

- a 2-D projection of each loss's best final run (chosen on validation MAP@R), coloured by class:
  UMAP (McInnes et al. 2018; seeded, so single-threaded and reproducible), or t-SNE (van der
  Maaten & Hinton 2008; perplexity 30, PCA initialisation, 500 iterations) where ``umap-learn``
  cannot be imported, on a class-stratified subsample;
- histograms of positive-pair and negative-pair Euclidean distances with their overlap area
  (0: perfectly separated, 1: identical distributions);
- the fractions of easy / semi-hard / hard test triplets (FaceNet's definitions) and the
  alignment / uniformity of Wang & Isola (ICML 2020), read from the runs' ``test/`` metrics.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure

from .load import Sweep, load_embeddings

PROJECTION_POINTS = 600
# 250 of early exaggeration + 250: enough for a few hundred points, twice as fast as the default
TSNE_ITERATIONS = 500
TRIPLET_KINDS = (("easy_fraction", "easy"), ("semi_hard_fraction", "semi-hard"), ("hard_fraction", "hard"))


def subsample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``n`` items, class-stratified: each class keeps its share, and at
    least one item while there is room for every class."""
    if labels.size <= n:
        return np.arange(labels.size)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    takes = np.maximum(1, np.floor(n * counts / labels.size)).astype(int)
    while takes.sum() > n:
        takes[np.argmax(takes)] -= 1
    keep = [
        rng.choice(np.flatnonzero(labels == cls), size=take, replace=False)
        for cls, take in zip(classes, takes)
    ]
    return np.sort(np.concatenate(keep))


def pair_distances(embeddings: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Euclidean distances of all unordered pairs ``i < j``, split into (same class, different class)."""
    x = np.asarray(embeddings, dtype=np.float64)
    sq = (x * x).sum(1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * x @ x.T, 0.0))
    i, j = np.triu_indices(len(x), k=1)
    same = labels[i] == labels[j]
    return d[i, j][same], d[i, j][~same]


def overlap_area(a: np.ndarray, b: np.ndarray, bins: int = 60) -> float:
    """Area under ``min(density_a, density_b)`` on shared histogram bins, in [0, 1]."""
    if a.size == 0 or b.size == 0:
        return math.nan
    lo, hi = min(a.min(), b.min()), max(a.max(), b.max())
    if hi <= lo:
        return 1.0
    edges = np.linspace(lo, hi, bins + 1)
    da, _ = np.histogram(a, edges, density=True)
    db, _ = np.histogram(b, edges, density=True)
    return float(np.minimum(da, db).sum() * (edges[1] - edges[0]))


def project_2d(embeddings: np.ndarray, seed: int = 0) -> tuple[np.ndarray, str]:
    """``(points (n, 2), method name)``: UMAP, or t-SNE after PCA to 50 dimensions where UMAP cannot be
    imported."""
    try:
        import umap
    except ImportError:
        from sklearn.decomposition import PCA
        from sklearn.manifold import TSNE

        x = np.asarray(embeddings, dtype=np.float64)
        if x.shape[1] > 50:
            x = PCA(50, random_state=seed).fit_transform(x)
        perplexity = min(30.0, (len(x) - 1) / 3)
        return TSNE(
            2, perplexity=perplexity, init="pca", max_iter=TSNE_ITERATIONS, random_state=seed
        ).fit_transform(x), "t-SNE"
    from sklearn.neighbors import NearestNeighbors

    # exact neighbours from scikit-learn: for a few hundred points the same graph UMAP's nearest-neighbour
    # descent approximates, without compiling it (about 12 of the 25 s numba spends on a first UMAP)
    x = np.asarray(embeddings, dtype=np.float32)
    k = min(15, len(x) - 1)
    distances, neighbours = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(x)
    # UMAP warns that without a search index it cannot transform new points: not needed here
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"precomputed_knn\[2\]", category=UserWarning)
        return umap.UMAP(
            n_neighbors=k, random_state=seed, n_jobs=1, precomputed_knn=(neighbours, distances, None)
        ).fit_transform(x), "UMAP"


def best_final_runs(sweep: Sweep) -> pd.DataFrame:
    """Per loss, the final run with the highest validation MAP@R (test data plays no part in the choice)."""
    finals = sweep.role("final")
    key = "metrics.val/best_map_at_r"
    order = finals.sort_values(key, ascending=False) if key in finals else finals
    return order.groupby("loss", sort=False).head(1).set_index("loss")


def load_test_embeddings(sweep: Sweep, notes: list[str]) -> dict[str, dict]:
    """``{loss: arrays}`` of each loss's best final run; losses without the artifact get a note."""
    found = {}
    best = best_final_runs(sweep)
    for loss in sweep.losses:
        if loss not in best.index:
            notes.append(f"{loss}: no finished final run, so no embedding panels")
            continue
        arrays = load_embeddings(sweep, best.loc[loss, "run_id"])
        if arrays is None:
            notes.append(
                f"{loss}: run {best.loc[loss, 'run_id']} has no embeddings/test.npz, embedding panels skipped"
            )
        else:
            found[loss] = arrays
    return found


def _grid(n: int, cols: int = 4, size: tuple[float, float] = (3.6, 3.4)):
    cols = min(cols, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(size[0] * cols + 1.2, size[1] * rows + 0.8), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return fig, list(axes.flat)


def projection_figure(
    embeddings: dict[str, dict], colors: dict, points: int = PROJECTION_POINTS, seed: int = 0
) -> Figure:
    """One 2-D projection panel per loss, points coloured by test class."""
    fig, axes = _grid(len(embeddings))
    method = "t-SNE"
    for ax, (loss, arrays) in zip(axes, embeddings.items()):
        labels = np.asarray(arrays["labels"])
        keep = subsample(labels, points, seed)
        xy, method = project_2d(arrays["embeddings"][keep], seed)
        classes = np.unique(labels[keep])
        cmap = colormaps["tab20" if len(classes) > 10 else "tab10"]
        class_index = np.searchsorted(classes, labels[keep])
        ax.scatter(xy[:, 0], xy[:, 1], c=cmap(class_index % cmap.N), s=6, linewidths=0)
        ax.set_title(f"{loss} ({len(keep)} points, {len(classes)} classes)", color=colors[loss], fontsize=10)
        ax.set(xlabel=f"{method} 1 (a.u.)", ylabel=f"{method} 2 (a.u.)", xticks=[], yticks=[])
    fig.suptitle(f"Test embeddings of each loss's best final run, {method} projection, coloured by class")
    return fig


def distance_figure(
    embeddings: dict[str, dict], colors: dict, points: int = 2000, seed: int = 0
) -> tuple[Figure, dict]:
    """Positive/negative pair distance histograms per loss; also returns ``{loss: overlap area}``."""
    fig, axes = _grid(len(embeddings))
    overlaps = {}
    for ax, (loss, arrays) in zip(axes, embeddings.items()):
        labels = np.asarray(arrays["labels"])
        keep = subsample(labels, points, seed)
        pos, neg = pair_distances(arrays["embeddings"][keep], labels[keep])
        overlaps[loss] = overlap_area(pos, neg)
        edges = np.linspace(
            min(pos.min(initial=np.inf), neg.min(initial=np.inf)),
            max(pos.max(initial=-np.inf), neg.max(initial=-np.inf)),
            61,
        )
        ax.hist(
            neg, edges, density=True, histtype="stepfilled", color="0.55", alpha=0.55, label="negative pairs"
        )
        ax.hist(
            pos,
            edges,
            density=True,
            histtype="stepfilled",
            color=colors[loss],
            alpha=0.7,
            label="positive pairs (loss colour)",
        )
        ax.set_title(f"{loss}: overlap {overlaps[loss]:.3f}", color=colors[loss], fontsize=10)
        ax.set(xlabel="Euclidean distance (embedding units)", ylabel="density (1 / distance unit)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=2, fontsize=9)
    fig.suptitle(
        "Test pair distances of each loss's best final run (overlap: shared area of the two densities)"
    )
    return fig, overlaps


def triplet_quality_figure(sweep: Sweep, colors: dict) -> Figure:
    """Easy / semi-hard / hard test-triplet fractions (bars) and alignment vs uniformity (scatter)."""
    finals = sweep.role("final")
    losses = [loss for loss in sweep.losses if loss in set(finals["loss"])]
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    bars, scatter = fig.subplots(1, 2)
    bottom = np.zeros(len(losses))
    for (key, label), hatch in zip(TRIPLET_KINDS, ("", "///", "xxx")):
        column = f"metrics.test/{key}"
        values = np.array(
            [
                finals.loc[finals["loss"] == loss, column].mean() if column in finals else np.nan
                for loss in losses
            ]
        )
        values = np.nan_to_num(values)
        bars.bar(
            losses,
            values,
            bottom=bottom,
            color=[colors[loss] for loss in losses],
            hatch=hatch,
            edgecolor="black",
            linewidth=0.5,
        )
        bars.bar(0, 0, color="white", hatch=hatch, edgecolor="black", linewidth=0.5, label=label)
        bottom += values
    bars.set(
        title="Test triplets by difficulty (one reference geometry)",
        ylabel="fraction of triplets (mean over seeds)",
        xlabel="loss",
        ylim=(0, 1.18),
    )
    bars.tick_params(axis="x", rotation=30)
    bars.legend(loc="upper center", ncols=3, fontsize=8)
    if {"metrics.test/alignment", "metrics.test/uniformity"} <= set(finals.columns):
        for loss in losses:
            own = finals[finals["loss"] == loss]
            scatter.scatter(
                own["metrics.test/alignment"],
                own["metrics.test/uniformity"],
                color=colors[loss],
                label=loss,
                s=36,
                edgecolor="black",
                linewidth=0.4,
            )
        scatter.legend(fontsize=8, title="loss (one point per seed)", title_fontsize=8)
    else:
        scatter.text(
            0.5, 0.5, "no test/alignment or test/uniformity logged", ha="center", transform=scatter.transAxes
        )
    scatter.set(
        title="Alignment vs uniformity (lower is better on both)",
        xlabel="alignment: E ||f(x) - f(x+)||² over positive pairs",
        ylabel="uniformity: log E exp(-2 ||f(x) - f(y)||²)",
    )
    scatter.grid(alpha=0.3)
    fig.suptitle("Test triplet difficulty and embedding alignment / uniformity of the final runs")
    return fig
