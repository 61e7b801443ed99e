"""Batch-hard and batch-all triplet losses (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss
for Person Re-Identification", 2017)."""

from __future__ import annotations

import torch

from .base import MetricLoss
from .distances import check_distance, distance_matrix, paired_distances, prepare_embeddings
from .mining import hardest_pairs, label_masks
from .params import distance_params, margin_param
from .registry import register_loss
from .triplet import TripletLoss, reduction_param, soft_margin_param
from .triplet_terms import check_reduction, finish_stats, hinge, reduce_terms, triplet_stats

HERMANS = (
    "Hermans et al. 2017, In Defense of the Triplet Loss (PK batches e.g. P=32, K=4; euclidean, "
    "not squared; soft margin softplus(d_ap - d_an) preferred over a hinge)"
)


@register_loss("batch_hard")
class BatchHardLoss(MetricLoss):
    """Batch-hard triplet loss: per anchor, its farthest positive and nearest negative in the batch.

    ``max(max_p d(a,p) - min_n d(a,n) + m, 0)`` per anchor with at least one positive and one
    negative; ``soft_margin`` uses ``softplus(... + m)`` (Hermans' soft margin is ``m = 0``).
    Mining runs on a detached distance matrix; only the 2n chosen pairs are recomputed with
    gradients. Reduction: ``mean`` over the valid anchors (the paper's average), or
    ``mean_nonzero`` over the non-zero terms, which equals PML's ``TripletMarginLoss`` with a
    ``BatchHardMiner`` (``AvgNonZeroReducer``). Defaults: m = 0.2, euclidean, not normalised.
    """

    paper = HERMANS
    hyperparams = (margin_param(), *distance_params(), soft_margin_param(), reduction_param())

    def __init__(
        self,
        margin: float = 0.2,
        distance: str = "euclidean",
        normalize: bool = False,
        soft_margin: bool = False,
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_distance(distance)
        check_reduction(reduction)
        self.margin, self.distance, self.normalize = margin, distance, normalize
        self.soft_margin, self.reduction = soft_margin, reduction

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        x = prepare_embeddings(embeddings, self.distance, self.normalize)
        y = x if ref_embeddings is None else prepare_embeddings(ref_embeddings, self.distance, self.normalize)
        with torch.no_grad():
            distances = distance_matrix(x, None if ref_embeddings is None else y, self.distance)
            positive, negative, valid = hardest_pairs(distances, *label_masks(labels, ref_labels))
        d_ap = paired_distances(x, y[positive], self.distance)  # the hardest positive of each anchor
        d_an = paired_distances(x, y[negative], self.distance)  # the hardest negative of each anchor
        term, _ = hinge(d_ap - d_an + self.margin, self.soft_margin)
        term = torch.where(valid, term, 0)
        with torch.no_grad():
            sums = triplet_stats(d_ap, d_an, self.margin, term, valid)
        self.record_stats(**finish_stats(sums))
        return term.sum() / reduce_terms(term, sums, self.reduction)


@register_loss("batch_all")
class BatchAllLoss(TripletLoss):
    """Batch-all triplet loss: every valid triplet of the batch (Hermans et al.'s BA and BA≠0).

    ``reduction="mean"`` is BA (mean over all valid triplets); ``"mean_nonzero"`` is BA≠0, which
    equals PML's ``TripletMarginLoss`` without a miner. The triplet loss with ``mining="all"``.
    Defaults: m = 0.2, euclidean, not normalised, BA≠0.
    """

    paper = HERMANS
    hyperparams = (margin_param(), *distance_params(), soft_margin_param(), reduction_param())

    def __init__(
        self,
        margin: float = 0.2,
        distance: str = "euclidean",
        normalize: bool = False,
        soft_margin: bool = False,
        reduction: str = "mean_nonzero",
    ) -> None:
        super().__init__(
            margin=margin,
            distance=distance,
            normalize=normalize,
            mining="all",
            reduction=reduction,
            soft_margin=soft_margin,
        )
