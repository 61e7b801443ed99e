"""Circle loss (Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
CVPR 2020), pair-wise label form, dense over the (n, n) cosine similarity matrix; value and gradient
with respect to the similarities in closed form (see :mod:`losses.pairs`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MetricLoss
from .distances import with_gradients
from .pairs import SimilarityGroups, cosine_similarity, masked_exp, normalized_rows, similarity_gradients
from .params import HyperParam
from .registry import register_loss
from .workspace import Workspace


@register_loss("circle")
class CircleLoss(MetricLoss):
    """Circle loss on cosine similarity with self-paced pair weights.

    Per anchor: ``softplus(logsumexp_pos(-gamma a_p (s_p - (1 - m))) + logsumexp_neg(gamma a_n (s_n - m)))``
    with detached weights ``a_p = relu(1 + m - s_p)`` and ``a_n = relu(s_n + m)``. The paper's
    suggested (m, gamma): (0.25, 256) for face recognition (our default), (0.25, 128) for person
    re-identification, (0.4, 80) for fine-grained image retrieval (PML's default).

    Reduction (as pytorch-metric-learning's ``CircleLoss``, ``AvgNonZeroReducer``): anchors lacking a
    positive or a negative contribute 0, and the loss is the mean over the anchors with a non-zero
    term (0 when there is none).

    Statistics: a pair is *active* when its weight is non-zero (every positive; a negative with
    s_n > -m) and *violating* when it is on the wrong side of its decision boundary (positive with
    s_p < 1 - m, negative with s_n > m).
    """

    paper = "Sun et al., Circle Loss: A Unified Perspective of Pair Similarity Optimization, CVPR 2020"
    hyperparams = (
        HyperParam("m", float, 0.25, "relaxation margin m", low=-0.5, high=1.0, search=(0.05, 0.5)),
        HyperParam("gamma", float, 256.0, "scale factor gamma", low=0.0, low_open=True, high=4096.0,
                   search=(16.0, 512.0), log=True),
    )

    def __init__(self, m: float = 0.25, gamma: float = 256.0) -> None:
        super().__init__()
        self.workspace = Workspace()
        self.m, self.gamma = m, gamma

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        x, y = normalized_rows(embeddings, ref_embeddings)
        s = cosine_similarity(x, y, self.workspace)
        with torch.no_grad():
            m, gamma = self.m, self.gamma
            groups = SimilarityGroups.split(s, labels, ref_labels, self.workspace)
            hardest_pos, hardest_neg = groups.hardest_pos, groups.hardest_neg
            positive, negative = groups.positive, groups.negative
            scratch = self.workspace("scratch", s)
            n_violating = groups.count(1 - m, m, scratch)
            # logits: gamma a_p ((1 - m) - s_p) and gamma a_n (s_n - m), with the paper's self-paced
            # weights a_p = relu(1 + m - s_p) and a_n = relu(s_n + m) held constant; taken from the
            # groups' views, the weights are 0 outside their group, so their non-zeros are the active
            # pairs. Every (n, m) step writes into a spent buffer (fresh ones page-fault on CPU).
            weight_pos = torch.sub(s.new_tensor(1 + m), groups.positive_view, out=groups.positive_view).relu_()
            weight_neg = torch.add(groups.negative_view, m, out=groups.negative_view).relu_()
            n_active = torch.count_nonzero(weight_pos) + torch.count_nonzero(weight_neg)
            offset_pos, offset_neg = torch.sub(s.new_tensor(1 - m), s, out=scratch), s.sub_(m)
            # the positive logit falls as s_p rises: its row maximum is the least similar positive's;
            # the negatives' maximum is taken with them lifted by 1 past the others (logit / gamma
            # lies in [-1, 1.25], scaled by 1/8 into [-1/8, 5/32])
            top_pos = torch.rsub(hardest_pos, 1 + m).relu_().mul_(torch.rsub(hardest_pos, 1 - m))
            logit_neg = torch.addcmul(negative, offset_neg, weight_neg, value=1 / 8)
            top_neg = (logit_neg.amax(1) - 1) * 8
            has_pos, has_neg = torch.isfinite(hardest_pos), torch.isfinite(hardest_neg)
            shift_pos, shift_neg = torch.where(has_pos, top_pos, 0), torch.where(has_neg, top_neg, 0)
            exp_pos = masked_exp(torch.addcmul((-gamma * shift_pos)[:, None], offset_pos, weight_pos,
                                               value=gamma, out=offset_pos), positive)
            exp_neg = masked_exp(torch.addcmul((-gamma * shift_neg)[:, None], offset_neg, weight_neg,
                                               value=gamma, out=logit_neg), negative)
            norm_pos = exp_pos.sum(1).masked_fill_(~has_pos, 1)
            norm_neg = exp_neg.sum(1).masked_fill_(~has_neg, 1)
            has_both = has_pos & has_neg
            total = torch.where(has_both, gamma * (shift_pos + shift_neg) + (norm_pos * norm_neg).log(), 0)
            per_anchor = F.softplus(total) * has_both
            nonzero = per_anchor > 0
            count = torch.count_nonzero(nonzero).clamp_min(1)
            value = per_anchor.sum() / count
            # d value / d s: each pair's softmax weight in its group times d logit / d s = -/+ gamma a
            row = torch.sigmoid(total) * nonzero * gamma / count
            grad = exp_neg.mul_(weight_neg).mul_((row / norm_neg)[:, None])
            grad.addcmul_(exp_pos.mul_(weight_pos), (row / norm_pos)[:, None], value=-1)
            self.record_stats(**groups.stats(n_active, n_violating))
        return with_gradients(value.to(x.dtype), similarity_gradients(x, y, grad, positive))
