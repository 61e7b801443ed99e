"""Circle loss (Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
CVPR 2020), pair-wise label form, dense over the (n, n) cosine similarity matrix; value and gradient
with respect to the similarities in closed form (see :mod:`losses.pairs`)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MetricLoss
from .distances import with_gradients
from .mining import label_masks
from .pairs import (cosine_similarity, grouped_logsumexp, normalized_rows, pair_stats,
                    similarity_gradients)
from .params import HyperParam
from .registry import register_loss


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
        self.m, self.gamma = m, gamma

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        x, y = normalized_rows(embeddings, ref_embeddings)
        s = cosine_similarity(x, y)
        with torch.no_grad():
            positive, negative = label_masks(labels, ref_labels)
            # the paper's self-paced weights a_p = relu(1 + m - s_p), a_n = relu(s_n + m), held constant
            weight = torch.where(positive, (1 + self.m) - s, s + self.m).relu_()
            centred = torch.where(positive, s - (1 - self.m), s - self.m)
            active = (weight > 0) & (positive | negative)
            violating = torch.where(positive, centred < 0, negative & (centred > 0))
            slope = torch.where(positive, -weight, weight).mul_(self.gamma)  # d logit / d s
            g = grouped_logsumexp(slope * centred, positive, negative, add_one=False)
            total = g.lse_pos + g.lse_neg
            has_both = torch.isfinite(g.max_pos) & torch.isfinite(g.max_neg)
            per_anchor = F.softplus(total) * has_both
            nonzero = per_anchor > 0
            count = torch.count_nonzero(nonzero).clamp_min(1)
            value = per_anchor.sum() / count
            row = torch.sigmoid(total) * nonzero / count
            grad = g.exp_logits.mul_(slope).mul_(torch.where(positive, (row / g.norm_pos)[:, None],
                                                             (row / g.norm_neg)[:, None]))
            self.record_stats(**pair_stats(
                s, positive, negative, active, violating,
                torch.where(positive, s, float("inf")).amin(1), torch.where(negative, s, float("-inf")).amax(1)))
        return with_gradients(value.to(x.dtype), similarity_gradients(x, y, grad))
