"""Cross-modal sweeps: the image-text recall table and a joint projection of both modalities.

Reads the ``test/image_to_text_*`` and ``test/text_to_image_*`` metrics of the final runs and the
``ref_embeddings`` (text) beside ``embeddings`` (images) in their ``embeddings/test.npz``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .embeddings import _grid, project_2d, subsample
from .load import Sweep

DIRECTIONS = (("image_to_text", "image→text"), ("text_to_image", "text→image"))
RECALL_KS = (1, 5, 10)


def recall_table(sweep: Sweep) -> pd.DataFrame:
    """Per loss, the mean over final seeds of Recall@{1,5,10} (in %) and median rank, both directions;
    empty when the sweep has no cross-modal runs."""
    finals = sweep.role("final")
    rows = {}
    for loss, runs in finals.groupby("loss", sort=False):
        row = {}
        for key, label in DIRECTIONS:
            for k in RECALL_KS:
                column = f"metrics.test/{key}_recall_at_{k}"
                if column in runs and runs[column].notna().any():
                    row[f"{label} R@{k} (%)"] = round(100 * runs[column].mean(), 1)
            column = f"metrics.test/{key}_median_rank"
            if column in runs and runs[column].notna().any():
                row[f"{label} median rank"] = runs[column].mean()
        if row:
            chance = runs.get("metrics.test/image_to_text_chance_recall_at_1")
            if chance is not None:
                row["chance R@1 (%)"] = round(100 * chance.mean(), 2)
            rows[loss] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.index.name = "loss"
    return table


def joint_projection_figure(
    embeddings: dict[str, dict], colors: dict, points: int, seed: int = 0
) -> Figure | None:
    """Per loss, images (circles) and captions (triangles) projected together, coloured by class;
    ``None`` when no run logged text embeddings."""
    paired = {loss: a for loss, a in embeddings.items() if "ref_embeddings" in a}
    if not paired:
        return None
    fig, axes = _grid(len(paired))
    method = "t-SNE"
    for ax, (loss, arrays) in zip(axes, paired.items()):
        labels = np.asarray(arrays["labels"])
        keep = subsample(labels, max(2, points // 2), seed)
        both = np.concatenate([arrays["embeddings"][keep], arrays["ref_embeddings"][keep]])
        xy, method = project_2d(both, seed)
        classes = np.unique(labels[keep])
        cmap = colormaps["tab20" if len(classes) > 10 else "tab10"]
        color = cmap(np.searchsorted(classes, labels[keep]) % cmap.N)
        n = len(keep)
        ax.scatter(xy[:n, 0], xy[:n, 1], c=color, s=10, marker="o", linewidths=0)
        ax.scatter(xy[n:, 0], xy[n:, 1], c=color, s=14, marker="^", linewidths=0)
        ax.set_title(f"{loss} ({n} pairs)", color=colors[loss], fontsize=10)
        ax.set(xlabel=f"{method} 1 (a.u.)", ylabel=f"{method} 2 (a.u.)", xticks=[], yticks=[])
        ax.legend(
            handles=[
                Line2D([], [], marker=m, color="0.35", linestyle="", label=name)
                for m, name in (("o", "image"), ("^", "text"))
            ],
            loc="best",
            fontsize=8,
        )
    fig.suptitle(f"Images (o) and captions (^) in the shared space, {method} projection, coloured by class")
    return fig
