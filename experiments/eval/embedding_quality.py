"""How an embedding space is shaped: alignment, uniformity, class distances and triplet difficulty.

- Alignment and uniformity (Wang & Isola 2020, "Understanding Contrastive Representation
  Learning through Alignment and Uniformity on the Hypersphere"), on L2-normalised embeddings:
  alignment = E_{positive pairs} ||f(x) - f(y)||^alpha (alpha = 2; lower is better),
  uniformity = log E_{all pairs} exp(-t ||f(x) - f(y)||^2) (t = 2; lower is better).
- Mean intra-class and inter-class distance under the chosen distance.
- The share of the test set's triplets (a, p, n) that are hard (d_an < d_ap), semi-hard
  (d_ap <= d_an < d_ap + margin) or easy (d_an >= d_ap + margin), as named by Schroff et al. 2015
  (FaceNet), by the losses' own table (:mod:`losses.mining`, ties included). The three classes
  partition all triplets; easy ones are exactly those a triplet hinge loss with this margin ignores.
  Counted without listing triplets: per (anchor, positive) pair, a binary search among the
  anchor's sorted negative distances.

A run's :func:`embedding_quality` measures distances and difficulty in one reference geometry for
every loss (:data:`DIFFICULTY_REFERENCE`), whatever distance and margin the loss trains with, so the
numbers of different losses compare.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from experiments.eval.inputs import as_embeddings, as_labels, auto_chunk_size
from losses.distances import pairwise_distances
from losses.mining import difficulty_counts
from losses.params import DISTANCES

FACENET_MARGIN = 0.2
REFERENCE_DISTANCE = "squared_euclidean"
DIFFICULTY_REFERENCE = (
    "squared euclidean distance between L2-normalised embeddings, margin 0.2 "
    "(FaceNet's, Schroff et al. 2015), the same for every loss"
)


def _class_ids(labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    _, ids = torch.unique(labels, return_inverse=True)
    return ids, int(ids.max()) + 1


def alignment_uniformity(
    embeddings, labels, *, alpha: float = 2.0, t: float = 2.0, chunk_size: int | None = None
) -> tuple[float, float]:
    """(alignment, uniformity) of the L2-normalised embeddings; pairs are (i, j) with i != j."""
    x = F.normalize(as_embeddings(embeddings), dim=1)
    ids, _ = _class_ids(as_labels(labels, x.shape[0], x.device))
    n = x.shape[0]
    if n < 2:
        raise ValueError("alignment and uniformity need at least two embeddings")
    rows = auto_chunk_size(n, n, chunk_size)
    log_sum = torch.tensor(-math.inf, dtype=torch.float64, device=x.device)
    positive_sum = torch.zeros((), dtype=torch.float64, device=x.device)
    positive_count = torch.zeros((), dtype=torch.int64, device=x.device)
    columns = torch.arange(n, device=x.device)
    for start in range(0, n, rows):
        squared = pairwise_distances(x[start : start + rows], x, kind="squared_euclidean")
        not_self = columns[None, :] != columns[start : start + rows, None]
        exponent = torch.where(not_self, -t * squared, torch.full_like(squared, -math.inf))
        log_sum = torch.logaddexp(log_sum, torch.logsumexp(exponent.flatten(), 0).to(torch.float64))
        positive = not_self & (ids[start : start + rows, None] == ids[None, :])
        positive_sum += (squared.clamp_min(0) ** (alpha / 2))[positive].sum(dtype=torch.float64)
        positive_count += positive.sum()
    if int(positive_count) == 0:
        raise ValueError("alignment needs a positive pair: at least one class with two or more embeddings")
    uniformity = float(log_sum - math.log(n * (n - 1)))
    return float(positive_sum / positive_count), uniformity


def triplet_statistics(
    embeddings,
    labels,
    *,
    margin: float = FACENET_MARGIN,
    distance: str = "euclidean",
    chunk_size: int | None = None,
) -> dict[str, float]:
    """Mean intra-/inter-class distance and the easy / semi-hard / hard shares of all triplets."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    if not (isinstance(margin, (int, float)) and math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    x = as_embeddings(embeddings)
    ids, n_classes = _class_ids(as_labels(labels, x.shape[0], x.device))
    class_sizes = torch.bincount(ids, minlength=n_classes)
    if n_classes < 2 or int(class_sizes.max()) < 2:
        raise ValueError("triplets need two classes and at least one class with two or more embeddings")
    order = torch.argsort(ids, stable=True)
    bounds = [0, *class_sizes.cumsum(0).tolist()]
    # sums: intra distance, positive pairs, inter distance, negative pairs, hard, semi-hard, easy
    sums = torch.zeros(7, dtype=torch.float64, device=x.device)
    for c in range(n_classes):
        members = order[bounds[c] : bounds[c + 1]]  # a class of one anchors no triplet but has negatives
        negatives = torch.nonzero(ids != c).flatten()
        rows = auto_chunk_size(members.numel(), x.shape[0], chunk_size)
        for start in range(0, members.numel(), rows):
            anchors = members[start : start + rows]
            sums += _anchor_block_sums(x, anchors, members, negatives, margin, distance, start)
    intra, n_pos, inter, n_neg, hard, semi_hard, easy = sums.tolist()
    total = hard + semi_hard + easy
    return {
        "intra_class_distance": intra / n_pos,
        "inter_class_distance": inter / n_neg,
        "easy_fraction": easy / total,
        "semi_hard_fraction": semi_hard / total,
        "hard_fraction": hard / total,
    }


