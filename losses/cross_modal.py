"""Cross-modal losses: rows of modality A (e.g. images) against rows of modality B (e.g. captions).

Both are called ``loss(emb_a, labels, emb_b, labels_b)``; row i of A is paired with row i of B,
and paired rows are positives. With ``label_positives`` every A/B pair sharing a label is a
positive too; every other pair is a negative.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._kernels import cross_modal as kernel
from .base import MetricLoss
from .cross_modal_terms import (
    DIRECTIONS,
    directions,
    info_nce_stats,
    order_stats,
    pair_means,
    paired_positives,
    triplet_counts_stats,
)
from .distances import pairwise_distances
from .params import HyperParam, distance_params, margin_param
from .registry import register_loss

NEGATIVES = ("hardest", "sum")


@register_loss("cross_modal_triplet")
class CrossModalTripletLoss(MetricLoss):
    """Bidirectional cross-modal triplet loss (VSE++: Faghri et al., "VSE++: Improving Visual-Semantic
    Embeddings with Hard Negatives", BMVC 2018).

    For each positive pair (a, p) across modalities: ``relu(margin + d(a, p) - d(a, n))`` with the
    hardest negative n of anchor a (``negatives="hardest"``, VSE++'s max of hinges) or summed over all
    of a's negatives (``"sum"``, the earlier VSE0 form). ``direction="both"`` adds the A->B and B->A
    losses (image-to-text and text-to-image). Paper defaults: cosine similarity, margin 0.2, hardest.

    Reduction: each direction is the mean over its positive pairs (VSE++ sums over the batch;
    multiply by the batch size to recover it); the directions are added, as in VSE++. An anchor with
    no negative contributes 0.

    Statistics: ``active_fraction`` is the fraction of non-zero hinge terms (per positive pair for
    ``hardest``, per (anchor, positive, negative) triplet for ``sum``); ``correct_order_fraction``
    the fraction of anchors whose hardest triplet (hardest positive, hardest negative) is not hard;
    ``margin_violation_fraction`` the fraction whose hardest triplet is not easy
    (:func:`losses.mining.triplet_difficulty`).

    ``compute`` runs the fused kernel (:mod:`losses._kernels.cross_modal`: closed-form gradients,
    O(n d) for the default paired case, sorted negatives for ``sum``); ``fused = False`` runs the
    formula as written below (O(n^3) memory for ``sum``), its test oracle.
    """

    paper = "Faghri et al., VSE++: Improving Visual-Semantic Embeddings with Hard Negatives, BMVC 2018"
    cross_modal = True
    hyperparams = (
        margin_param(search=(0.05, 0.5)),
        HyperParam(
            "negatives",
            str,
            doc="hardest negative (VSE++) or sum over negatives",
            choices=NEGATIVES,
            search=NEGATIVES,
        ),
        HyperParam("direction", str, doc="A->B, B->A or both directions", choices=DIRECTIONS),
        HyperParam("label_positives", bool, doc="same-label A/B pairs are positives too"),
        *distance_params(search=False),
    )
    fused = True

    def __init__(
        self,
        margin: float = 0.2,
        negatives: str = "hardest",
        direction: str = "both",
        label_positives: bool = False,
        distance: str = "cosine",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        self.margin, self.negatives, self.direction = margin, negatives, direction
        self.label_positives, self.distance, self.normalize = label_positives, distance, normalize

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        if self.fused:
            value, stats = kernel.cross_modal_triplet_loss(
                embeddings,
                labels,
                ref_embeddings,
                ref_labels,
                margin=self.margin,
                negatives=self.negatives,
                direction=self.direction,
                label_positives=self.label_positives,
                distance=self.distance,
                normalize=self.normalize,
            )
            self.record_stats(**stats)
            return value
        positive = paired_positives(labels, embeddings, ref_embeddings, ref_labels, self.label_positives)
        d = pairwise_distances(embeddings, ref_embeddings, self.distance, self.normalize)  # (n, n): A x B
        n_pos = torch.count_nonzero(positive).clamp_min(1)
        loss = d.new_zeros(())
        counts = torch.zeros(5, dtype=torch.long)  # active terms, terms, ordered, violated, anchors
        for d_dir, pos, _ in directions(d, positive, self.direction):  # anchors are the rows of d_dir
            neg = ~pos
            hardest_neg = torch.where(neg, d_dir, float("inf")).min(1, keepdim=True).values  # (n, 1)
            d_ap = d_dir.unsqueeze(2)  # (n, n, 1): (a, p)
            if self.negatives == "hardest":  # VSE++: the hardest negative of each anchor
                d_an = hardest_neg.unsqueeze(2)  # (n, 1, 1)
                triplet = pos.unsqueeze(2) & hardest_neg.isfinite().unsqueeze(2)
            else:  # VSE0: every negative of each anchor
                d_an = d_dir.unsqueeze(1)  # (n, 1, n): (a, n)
                triplet = pos.unsqueeze(2) & neg.unsqueeze(1)
            hinge = torch.where(triplet, (self.margin + d_ap - d_an).clamp_min(0), 0)
            loss = loss + hinge.sum() / n_pos
            with torch.no_grad():
                hardest_pos = torch.where(pos, d_dir, float("-inf")).amax(1)
                order = order_stats(hardest_pos, hardest_neg.squeeze(1), self.margin)
                counts += torch.stack([(hinge > 0).sum(), triplet.sum(), *order]).cpu()
        with torch.no_grad():
            mean_d_ap, mean_d_an = pair_means(d, positive)
        self.record_stats(**triplet_counts_stats(*counts, mean_d_ap, mean_d_an))
        return loss


@register_loss("info_nce")
class SymmetricInfoNCELoss(MetricLoss):
    """Symmetric InfoNCE, the CLIP objective (Radford et al., "Learning Transferable Visual Models
    From Natural Language Supervision", ICML 2021), a cross-modal baseline.

    Logits are cosine similarities divided by a fixed ``temperature`` (CLIP learns it, starting at
    0.07, our default). Each direction is the mean over anchors of ``-log softmax`` of the paired
    item; with ``label_positives`` it is the mean over the anchor's positives of their
    log-probabilities (the UniCL form, Yang et al. CVPR 2022). The loss is the average of the A->B
    and B->A directions, as in CLIP.

    Statistics (both directions pooled): ``correct_order_fraction`` is the fraction of anchors
    whose least similar positive beats their most similar negative; ``margin_violation_fraction``
    the fraction whose most similar negative is within one temperature of it;
    ``active_fraction`` the fraction of negative pairs within one temperature of the anchor's least
    similar positive (those carry at least 1/e of its softmax weight); distances are ``1 - cos``.

    ``compute`` runs the fused kernel (:mod:`losses._kernels.cross_modal`, closed-form gradient);
    ``fused = False`` runs the formula as written below, its test oracle.
    """

    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
    cross_modal = True
    hyperparams = (
        HyperParam(
            "temperature",
            float,
            doc="softmax temperature",
            low=0.0,
            low_open=True,
            high=10.0,
            search=(0.01, 1.0),
            log=True,
        ),
        HyperParam("label_positives", bool, doc="same-label A/B pairs are positives too"),
    )
    fused = True

    def __init__(self, temperature: float = 0.07, label_positives: bool = False) -> None:
        super().__init__()
        self.temperature, self.label_positives = temperature, label_positives

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        if self.fused:
            value, stats = kernel.info_nce_loss(
                embeddings,
                labels,
                ref_embeddings,
                ref_labels,
                temperature=self.temperature,
                label_positives=self.label_positives,
            )
            self.record_stats(**stats)
            return value
        positive = paired_positives(labels, embeddings, ref_embeddings, ref_labels, self.label_positives)
        s = F.normalize(embeddings, dim=1) @ F.normalize(ref_embeddings, dim=1).T  # (n, n): A x B
        loss = s.new_zeros(())
        for logits, pos, _ in directions(s / self.temperature, positive, "both"):
            log_prob = F.log_softmax(logits, 1)  # each anchor's distribution over the candidates
            loss = loss + (-(log_prob * pos).sum(1) / pos.sum(1).clamp_min(1)).mean() / 2
        self.record_stats(**info_nce_stats(s.detach(), positive, self.temperature))
        return loss
