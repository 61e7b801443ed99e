"""The classic triplet loss with mining (all, hard, semi-hard, easy, curriculum) and a functional form.

Weinberger & Saul (JMLR 2009), Schroff et al. (FaceNet, CVPR 2015):
``l(a, p, n) = max(d(a,p) - d(a,n) + m, 0)``.
"""
from __future__ import annotations

import torch

from .base import MetricLoss
from .distances import (check_distance, column_distance_gradients, distance_matrix, distance_sum_gradients,
                        paired_distances, prepare_embeddings, self_distance_sum_gradient, with_gradients)
from .mining import TRIPLET_MINING, PositiveSlots, margin_selection, negative_mask, positive_slots
from .params import HyperParam, distance_params, margin_param
from .registry import register_loss
from .triplet_terms import (REDUCTIONS, DenseTriplets, PairTriplets, dense_triplet_loss, hinge,
                            threshold_triplet_loss)
from .workspace import Workspace


def reduction_param(default: str = "mean_nonzero") -> HyperParam:
    return HyperParam("reduction", str, default,
                      "mean_nonzero: mean over non-zero terms (PML AvgNonZeroReducer); mean: over all used triplets",
                      choices=REDUCTIONS, search=None)


def soft_margin_param() -> HyperParam:
    return HyperParam("soft_margin", bool, False, "softplus(d_ap - d_an + m) instead of the hinge",
                      search=(False, True))


class HardnessCurriculum:
    """A seeded curriculum from easy toward hard triplets.

    At training progress ``t`` in [0, 1] (``set_progress``) the hard fraction is
    ``h(t) = start + (end - start) * t``. Each call draws one uniform number per (anchor, negative)
    pair from a generator seeded with ``seed`` (advanced once per call); a hard triplet
    (``d(a,n) <= d(a,p)``) is used when its pair's draw is below ``h(t)``. Easy and semi-hard
    triplets are always used. Deterministic given ``seed``, the progress and the call sequence on one
    device type.
    """

    def __init__(self, start: float, end: float, seed: int) -> None:
        self.start, self.end, self.seed = start, end, seed
        self.progress = 0.0
        self._generator: torch.Generator | None = None

    def hard_fraction(self) -> float:
        return self.start + (self.end - self.start) * self.progress

    def admitted(self, n: int, m: int, device: torch.device) -> torch.Tensor:
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(n, m, generator=self._generator, device=device) < self.hard_fraction()


