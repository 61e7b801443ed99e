"""The classic triplet loss with mining (all, hard, semi-hard or easy triplets, or a curriculum) and a
functional form.

Weinberger & Saul (JMLR 2009), Schroff et al. (FaceNet, CVPR 2015):
``l(a, p, n) = max(d(a,p) - d(a,n) + m, 0)``.
"""

from __future__ import annotations

import torch

from ._kernels import triplet as kernel
from ._kernels.workspace import Workspace
from .base import MetricLoss
from .distances import check_distance, distance_matrix, paired_distances, prepare_embeddings
from .mining import TRIPLET_MINING, check_mining, label_masks, mined_triplets
from .params import HyperParam, distance_params, margin_param
from .registry import register_loss
from .triplet_terms import REDUCTIONS, check_reduction, finish_stats, hinge, reduce_terms, triplet_stats


def reduction_param() -> HyperParam:
    return HyperParam(
        "reduction",
        str,
        doc="mean_nonzero: mean over non-zero terms (PML AvgNonZeroReducer); mean: over all used triplets",
        choices=REDUCTIONS,
        search=None,
    )


def soft_margin_param() -> HyperParam:
    return HyperParam(
        "soft_margin", bool, doc="softplus(d_ap - d_an + m) instead of the hinge", search=(False, True)
    )


