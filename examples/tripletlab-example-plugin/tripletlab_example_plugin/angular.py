"""Angular loss (Wang et al., "Deep Metric Learning with Angular Loss", ICCV 2017) as a tripletlab plugin."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from losses import HyperParam, MetricLoss, register_loss


@register_loss("angular")
class AngularLoss(MetricLoss):
    """Angular loss on L2-normalised embeddings, N-pair form.

    For each positive pair (a, p): ``log(1 + sum_n exp(4 tan^2(alpha) (x_a + x_p)^T x_n
    - 2 (1 + tan^2(alpha)) x_a^T x_p))`` over the negatives n of a. The paper suggests alpha between
    36 and 55 degrees; the default 40 is pytorch-metric-learning's. Reduction: the mean over
    positive pairs (as PML's ``AngularLoss``); 0 when the batch has no positive pair or no negative.
    Unlike PML, which normalises anchors and positives but not the negatives, every embedding is
    normalised, as in the paper; the two agree on unit-norm inputs.
    """

    paper = "Wang et al., Deep Metric Learning with Angular Loss, ICCV 2017"
    hyperparams = (
        # the default is __init__'s: declared once, there
        HyperParam(
            "alpha",
            float,
            doc="angle bound alpha in degrees",
            low=0.0,
            high=90.0,
            low_open=True,
            high_open=True,
            search=(30.0, 55.0),
        ),
    )

    def __init__(self, alpha: float = 40.0) -> None:
        super().__init__()
        self.alpha = alpha

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        if ref_embeddings is not None:
            raise ValueError("angular takes no reference embeddings; call it as loss(embeddings, labels)")
        x = F.normalize(embeddings, dim=1)
        sim = x @ x.T
        same = labels[:, None] == labels[None, :]
        anchor, positive = torch.nonzero(
            same & ~torch.eye(len(labels), dtype=torch.bool, device=labels.device), as_tuple=True
        )
        tan2 = math.tan(math.radians(self.alpha)) ** 2
        logits = 4 * tan2 * (sim[anchor] + sim[positive]) - 2 * (1 + tan2) * sim[anchor, positive, None]
        negative = ~same[anchor]
        lse = torch.logsumexp(logits.masked_fill(~negative, torch.finfo(logits.dtype).min), dim=1)
        per_pair = torch.logaddexp(lse, lse.new_zeros(())).masked_fill(~negative.any(1), 0)
        loss = per_pair.mean() if len(anchor) and bool(negative.any()) else sim.sum() * 0
        with torch.no_grad():
            distance = (2 - 2 * sim).clamp_min(0).sqrt()
            self.record_stats(
                mean_d_ap=distance[anchor, positive].mean() if len(anchor) else distance.new_zeros(()),
                mean_d_an=distance[~same].mean() if bool((~same).any()) else distance.new_zeros(()),
            )
        return loss