@register_loss("triplet")
class TripletLoss(MetricLoss):
    """Triplet margin loss ``max(d(a,p) - d(a,n) + m, 0)`` over every mined triplet of the batch.

    Mining (pytorch-metric-learning ``TripletMarginMiner`` semantics, margin = the loss margin;
    ``t = d(a,n) - d(a,p)``): ``all`` valid triplets, ``hard`` (``t <= 0``), ``semi-hard``
    (``0 < t <= m``), ``easy`` (``t > m``; zero under the hinge, useful with ``soft_margin``), or
    ``curriculum`` (:class:`HardnessCurriculum`). ``soft_margin`` replaces the hinge by
    ``softplus(d(a,p) - d(a,n) + m)`` (PML's ``smooth_loss``); ``swap`` uses
    ``min(d(a,n), d(p,n))`` as in PML (mining still uses ``d(a,n)``).

    Reduction: ``mean_nonzero`` averages over the non-zero terms, exactly PML's
    ``TripletMarginLoss`` with its default ``AvgNonZeroReducer``; ``mean`` averages over all mined
    triplets (PML with a ``MeanReducer``; for ``all`` that is every valid triplet, whereas PML's
    ``TripletMarginMiner("all")`` keeps only margin violators). With reference embeddings,
    anchors come from ``embeddings`` and positives/negatives from the references, as in PML.
    Memory is O(n * m), O(n * k * m) for k positives per anchor with ``soft_margin`` or ``swap``; the
    gradient is computed in closed form.
    """

    paper = "Schroff et al., FaceNet, CVPR 2015 (m = 0.2, squared euclidean on L2-normalised embeddings)"
    hyperparams = (
        margin_param(0.2),
        *distance_params("euclidean", normalize=True),
        HyperParam("mining", str, "all", "which triplets count", choices=TRIPLET_MINING,
                   search=("all", "hard", "semi-hard", "curriculum")),
        reduction_param("mean_nonzero"),
        soft_margin_param(),
        HyperParam("swap", bool, False, "use min(d(a,n), d(p,n)) (distance swap)", search=(False, True)),
        HyperParam("curriculum_start", float, 0.0, "curriculum: hard fraction at the start", low=0.0, high=1.0,
                   search=None),
        HyperParam("curriculum_end", float, 1.0, "curriculum: hard fraction at the end", low=0.0, high=1.0,
                   search=None),
        HyperParam("seed", int, 0, "curriculum: seed of the hard-triplet draws", search=None),
    )

    def __init__(self, margin: float = 0.2, distance: str = "euclidean", normalize: bool = True, mining: str = "all",
                 reduction: str = "mean_nonzero", soft_margin: bool = False, swap: bool = False,
                 curriculum_start: float = 0.0, curriculum_end: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        check_distance(distance)
        if mining not in TRIPLET_MINING:
            raise ValueError(f"unknown mining {mining!r}; choose one of {', '.join(TRIPLET_MINING)}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
        self.margin, self.distance, self.normalize = margin, distance, normalize
        self.mining, self.reduction, self.soft_margin, self.swap = mining, reduction, soft_margin, swap
        self.curriculum = HardnessCurriculum(curriculum_start, curriculum_end, seed)
        self.workspace = Workspace()

    def set_progress(self, fraction: float) -> None:
        self.curriculum.progress = min(max(float(fraction), 0.0), 1.0)

    def weigh(self, distances: torch.Tensor, slots: PositiveSlots, negatives: torch.Tensor,
              swap_distances: torch.Tensor | None) -> DenseTriplets | PairTriplets:
        """Loss value, gradient weights and statistics from the detached distances."""
        admitted = self.curriculum.admitted(*distances.shape, distances.device) if self.mining == "curriculum" else None
        if self.soft_margin or swap_distances is not None:
            return dense_triplet_loss(distances, slots, negatives, self.margin,
                                      margin_selection(self.mining, self.margin, admitted), self.soft_margin,
                                      self.reduction, swap_distances)
        return threshold_triplet_loss(distances, slots, negatives, self.margin, self.mining, self.reduction,
                                      admitted, self.workspace)

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        x = prepare_embeddings(embeddings, self.distance, self.normalize)
        y = x if ref_embeddings is None else prepare_embeddings(ref_embeddings, self.distance, self.normalize)
        with torch.no_grad():
            distances = distance_matrix(x, None if ref_embeddings is None else y, self.distance)
            slots, negatives = positive_slots(labels, ref_labels), negative_mask(labels, ref_labels)
            swap_distances = None
            if self.swap:
                swap_distances = distances if ref_embeddings is None else distance_matrix(y, None, self.distance)
        result = self.weigh(distances, slots, negatives, swap_distances)
        self.record_stats(**result.stats)
        if isinstance(result, PairTriplets):
            grad_x, grad_y = column_distance_gradients(x, y, result.columns, result.weights, result.distances,
                                                       self.distance)
            return with_gradients(result.value, [(x, grad_x), (y, grad_y)])
        weights = result.weights
        if ref_embeddings is None:
            if result.swap_weights is not None:
                weights = weights + result.swap_weights
            grad = self_distance_sum_gradient(x, weights, self.distance, distances)
            return with_gradients(result.value, [(x, grad)])
        grad_x, grad_y = distance_sum_gradients(x, y, weights, self.distance, distances)
        pairs = [(x, grad_x), (y, grad_y)]
        if result.swap_weights is not None:
            grad_p, grad_n = distance_sum_gradients(y, y, result.swap_weights, self.distance, swap_distances)
            pairs += [(y, grad_p), (y, grad_n)]
        return with_gradients(result.value, pairs)


def triplet_margin(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.2,
                   distance: str = "euclidean", normalize: bool = False, soft_margin: bool = False,
                   swap: bool = False, reduction: str = "mean") -> torch.Tensor:
    """Triplet loss of explicit (N, d) anchor, positive and negative rows (differentiable by autograd).

    ``reduction`` is ``mean`` over the N triplets, ``mean_nonzero`` over the non-zero terms, or
    ``none`` for the (N,) terms.
    """
    if not (anchor.dim() == 2 and anchor.shape == positive.shape == negative.shape):
        raise ValueError(f"anchor, positive and negative must be (N, d) tensors of one shape, got "
                         f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}")
    check_distance(distance)
    a, p, n = (prepare_embeddings(t, distance, normalize) for t in (anchor, positive, negative))
    d_an = paired_distances(a, n, distance)
    if swap:
        d_an = torch.minimum(d_an, paired_distances(p, n, distance))
    term, _ = hinge(paired_distances(a, p, distance) - d_an + margin, soft_margin)
    if reduction == "none":
        return term
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)} or 'none'")
    denominator = (term > 0).sum() if reduction == "mean_nonzero" else torch.tensor(term.numel())
    return term.sum() / denominator.clamp_min(1).to(term.dtype)