def _anchor_block_sums(x, anchors, members, negatives, margin, distance, first_anchor_position):
    """Sums over the triplets whose anchors are ``anchors`` (all of one class, ``members``)."""
    d_pos = pairwise_distances(x[anchors], x[members], kind=distance)
    d_neg = pairwise_distances(x[anchors], x[negatives], kind=distance)
    d_neg_sorted = torch.sort(d_neg, dim=1).values
    positions = torch.arange(members.numel(), device=x.device)
    not_self = (
        positions[None, :]
        != (first_anchor_position + torch.arange(anchors.numel(), device=x.device))[:, None]
    )
    # per (a, p), its negatives by difficulty: the losses' own table (losses.mining), ties included
    hard, semi_hard, easy = (
        (count * not_self).sum() for count in difficulty_counts(d_pos, d_neg_sorted, margin)
    )
    n_neg = negatives.numel()
    n_pairs = not_self.sum()
    return torch.stack(
        [
            (d_pos * not_self).sum(dtype=torch.float64),
            n_pairs.to(torch.float64),
            d_neg.sum(dtype=torch.float64),
            torch.tensor(float(anchors.numel() * n_neg), device=x.device, dtype=torch.float64),
            hard.to(torch.float64),
            semi_hard.to(torch.float64),
            easy.to(torch.float64),
        ]
    )


def reference_triplet_statistics(embeddings, labels, *, chunk_size: int | None = None) -> dict[str, float]:
    """:func:`triplet_statistics` in the reference geometry (:data:`DIFFICULTY_REFERENCE`)."""
    unit = F.normalize(as_embeddings(embeddings), dim=1)
    return triplet_statistics(
        unit, labels, margin=FACENET_MARGIN, distance=REFERENCE_DISTANCE, chunk_size=chunk_size
    )


def embedding_quality(embeddings, labels, *, chunk_size: int | None = None) -> dict[str, float]:
    """``alignment``, ``uniformity`` and the :func:`reference_triplet_statistics` of a labelled set."""
    alignment, uniformity = alignment_uniformity(embeddings, labels, chunk_size=chunk_size)
    return {
        "alignment": alignment,
        "uniformity": uniformity,
        **reference_triplet_statistics(embeddings, labels, chunk_size=chunk_size),
    }
