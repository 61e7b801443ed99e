"""Circle loss (Sun et al., "Circle Loss: A Unified Perspective of Pair Similarity Optimization",
CVPR 2020), pair-wise label form, on the (n, m) cosine similarity matrix."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._kernels import pairs as kernel
from ._kernels.workspace import Workspace
from .base import MetricLoss
from .mining import label_masks
from .pair_terms import cosine_similarities, pair_stats
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

    ``compute`` runs the fused kernel (:mod:`losses._kernels.pairs`, value and gradient in closed
    form); ``fused = False`` runs the formula as written below, its test oracle.
    """

    paper = "Sun et al., Circle Loss: A Unified Perspective of Pair Similarity Optimization, CVPR 2020"
    hyperparams = (
        HyperParam("m", float, doc="relaxation margin m", low=-0.5, high=1.0, search=(0.05, 0.5)),
        HyperParam(
            "gamma",
            float,
            doc="scale factor gamma",
            low=0.0,
            low_open=True,
            high=4096.0,
            search=(16.0, 512.0),
            log=True,
        ),
    )
    fused = True

    def __init__(self, m: float = 0.25, gamma: float = 256.0) -> None:
        super().__init__()
        self.workspace = Workspace()
        self.m, self.gamma = m, gamma

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        if self.fused:
            value, stats = kernel.circle_loss(
                embeddings,
                labels,
                ref_embeddings,
                ref_labels,
                m=self.m,
                gamma=self.gamma,
                workspace=self.workspace,
            )
            self.record_stats(**stats)
            return value
        m, gamma = self.m, self.gamma
        s = cosine_similarities(embeddings, ref_embeddings)  # (n, m)
        positive, negative = label_masks(labels, ref_labels)
        a_p, a_n = (1 + m - s).clamp_min(0).detach(), (s + m).clamp_min(0).detach()
        logit_p = -gamma * a_p * (s - (1 - m))
        logit_n = gamma * a_n * (s - m)
        lowest = torch.finfo(s.dtype).min  # not -inf: a row without pairs keeps a finite gradient
        lse_p = torch.logsumexp(logit_p.masked_fill(~positive, lowest), 1)
        lse_n = torch.logsumexp(logit_n.masked_fill(~negative, lowest), 1)
        has_both = positive.any(1) & negative.any(1)
        per_anchor = torch.where(has_both, F.softplus(lse_p + lse_n), 0)
        n_nonzero = torch.count_nonzero(per_anchor.detach() > 0).clamp_min(1)
        active = (positive & (a_p > 0)) | (negative & (a_n > 0))
        violating = (positive & (s < 1 - m)) | (negative & (s > m))
        self.record_stats(**pair_stats(s, positive, negative, active, violating))
        return per_anchor.sum() / n_nonzero
