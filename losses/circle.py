"""Circle loss (Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
CVPR 2020), pair-wise label form, dense over the (n, n) cosine similarity matrix."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MetricLoss
from .pairs import cosine_similarity, masked_logsumexp, pair_masks, similarity_pair_stats
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
        sim = cosine_similarity(embeddings, ref_embeddings)
        positive, negative = pair_masks(labels, ref_labels)
        frozen = sim.detach()
        pos_logits = -self.gamma * torch.relu(1 + self.m - frozen) * (sim - (1 - self.m))
        neg_logits = self.gamma * torch.relu(frozen + self.m) * (sim - self.m)
        per_anchor = F.softplus(masked_logsumexp(pos_logits, positive) + masked_logsumexp(neg_logits, negative))
        per_anchor = per_anchor * (positive.any(1) & negative.any(1))
        loss = per_anchor.sum() / (per_anchor > 0).sum().clamp_min(1)
        active = positive | (negative & (frozen > -self.m))
        violating = (positive & (frozen < 1 - self.m)) | (negative & (frozen > self.m))
        self.record_stats(**similarity_pair_stats(sim, positive, negative, active, violating))
        return loss
