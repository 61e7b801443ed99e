"""Multi-Similarity loss with its pair miner (Wang et al., "Multi-Similarity Loss with General Pair
Weighting for Deep Metric Learning", CVPR 2019).

Dense over the (n, n) cosine similarity matrix, no loop over anchors; value and gradient with
respect to the similarities in closed form (see :mod:`losses.pairs`).
"""
from __future__ import annotations

import torch

from .base import MetricLoss
from .distances import with_gradients
from .pairs import SimilarityGroups, cosine_similarity, masked_exp, normalized_rows, similarity_gradients
from .params import HyperParam
from .registry import register_loss
from .workspace import Workspace


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
    S > base); see :meth:`losses.pairs.SimilarityGroups.stats` for the rest.
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
        self.workspace = Workspace()
        self.alpha, self.beta, self.base, self.miner, self.epsilon = alpha, beta, base, miner, epsilon

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        x, y = normalized_rows(embeddings, ref_embeddings)
        s = cosine_similarity(x, y, self.workspace)
        with torch.no_grad():
            groups = SimilarityGroups.split(s, labels, ref_labels, self.workspace)
            hardest_pos, hardest_neg = groups.hardest_pos, groups.hardest_neg
            n_violating = groups.count(self.base, self.base, self.workspace("scratch", s))
            pos_used, neg_used = groups.positive, groups.negative
            if self.miner:  # PML's MultiSimilarityMiner: S_ap - epsilon < max S_an, S_an + epsilon > min S_ap
                groups.positives_below(hardest_neg + self.epsilon, out=pos_used)
                groups.negatives_above(hardest_pos - self.epsilon, out=neg_used)
            n_pos_used, n_neg_used = pos_used.sum(), neg_used.sum()
            # log(1 + sum exp(logits)) per group, shifted by the group's largest logit (at least 0):
            # that of the least similar positive and of the most similar negative, used whenever any
            # is; each (n, m) step writes into a spent buffer (fresh large tensors cost page faults)
            shift_pos = (self.alpha * (self.base - hardest_pos)).clamp_min(0)
            shift_neg = (self.beta * (hardest_neg - self.base)).clamp_min(0)
            exp_pos = masked_exp(torch.add((self.alpha * self.base - shift_pos)[:, None], s, alpha=-self.alpha,
                                           out=groups.positive_view), pos_used)
            exp_neg = masked_exp(torch.add((-self.beta * self.base - shift_neg)[:, None], s, alpha=self.beta,
                                           out=groups.negative_view), neg_used)
            norm_pos = exp_pos.sum(1) + torch.exp(-shift_pos)
            norm_neg = exp_neg.sum(1) + torch.exp(-shift_neg)
            per_anchor = (shift_pos + norm_pos.log()) / self.alpha + (shift_neg + norm_neg.log()) / self.beta
            n_rows = max(per_anchor.shape[0], 1)
            keep = ((n_pos_used > 1) | (n_neg_used > 1)).to(s.dtype)
            value = per_anchor.sum() / n_rows * keep
            # d value / d s: each used pair's softmax weight, negative for positives
            grad = exp_neg.mul_((keep / (n_rows * norm_neg))[:, None])
            grad.addcmul_(exp_pos, (keep / (n_rows * norm_pos))[:, None], value=-1)
            self.record_stats(**groups.stats(n_pos_used + n_neg_used, n_violating))
        return with_gradients(value.to(x.dtype), similarity_gradients(x, y, grad, s))