class HardnessCurriculum:
    """A seeded curriculum from easy toward hard triplets.

    At training progress ``t`` in [0, 1] (``set_progress``) the hard fraction is
    ``h(t) = start + (end - start) * t``. Each call draws one uniform number per (anchor, negative)
    pair from a generator seeded with ``seed`` (advanced once per call); a hard triplet
    (``d(a,n) < d(a,p)``) is used when its pair's draw is below ``h(t)``. Semi-hard and easy
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


CURRICULUM = {"mining": "curriculum"}


@register_loss("triplet")
class TripletLoss(MetricLoss):
    """Triplet margin loss ``max(d(a,p) - d(a,n) + m, 0)`` over every mined triplet of the batch.

    Mining (margin = the loss margin; difficulties as in :mod:`losses.mining`, FaceNet's): ``all``
    valid triplets, every ``hard-triplets`` (``d(a,n) < d(a,p)``), every ``semi-hard-triplets``
    (``d(a,p) <= d(a,n) < d(a,p) + m``), every ``easy-triplets`` (``d(a,n) >= d(a,p) + m``; zero
    under the hinge, useful with ``soft_margin``), or ``curriculum`` (:class:`HardnessCurriculum`).
    These keep every triplet of their kind, as pytorch-metric-learning's ``TripletMarginMiner``
    (which differs only on exact ties); the ``batch_hard`` and ``semi_hard`` losses pick one
    negative per anchor or per anchor-positive pair instead. ``soft_margin`` replaces the hinge by
    ``softplus(d(a,p) - d(a,n) + m)`` (PML's ``smooth_loss``); ``swap`` uses ``min(d(a,n), d(p,n))``
    as in PML (mining still uses ``d(a,n)``).

    Reduction: ``mean_nonzero`` averages over the non-zero terms, exactly PML's
    ``TripletMarginLoss`` with its default ``AvgNonZeroReducer``; ``mean`` averages over all mined
    triplets (PML with a ``MeanReducer``; for ``all`` that is every valid triplet, whereas PML's
    ``TripletMarginMiner("all")`` keeps only margin violators). With reference embeddings,
    anchors come from ``embeddings`` and positives/negatives from the references, as in PML.

    Defaults: m = 0.2, euclidean distance on L2-normalised embeddings, all triplets, the mean over the
    non-zero terms (PML's; FaceNet used the squared euclidean distance).

    ``compute`` runs the fused kernel (:mod:`losses._kernels.triplet`: O(n * m) memory, O(n * k * m)
    for k positives per anchor with ``soft_margin`` or ``swap``, the gradient in closed form);
    ``fused = False`` runs the formula as written below (O(n * m * m) memory), its test oracle.
    """

    paper = "Schroff et al., FaceNet, CVPR 2015 (m = 0.2, squared euclidean on L2-normalised embeddings)"
    hyperparams = (
        margin_param(),
        *distance_params(),
        HyperParam(
            "mining",
            str,
            doc="which triplets count",
            choices=tuple(TRIPLET_MINING),
            search=("all", "hard-triplets", "semi-hard-triplets", "curriculum"),
        ),
        reduction_param(),
        soft_margin_param(),
        HyperParam("swap", bool, doc="use min(d(a,n), d(p,n)) (distance swap)", search=(False, True)),
        HyperParam(
            "curriculum_start",
            float,
            doc="curriculum: hard fraction at the start",
            low=0.0,
            high=1.0,
            search=None,
            when=CURRICULUM,
        ),
        HyperParam(
            "curriculum_end",
            float,
            doc="curriculum: hard fraction at the end",
            low=0.0,
            high=1.0,
            search=None,
            when=CURRICULUM,
        ),
        HyperParam(
            "seed", int, doc="curriculum: seed of the hard-triplet draws", search=None, when=CURRICULUM
        ),
    )
    fused = True

    def __init__(
        self,
        margin: float = 0.2,
        distance: str = "euclidean",
        normalize: bool = True,
        mining: str = "all",
        reduction: str = "mean_nonzero",
        soft_margin: bool = False,
        swap: bool = False,
        curriculum_start: float = 0.0,
        curriculum_end: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        check_distance(distance)
        check_mining(mining)
        check_reduction(reduction)
        self.margin, self.distance, self.normalize = margin, distance, normalize
        self.mining, self.reduction, self.soft_margin, self.swap = mining, reduction, soft_margin, swap
        self.curriculum = HardnessCurriculum(curriculum_start, curriculum_end, seed)
        self.workspace = Workspace()

    def set_progress(self, fraction: float) -> None:
        self.curriculum.progress = min(max(float(fraction), 0.0), 1.0)

    def prepare(self, embeddings: torch.Tensor | None) -> torch.Tensor | None:
        return None if embeddings is None else prepare_embeddings(embeddings, self.distance, self.normalize)

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        x, y = self.prepare(embeddings), self.prepare(ref_embeddings)  # y = None: the batch itself
        n, m = x.shape[0], (x if y is None else y).shape[0]
        admitted = self.curriculum.admitted(n, m, x.device) if self.mining == "curriculum" else None
        if self.fused:
            value, stats = kernel.triplet_loss(
                x,
                y,
                labels,
                ref_labels,
                margin=self.margin,
                distance=self.distance,
                mining=self.mining,
                reduction=self.reduction,
                soft_margin=self.soft_margin,
                swap=self.swap,
                admitted=admitted,
                workspace=self.workspace,
            )
            self.record_stats(**stats)
            return value
        d = distance_matrix(x, y, self.distance)  # (n, m): anchors x candidates
        positive, negative = label_masks(labels, ref_labels)
        d_ap, d_an = d.unsqueeze(2), d.unsqueeze(1)  # (n, m, 1) positive, (n, 1, m) negative
        valid = positive.unsqueeze(2) & negative.unsqueeze(1)  # (n, m, m) triplets (a, p, n)
        used = mined_triplets(self.mining, d_ap.detach(), d_an.detach(), self.margin, valid, admitted)
        if self.swap:  # min(d(a, n), d(p, n)), d(p, n) among the candidates: (1, m, m)
            d_pn = distance_matrix(x if y is None else y, None, self.distance)
            d_an = torch.minimum(d_an, d_pn.unsqueeze(0))
        term, _ = hinge(d_ap - d_an + self.margin, self.soft_margin)
        term = torch.where(used, term, 0)
        with torch.no_grad():
            sums = triplet_stats(d_ap, d_an, self.margin, term, used)
        self.record_stats(**finish_stats(sums))
        return term.sum() / reduce_terms(term, sums, self.reduction)


def triplet_margin(
    anchor: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    margin: float = 0.2,
    distance: str = "euclidean",
    normalize: bool = False,
    soft_margin: bool = False,
    swap: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """Triplet loss of explicit (N, d) anchor, positive and negative rows (differentiable by autograd).

    ``reduction`` is ``mean`` over the N triplets, ``mean_nonzero`` over the non-zero terms, or
    ``none`` for the (N,) terms.
    """
    if not (anchor.dim() == 2 and anchor.shape == positive.shape == negative.shape):
        raise ValueError(
            f"anchor, positive and negative must be (N, d) tensors of one shape, got "
            f"{tuple(anchor.shape)}, {tuple(positive.shape)}, {tuple(negative.shape)}"
        )
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
