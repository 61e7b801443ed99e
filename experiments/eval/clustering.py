"""k-means and normalised mutual information, in torch on the data's device.

NMI of a k-means clustering of the embeddings (k = number of classes) is the clustering metric
reported in the deep-metric-learning literature (e.g. Song et al. 2016, "Deep Metric Learning
via Lifted Structured Feature Embedding"; Musgrave et al. 2020 report it as ``NMI``).
pytorch-metric-learning clusters with faiss k-means (20 iterations); we run seeded k-means++
initialisation (Arthur & Vassilvitskii 2007) and Lloyd iterations until no assignment changes,
so the NMI values agree with theirs only approximately.
"""

from __future__ import annotations

import torch

from experiments.eval.inputs import auto_chunk_size


def _nearest_centre(x: torch.Tensor, centres: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Index of each row's nearest centre (squared euclidean), chunked over rows."""
    centre_norms = (centres * centres).sum(1)
    rows = auto_chunk_size(x.shape[0], centres.shape[0], chunk_size)
    out = torch.empty(x.shape[0], dtype=torch.int64, device=x.device)
    for start in range(0, x.shape[0], rows):
        block = x[start : start + rows]
        # argmin ||x - c||^2 = argmax (2 x.c - ||c||^2): the ||x||^2 term is constant per row
        out[start : start + rows] = torch.addmm(-centre_norms, block, centres.T, alpha=2).argmax(1)
    return out


def _kmeans_plus_plus(x: torch.Tensor, n_clusters: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding; random draws come from a CPU generator so seeds agree across devices."""
    n = x.shape[0]
    uniforms = torch.rand(n_clusters, generator=generator, dtype=torch.float64).to(x.device)
    first = int(torch.randint(n, (1,), generator=generator))
    centres = torch.empty(n_clusters, x.shape[1], dtype=x.dtype, device=x.device)
    centres[0] = x[first]
    closest = ((x - x[first]) ** 2).sum(1).to(torch.float64)
    for j in range(1, n_clusters):
        cumulative = closest.cumsum(0)
        # sample a row with probability proportional to its squared distance to the nearest centre
        pick = torch.searchsorted(cumulative, uniforms[j] * cumulative[-1], right=True).clamp_(max=n - 1)
        centres[j] = x[pick]
        closest = torch.minimum(closest, ((x - x[pick]) ** 2).sum(1).to(torch.float64))
    return centres


def kmeans(
    x: torch.Tensor, n_clusters: int, *, max_iter: int = 100, seed: int = 0, chunk_size: int | None = None
) -> torch.Tensor:
    """Cluster the rows of ``x`` into ``n_clusters``; returns an int64 (n,) assignment.

    k-means++ seeding then Lloyd iterations, stopping when no assignment changes or after
    ``max_iter`` iterations; an emptied cluster keeps its previous centre.
    """
    if not 1 <= n_clusters <= x.shape[0]:
        raise ValueError(
            f"n_clusters must be between 1 and the number of rows ({x.shape[0]}), got {n_clusters}"
        )
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    generator = torch.Generator().manual_seed(seed)
    centres = _kmeans_plus_plus(x, n_clusters, generator)
    assignment = _nearest_centre(x, centres, chunk_size)
    for _ in range(max_iter):
        sums = torch.zeros_like(centres).index_add_(0, assignment, x)
        counts = torch.bincount(assignment, minlength=n_clusters)
        filled = counts > 0
        centres = torch.where(filled[:, None], sums / counts.clamp_min(1)[:, None].to(x.dtype), centres)
        new_assignment = _nearest_centre(x, centres, chunk_size)
        if torch.equal(new_assignment, assignment):
            break
        assignment = new_assignment
    return assignment


def _entropy(counts: torch.Tensor, total: int) -> torch.Tensor:
    p = counts[counts > 0].to(torch.float64) / total
    return -(p * p.log()).sum()


def normalized_mutual_info(labels_true: torch.Tensor, labels_pred: torch.Tensor) -> float:
    """NMI with the arithmetic-mean normaliser: ``MI / ((H(true) + H(pred)) / 2)``.

    Same definition and edge cases as scikit-learn's ``normalized_mutual_info_score``
    (1.0 when both labelings have a single cluster).
    """
    if labels_true.shape != labels_pred.shape or labels_true.ndim != 1:
        raise ValueError(
            f"labelings must be 1-D and of equal length, got shapes "
            f"{tuple(labels_true.shape)} and {tuple(labels_pred.shape)}"
        )
    true_ids = torch.unique(labels_true, return_inverse=True)[1]
    pred_ids = torch.unique(labels_pred, return_inverse=True)[1]
    n_true, n_pred = int(true_ids.max()) + 1, int(pred_ids.max()) + 1
    if n_true == n_pred == 1:
        return 1.0
    total = labels_true.shape[0]
    joint = torch.bincount(true_ids * n_pred + pred_ids, minlength=n_true * n_pred)
    joint = joint.reshape(n_true, n_pred).to(torch.float64)
    row, col = joint.sum(1), joint.sum(0)
    nonzero = joint > 0
    p_joint = joint[nonzero] / total
    outer = (row[:, None] * col[None, :])[nonzero] / (total * total)
    mutual_info = (p_joint * (p_joint.log() - outer.log())).sum().clamp_min(0)
    normaliser = ((_entropy(row, total) + _entropy(col, total)) / 2).clamp_min(torch.finfo(torch.float64).eps)
    return float(mutual_info / normaliser)
