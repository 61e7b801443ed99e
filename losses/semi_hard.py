"""FaceNet's semi-hard triplet loss (Schroff, Kalenichenko & Philbin, CVPR 2015)."""

from __future__ import annotations

import torch

from ._kernels import triplet as kernel
from ._kernels.workspace import Workspace
from .base import MetricLoss
from .distances import check_distance, distance_matrix, prepare_embeddings
from .mining import label_masks, triplet_difficulty
from .params import HyperParam, distance_params, margin_param
from .registry import register_loss
from .triplet import reduction_param
from .triplet_terms import check_reduction, finish_stats, hinge, reduce_terms, triplet_stats

FALLBACKS = ("easiest", "skip")


@register_loss("semi_hard")
class SemiHardLoss(MetricLoss):
    """Semi-hard triplet loss: every (anchor, positive) pair with one negative chosen FaceNet-style.

    The negative is the nearest one that is not hard (``d(a,n) >= d(a,p)``, see
    :mod:`losses.mining`): semi-hard when inside the margin, otherwise easy with a zero term. When
    every negative is hard, ``fallback`` ``easiest`` takes the farthest negative, as TensorFlow
    Addons' ``triplet_semihard_loss`` does; ``skip`` drops the pair. Reduction ``mean`` averages over
    the used (anchor, positive) pairs (TF-Addons' reduction); ``mean_nonzero`` over the non-zero
    terms. PML has no per-pair equivalent: its ``TripletMarginMiner("semihard")`` keeps *every*
    semi-hard triplet (our ``triplet`` loss with ``mining="semi-hard-triplets"``). Defaults: FaceNet's
    alpha = 0.2, squared euclidean on L2-normalised embeddings.

    ``compute`` runs the fused kernel (:mod:`losses._kernels.triplet`, O(n * k) memory besides
    blocks of anchors); ``fused = False`` runs the formula as written below, its test oracle.
    """

    paper = (
        "Schroff et al., FaceNet, CVPR 2015 (alpha = 0.2, squared euclidean on L2-normalised "
        "embeddings, large batches of ~40 faces per identity)"
    )
    hyperparams = (
        margin_param(),
        *distance_params(),
        HyperParam(
            "fallback",
            str,
            doc="negative for pairs whose negatives are all hard",
            choices=FALLBACKS,
            search=None,
        ),
        reduction_param(),
    )
    fused = True

    def __init__(
        self,
        margin: float = 0.2,
        distance: str = "squared_euclidean",
        normalize: bool = True,
        fallback: str = "easiest",
        reduction: str = "mean",
    ) -> None:
        super().__init__()
        check_distance(distance)
        check_reduction(reduction)
        if fallback not in FALLBACKS:
            raise ValueError(f"unknown fallback {fallback!r}; choose 'easiest' or 'skip'")
        self.margin, self.distance, self.normalize = margin, distance, normalize
        self.fallback, self.reduction = fallback, reduction
        self.workspace = Workspace()

    def prepare(self, embeddings: torch.Tensor | None) -> torch.Tensor | None:
        return None if embeddings is None else prepare_embeddings(embeddings, self.distance, self.normalize)

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        x, y = self.prepare(embeddings), self.prepare(ref_embeddings)  # y = None: the batch itself
        if self.fused:
            value, stats = kernel.semi_hard_loss(
                x,
                y,
                labels,
                ref_labels,
                margin=self.margin,
                distance=self.distance,
                fallback=self.fallback,
                reduction=self.reduction,
                workspace=self.workspace,
            )
            self.record_stats(**stats)
            return value
        d = distance_matrix(x, y, self.distance)  # (n, m): anchors x candidates
        positive, negative = label_masks(labels, ref_labels)
        with torch.no_grad():  # FaceNet's negative of each (a, p): the nearest one that is not hard
            hard, _, _ = triplet_difficulty(d.unsqueeze(2), d.unsqueeze(1), self.margin)  # (n, m, m)
            candidate = negative.unsqueeze(1) & ~hard
            nearest_d, nearest = torch.where(candidate, d.unsqueeze(1), float("inf")).min(2)  # (n, m)
            easiest_d, easiest = torch.where(negative, d, float("-inf")).max(1, keepdim=True)  # (n, 1)
            has_candidate = torch.isfinite(nearest_d)
            chosen = torch.where(has_candidate, nearest, easiest)
            fallback = easiest_d.isfinite() if self.fallback == "easiest" else torch.zeros_like(has_candidate)
            used = positive & (has_candidate | fallback)
        d_ap, d_an = d, d.gather(1, chosen)  # (n, m): each pair (a, p) and its negative
        term, _ = hinge(d_ap - d_an + self.margin, False)
        term = torch.where(used, term, 0)
        with torch.no_grad():
            sums = triplet_stats(d_ap, d_an, self.margin, term, used)
        self.record_stats(**finish_stats(sums))
        return term.sum() / reduce_terms(term, sums, self.reduction)
