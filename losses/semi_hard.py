"""FaceNet's semi-hard triplet loss (Schroff, Kalenichenko & Philbin, CVPR 2015)."""
from __future__ import annotations

import torch

from .mining import PositiveSlots
from .params import HyperParam, distance_params, margin_param
from .registry import register_loss
from .triplet import TripletLoss, reduction_param
from .triplet_terms import PairTriplets, nearest_farther_triplet_loss


@register_loss("semi_hard")
class SemiHardLoss(TripletLoss):
    """Semi-hard triplet loss: every (anchor, positive) pair with one negative chosen FaceNet-style.

    The negative is the nearest one farther than the positive (``d(a,n) > d(a,p)``): semi-hard when
    inside the margin, otherwise easy with a zero term. When no negative is farther, ``fallback``
    ``easiest`` takes the farthest negative, as TensorFlow Addons' ``triplet_semihard_loss`` does;
    ``skip`` drops the pair. Reduction ``mean`` averages over the used (anchor, positive) pairs
    (TF-Addons' reduction); ``mean_nonzero`` over the non-zero terms. PML has no per-pair
    equivalent: its ``TripletMarginMiner("semihard")`` keeps *every* semi-hard triplet (our
    ``triplet`` loss with ``mining="semi-hard"``).
    """

    paper = ("Schroff et al., FaceNet, CVPR 2015 (alpha = 0.2, squared euclidean on L2-normalised "
             "embeddings, large batches of ~40 faces per identity)")
    hyperparams = (
        margin_param(0.2),
        *distance_params("squared_euclidean", normalize=True),
        HyperParam("fallback", str, "easiest", "negative for pairs with no farther negative",
                   choices=("easiest", "skip"), search=None),
        reduction_param("mean"),
    )

    def __init__(self, margin: float = 0.2, distance: str = "squared_euclidean", normalize: bool = True,
                 fallback: str = "easiest", reduction: str = "mean") -> None:
        super().__init__(margin=margin, distance=distance, normalize=normalize, reduction=reduction)
        if fallback not in ("easiest", "skip"):
            raise ValueError(f"unknown fallback {fallback!r}; choose 'easiest' or 'skip'")
        self.fallback = fallback

    def weigh(self, distances: torch.Tensor, slots: PositiveSlots, negatives: torch.Tensor,
              swap_distances: torch.Tensor | None) -> PairTriplets:
        return nearest_farther_triplet_loss(distances, slots, negatives, self.margin, self.fallback,
                                            self.reduction, self.workspace)
