"""Multi-Similarity loss with its pair miner (Wang et al., "Multi-Similarity Loss with General Pair
Weighting for Deep Metric Learning", CVPR 2019).

Dense over the (n, n) cosine similarity matrix, no loop over anchors; value and gradient with
respect to the similarities in closed form (see :mod:`losses.pairs`).
"""
from __future__ import annotations

import torch

from .base import MetricLoss
from .distances import with_gradients
from .mining import label_masks
from .pairs import (cosine_similarity, grouped_logsumexp, normalized_rows, pair_stats,
                    similarity_gradients)
from .params import HyperParam
from .registry import register_loss


@torch.no_grad()
def mine_pairs(sim: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, hardest_pos: torch.Tensor,
               hardest_neg: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The MS miner: keep a positive less similar than the anchor's most similar negative
    (``hardest_neg``) plus ``epsilon``, and a negative more similar than the anchor's least similar
    positive (``hardest_pos``) minus ``epsilon``. An anchor with no positive (or no negative) keeps
    no pair."""
    return (positive & (sim - epsilon < hardest_neg[:, None]),
            negative & (sim + epsilon > hardest_pos[:, None]))


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
    S > base); see :func:`losses.pairs.pair_stats` for the rest.
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
        x, y = normalized_rows(embeddings, ref_embeddings)
        s = cosine_similarity(x, y)
        with torch.no_grad():
            positive, negative = label_masks(labels, ref_labels)
            hardest_pos = torch.where(positive, s, float("inf")).amin(1)
            hardest_neg = torch.where(negative, s, float("-inf")).amax(1)
            pos_used, neg_used = (mine_pairs(s, positive, negative, hardest_pos, hardest_neg, self.epsilon)
                                  if self.miner else (positive, negative))
            logits = s - self.base
            violating = torch.where(positive, logits < 0, negative & (logits > 0))
            logits = torch.where(positive, logits * -self.alpha, logits * self.beta)
            g = grouped_logsumexp(logits, pos_used, neg_used, add_one=True)
            per_anchor = g.lse_pos / self.alpha + g.lse_neg / self.beta
            n_rows = max(per_anchor.shape[0], 1)
            too_few = (torch.count_nonzero(pos_used) <= 1) & (torch.count_nonzero(neg_used) <= 1)
            keep = (~too_few).to(s.dtype)
            value = per_anchor.sum() / n_rows * keep
            row_pos = -keep / (n_rows * g.norm_pos)
            row_neg = keep / (n_rows * g.norm_neg)
            grad = g.exp_logits.mul_(torch.where(pos_used, row_pos[:, None], row_neg[:, None]))
            self.record_stats(**pair_stats(s, positive, negative, pos_used | neg_used, violating,
                                           hardest_pos, hardest_neg))
        return with_gradients(value.to(x.dtype), similarity_gradients(x, y, grad))
