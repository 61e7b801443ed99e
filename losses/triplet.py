"""The classic triplet loss with mining (all, hard, semi-hard, easy, curriculum) and a functional form.

Weinberger & Saul (JMLR 2009), Schroff et al. (FaceNet, CVPR 2015):
``l(a, p, n) = max(d(a,p) - d(a,n) + m, 0)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .base import MetricLoss
from .distances import (check_distance, distance_matrix, distance_sum_gradients, paired_distances,
                        prepare_embeddings, with_gradients)
from .mining import (TRIPLET_MINING, Selection, label_masks, margin_selection, positive_slots,
                     slot_chunks)
from .params import HyperParam, distance_params, margin_param
from .registry import register_loss

REDUCTIONS = ("mean_nonzero", "mean")


def reduction_param(default: str = "mean_nonzero") -> HyperParam:
    return HyperParam("reduction", str, default,
                      "mean_nonzero: mean over non-zero terms (PML AvgNonZeroReducer); mean: over all used triplets",
                      choices=REDUCTIONS, search=None)


def soft_margin_param() -> HyperParam:
    return HyperParam("soft_margin", bool, False, "softplus(d_ap - d_an + m) instead of the hinge",
                      search=(False, True))


def hinge(violation: torch.Tensor, soft_margin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss term, its derivative) of the hinge ``max(v, 0)`` or the soft margin ``softplus(v)``."""
    if soft_margin:
        return F.softplus(violation), torch.sigmoid(violation)
    return violation.clamp_min(0), (violation > 0).to(violation.dtype)


def triplet_stats(d_ap, d_an, violation, term, used) -> dict[str, torch.Tensor]:
    """The five ``STAT_NAMES`` summed over ``used`` triplets (counts and sums, not yet averaged)."""
    return {
        "count": used.sum(),
        "active": (used & (term > 0)).sum(),
        "correct_order": (used & (d_ap < d_an)).sum(),
        "margin_violation": (used & (violation > 0)).sum(),
        "d_ap": torch.where(used, d_ap, 0).sum(),
        "d_an": torch.where(used, d_an, 0).sum(),
    }


def finish_stats(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    count = sums["count"].clamp_min(1).to(sums["d_ap"].dtype)
    return {
        "active_fraction": sums["active"] / count,
        "correct_order_fraction": sums["correct_order"] / count,
        "margin_violation_fraction": sums["margin_violation"] / count,
        "mean_d_ap": sums["d_ap"] / count,
        "mean_d_an": sums["d_an"] / count,
    }


def reduce_terms(total: torch.Tensor, sums: dict[str, torch.Tensor], reduction: str) -> torch.Tensor:
    """The divisor of the summed terms: number of non-zero terms or of used triplets (at least 1)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    denominator = sums["active"] if reduction == "mean_nonzero" else sums["count"]
    return denominator.clamp_min(1).to(total.dtype)


@dataclass
class DenseTriplets:
    """Result of :func:`dense_triplet_loss`: loss value, gradient weights and statistics."""

    value: torch.Tensor
    weights: torch.Tensor  # d loss / d distances (n, m)
    swap_weights: torch.Tensor | None  # d loss / d (ref-ref distances) (m, m) when swapping
    stats: dict[str, torch.Tensor]


@torch.no_grad()
def dense_triplet_loss(distances: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor, margin: float,
                       select: Selection, soft_margin: bool = False, reduction: str = "mean_nonzero",
                       swap_distances: torch.Tensor | None = None) -> DenseTriplets:
    """Triplet loss over the triplets ``select`` keeps, from a detached (n, m) distance matrix.

    Works on (n, k, chunk) slot tensors (k = positives per anchor), never on triplet index lists.
    The loss is ``sum_ij weights_ij * d_ij`` to first order, so ``weights`` gives its exact
    gradient through :func:`losses.distances.distance_sum_gradients`. With ``swap_distances``
    (the (m, m) distances among the references) each term uses ``min(d(a,n), d(p,n))``.
    """
    n, m = distances.shape
    slots = positive_slots(positives)
    weights = torch.zeros_like(distances)
    swap_weights = torch.zeros(m, m, dtype=distances.dtype, device=distances.device) if swap_distances is not None else None
    total = distances.new_zeros(())
    sums = {key: distances.new_zeros(()) for key in ("count", "active", "correct_order", "margin_violation", "d_ap", "d_an")}
    d_an_all = distances.unsqueeze(1)
    for chunk in slot_chunks(slots.k, n, m):
        index = slots.index[:, chunk]
        d_ap = distances.gather(1, index).unsqueeze(2)
        valid = slots.valid[:, chunk].unsqueeze(2) & negatives.unsqueeze(1)
        used = select(d_ap, d_an_all, valid)
        d_an = d_an_all
        if swap_distances is not None:
            d_pn = swap_distances[index]
            use_pn = d_pn < d_an
            d_an = torch.where(use_pn, d_pn, d_an)
        violation = d_ap - d_an + margin
        term, slope = hinge(violation, soft_margin)
        term = torch.where(used, term, 0)
        slope = torch.where(used, slope, 0)
        total += term.sum()
        for key, value in triplet_stats(d_ap, d_an, violation, term, used).items():
            sums[key] += value
        weights.scatter_add_(1, index, slope.sum(2))
        if swap_distances is None:
            weights -= slope.sum(1)
        else:
            weights -= torch.where(use_pn, 0, slope).sum(1)
            swap_weights.index_add_(0, index.reshape(-1), -torch.where(use_pn, slope, 0).reshape(-1, m))
    scale = 1 / reduce_terms(total, sums, reduction)
    weights *= scale
    if swap_weights is not None:
        swap_weights *= scale
    return DenseTriplets(total * scale, weights, swap_weights, finish_stats(sums))


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
    Memory is O(n * k * m) for k positives per anchor; the gradient is computed in closed form.
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

    def set_progress(self, fraction: float) -> None:
        self.curriculum.progress = min(max(float(fraction), 0.0), 1.0)

    def selection(self, n: int, m: int, device: torch.device) -> Selection:
        admitted = self.curriculum.admitted(n, m, device) if self.mining == "curriculum" else None
        return margin_selection(self.mining, self.margin, admitted)

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        x = prepare_embeddings(embeddings, self.distance, self.normalize)
        y = x if ref_embeddings is None else prepare_embeddings(ref_embeddings, self.distance, self.normalize)
        with torch.no_grad():
            distances = distance_matrix(x, None if ref_embeddings is None else y, self.distance)
            positives, negatives = label_masks(labels, ref_labels)
            swap_distances = None
            if self.swap:
                swap_distances = distances if ref_embeddings is None else distance_matrix(y, None, self.distance)
        result = dense_triplet_loss(distances, positives, negatives, self.margin,
                                    self.selection(*distances.shape, distances.device), self.soft_margin,
                                    self.reduction, swap_distances)
        self.record_stats(**result.stats)
        weights = result.weights
        if result.swap_weights is not None and ref_embeddings is None:
            weights = weights + result.swap_weights
        grad_x, grad_y = distance_sum_gradients(x, y, weights, self.distance, distances)
        pairs = [(x, grad_x), (y, grad_y)]
        if result.swap_weights is not None and ref_embeddings is not None:
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
