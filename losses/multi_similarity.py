"""Multi-Similarity loss with its pair miner (Wang et al., "Multi-Similarity Loss with General Pair
Weighting for Deep Metric Learning", CVPR 2019)."""

from __future__ import annotations

import torch

from ._kernels import pairs as kernel
from ._kernels.workspace import Workspace
from .base import MetricLoss
from .mining import label_masks
from .pair_terms import cosine_similarities, log1p_sum_exp, pair_stats
from .params import HyperParam
from .registry import register_loss


@register_loss("multi_similarity")
class MultiSimilarityLoss(MetricLoss):
    """Multi-Similarity loss on cosine similarity S, optionally with the MS pair miner.

    Per anchor: ``1/alpha * log(1 + sum_pos exp(-alpha (S_ap - base)))
    + 1/beta * log(1 + sum_neg exp(beta (S_an - base)))``. Paper defaults: alpha=2, beta=50,
    base (lambda)=0.5, miner epsilon=0.1. The miner keeps the positives with
    ``S_ap < max S_an + epsilon`` and the negatives with ``S_an > min S_ap - epsilon``.

    Reduction (as pytorch-metric-learning's ``MultiSimilarityLoss``, ``MeanReducer``): the mean over
    all anchors, including anchors whose terms are empty (they count as 0) and anchors with no
    positive (their negative term is kept). With ``miner=True`` the pairs are those of PML's
    ``MultiSimilarityMiner(epsilon)``; like PML, the loss is 0 when at most one positive and at most
    one negative pair survive.

    Statistics: a pair is *active* when it is kept (all valid pairs without the miner) and
    *violating* when it lies on the wrong side of ``base`` (positive with S < base, negative with
    S > base); see :func:`losses.pair_terms.pair_stats` for the rest.

    ``compute`` runs the fused kernel (:mod:`losses._kernels.pairs`, value and gradient in closed
    form); ``fused = False`` runs the formula as written below, its test oracle.
    """

    paper = "Wang et al., Multi-Similarity Loss with General Pair Weighting, CVPR 2019"
    hyperparams = (
        HyperParam(
            "alpha",
            float,
            doc="scale of the positive pairs' term",
            low=0.0,
            low_open=True,
            high=1000.0,
            search=(0.01, 20.0),
            log=True,
        ),
        HyperParam(
            "beta",
            float,
            doc="scale of the negative pairs' term",
            low=0.0,
            low_open=True,
            high=1000.0,
            search=(1.0, 100.0),
            log=True,
        ),
        HyperParam("base", float, doc="similarity threshold lambda", low=-1.0, high=1.0, search=(0.0, 1.0)),
        HyperParam("miner", bool, doc="use the MS pair miner", search=(True, False)),
        HyperParam(
            "epsilon",
            float,
            doc="miner slack epsilon",
            low=0.0,
            high=2.0,
            search=(0.01, 0.5),
            log=True,
            when={"miner": True},
        ),
    )
    fused = True

    def __init__(
        self,
        alpha: float = 2.0,
        beta: float = 50.0,
        base: float = 0.5,
        miner: bool = True,
        epsilon: float = 0.1,
    ) -> None:
        super().__init__()
        self.workspace = Workspace()
        self.alpha, self.beta, self.base, self.miner, self.epsilon = alpha, beta, base, miner, epsilon

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        if self.fused:
            value, stats = kernel.multi_similarity_loss(
                embeddings,
                labels,
                ref_embeddings,
                ref_labels,
                alpha=self.alpha,
                beta=self.beta,
                base=self.base,
                miner=self.miner,
                epsilon=self.epsilon,
                workspace=self.workspace,
            )
            self.record_stats(**stats)
            return value
        alpha, beta, base = self.alpha, self.beta, self.base
        s = cosine_similarities(embeddings, ref_embeddings)  # (n, m)
        positive, negative = label_masks(labels, ref_labels)
        pos_used, neg_used = positive, negative
        if self.miner:
            with torch.no_grad():
                least_similar_pos = torch.where(positive, s, float("inf")).amin(1, keepdim=True)
                most_similar_neg = torch.where(negative, s, float("-inf")).amax(1, keepdim=True)
                pos_used = positive & (s < most_similar_neg + self.epsilon)
                neg_used = negative & (s > least_similar_pos - self.epsilon)
        per_anchor = (
            log1p_sum_exp(-alpha * (s - base), pos_used) / alpha
            + log1p_sum_exp(beta * (s - base), neg_used) / beta
        )
        keep = (pos_used.sum() > 1) | (neg_used.sum() > 1)
        violating = (positive & (s < base)) | (negative & (s > base))
        self.record_stats(**pair_stats(s, positive, negative, pos_used | neg_used, violating))
        return per_anchor.sum() / max(per_anchor.numel(), 1) * keep
