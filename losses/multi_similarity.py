"""Multi-Similarity loss with its pair miner (Wang et al., "Multi-Similarity Loss with General Pair
Weighting for Deep Metric Learning", CVPR 2019).

Dense: one masked log-sum-exp over the (n, n) cosine similarity matrix per side, no loop over anchors.
"""
from __future__ import annotations

import torch

from .base import MetricLoss
from .pairs import cosine_similarity, masked_logsumexp, pair_masks, similarity_pair_stats
from .params import HyperParam
from .registry import register_loss


def mine_pairs(sim: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
               epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The MS miner: keep a positive less similar than the anchor's most similar negative plus
    ``epsilon``, and a negative more similar than the anchor's least similar positive minus
    ``epsilon``. An anchor with no positive (or no negative) keeps no pair."""
    with torch.no_grad():
        hardest_neg = sim.masked_fill(~negative, float("-inf")).amax(1, keepdim=True)
        hardest_pos = sim.masked_fill(~positive, float("inf")).amin(1, keepdim=True)
        return positive & (sim - epsilon < hardest_neg), negative & (sim + epsilon > hardest_pos)


@register_loss("multi_similarity")
class MultiSimilarityLoss(MetricLoss):
    """Multi-Similarity loss on cosine similarity S, optionally with the MS pair miner.

    Per anchor: ``1/alpha * log(1 + sum_pos exp(-alpha (S_ap - base)))
    + 1/beta * log(1 + sum_neg exp(beta (S_an - base)))``. Paper defaults: alpha=2, beta=50,
    base (lambda)=0.5, miner epsilon=0.1.

    Reduction (as pytorch-metric-learning's ``MultiSimilarityLoss``, ``MeanReducer``): the mean over
    all anchors, including anchors whose terms are empty (they count as 0) and anchors with no
    positive (their negative term is kept). With ``miner=True`` the pairs are those of PML's
    ``MultiSimilarityMiner(epsilon)``; like PML, the loss is 0 when at most one positive and at most
    one negative pair survive.

    Statistics: a pair is *active* when it is kept (all valid pairs without the miner) and
    *violating* when it lies on the wrong side of ``base`` (positive with S < base, negative with
    S > base); see :func:`losses.pairs.similarity_pair_stats` for the rest.
    """

    paper = "Wang et al., Multi-Similarity Loss with General Pair Weighting, CVPR 2019"
    hyperparams = (
        HyperParam("alpha", float, 2.0, "scale of the positive pairs' term", low=0.0, low_open=True,
                   high=1000.0, search=(0.01, 20.0), log=True),
        HyperParam("beta", float, 50.0, "scale of the negative pairs' term", low=0.0, low_open=True,
                   high=1000.0, search=(1.0, 100.0), log=True),
        HyperParam("base", float, 0.5, "similarity threshold lambda", low=-1.0, high=1.0, search=(0.0, 1.0)),
        HyperParam("miner", bool, True, "use the MS pair miner", search=(True, False)),
        HyperParam("epsilon", float, 0.1, "miner slack epsilon", low=0.0, high=2.0, search=(0.01, 0.5), log=True),
    )

    def __init__(self, alpha: float = 2.0, beta: float = 50.0, base: float = 0.5, miner: bool = True,
                 epsilon: float = 0.1) -> None:
        super().__init__()
        self.alpha, self.beta, self.base, self.miner, self.epsilon = alpha, beta, base, miner, epsilon

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        sim = cosine_similarity(embeddings, ref_embeddings)
        positive, negative = pair_masks(labels, ref_labels)
        pos_used, neg_used = (mine_pairs(sim, positive, negative, self.epsilon) if self.miner
                              else (positive, negative))
        per_anchor = (masked_logsumexp(self.alpha * (self.base - sim), pos_used, add_one=True) / self.alpha
                      + masked_logsumexp(self.beta * (sim - self.base), neg_used, add_one=True) / self.beta)
        loss = per_anchor.mean() if per_anchor.numel() else sim.sum() * 0
        too_few = (pos_used.sum() <= 1) & (neg_used.sum() <= 1)
        loss = torch.where(too_few, loss * 0, loss)
        violating = (positive & (sim < self.base)) | (negative & (sim > self.base))
        self.record_stats(**similarity_pair_stats(sim, positive, negative, pos_used | neg_used, violating))
        return loss
