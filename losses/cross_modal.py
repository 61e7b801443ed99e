"""Cross-modal losses: rows of modality A (e.g. images) against rows of modality B (e.g. captions).

Both are called ``loss(emb_a, labels, emb_b, labels_b)``; row i of A is paired with row i of B,
and paired rows are positives. With ``label_positives`` every A/B pair sharing a label is a
positive too; every other pair is a negative.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MetricLoss
from .distances import pairwise_distances
from .params import HyperParam, distance_params, margin_param
from .registry import register_loss

DIRECTIONS = ("both", "a_to_b", "b_to_a")
NEGATIVES = ("hardest", "sum")


def paired_positives(labels: torch.Tensor, emb_a: torch.Tensor, emb_b: torch.Tensor, labels_b: torch.Tensor,
                     label_positives: bool) -> torch.Tensor:
    """(n, n) boolean mask of positive A/B pairs: the diagonal, plus same-label pairs if asked."""
    if emb_a.shape[0] != emb_b.shape[0]:
        raise ValueError(
            f"cross-modal losses pair row i of A with row i of B, but A has {emb_a.shape[0]} rows and "
            f"B has {emb_b.shape[0]}; pass aligned pairs of equal length"
        )
    positive = torch.eye(emb_a.shape[0], dtype=torch.bool, device=emb_a.device)
    if label_positives:
        positive = positive | (labels[:, None] == labels_b[None, :])
    return positive


def _directions(matrix: torch.Tensor, positive: torch.Tensor, direction: str):
    """(anchor x candidate) matrices and masks for the requested directions."""
    if direction in ("both", "a_to_b"):
        yield matrix, positive
    if direction in ("both", "b_to_a"):
        yield matrix.T, positive.T


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def _hardest_pair_stats(distance: torch.Tensor, positive: torch.Tensor, margin: float):
    """Per anchor with a positive and a negative: hardest positive closer than hardest negative,
    and hardest negative within ``margin`` of the hardest positive; plus the anchors counted."""
    negative = ~positive
    hardest_pos = distance.masked_fill(~positive, float("-inf")).amax(1)
    hardest_neg = distance.masked_fill(~negative, float("inf")).amin(1)
    counted = positive.any(1) & negative.any(1)
    return (hardest_pos < hardest_neg) & counted, (hardest_neg < hardest_pos + margin) & counted, counted


def hinge_sum_over_negatives(distance: torch.Tensor, positive: torch.Tensor, margin: float):
    """For every (anchor a, candidate p): ``sum_n relu(margin + d[a, p] - d[a, n])`` over a's negatives,
    and the number of non-zero terms, by sorting each anchor's negative distances once.

    O(n^2 log n) time and O(n^2) memory instead of materialising the (n, n, n) triplet cube.
    """
    negative_d = distance.masked_fill(positive, float("inf"))
    sorted_d, _ = torch.sort(negative_d, dim=1)
    threshold = (distance + margin).detach()
    count = torch.searchsorted(sorted_d.detach().contiguous(), threshold.contiguous())
    finite = torch.where(torch.isinf(sorted_d), torch.zeros_like(sorted_d), sorted_d)
    prefix = F.pad(torch.cumsum(finite, dim=1), (1, 0))
    total = count.to(distance.dtype) * (distance + margin) - prefix.gather(1, count)
    return total, count


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
    the fraction of anchors whose hardest positive is closer than their hardest negative;
    ``margin_violation_fraction`` the fraction whose hardest negative is within the margin of it.
    """

    paper = "Faghri et al., VSE++: Improving Visual-Semantic Embeddings with Hard Negatives, BMVC 2018"
    cross_modal = True
    hyperparams = (
        margin_param(0.2, search=(0.05, 0.5)),
        HyperParam("negatives", str, "hardest", "hardest negative (VSE++) or sum over negatives",
                   choices=NEGATIVES, search=NEGATIVES),
        HyperParam("direction", str, "both", "A->B, B->A or both directions", choices=DIRECTIONS),
        HyperParam("label_positives", bool, False, "same-label A/B pairs are positives too"),
        *distance_params("cosine", normalize=True, search=False),
    )

    def __init__(self, margin: float = 0.2, negatives: str = "hardest", direction: str = "both",
                 label_positives: bool = False, distance: str = "cosine", normalize: bool = True) -> None:
        super().__init__()
        self.margin, self.negatives, self.direction = margin, negatives, direction
        self.label_positives, self.distance, self.normalize = label_positives, distance, normalize

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        positive = paired_positives(labels, embeddings, ref_embeddings, ref_labels, self.label_positives)
        distance = pairwise_distances(embeddings, ref_embeddings, self.distance, self.normalize)
        loss = distance.new_zeros(())
        active = terms = ordered = violated = anchors = distance.new_zeros(())
        for d, pos in _directions(distance, positive, self.direction):
            neg = ~pos
            if self.negatives == "hardest":
                has_neg = neg.any(1, keepdim=True)
                hardest_neg = d.masked_fill(pos, float("inf")).amin(1, keepdim=True)
                hardest_neg = torch.where(has_neg, hardest_neg, torch.zeros_like(hardest_neg))
                hinge = torch.relu(self.margin + d - hardest_neg) * (pos & has_neg)
                loss = loss + hinge.sum() / pos.sum().clamp_min(1)
                active = active + (hinge > 0).sum()
                terms = terms + (pos & has_neg).sum()
            else:
                total, count = hinge_sum_over_negatives(d, pos, self.margin)
                loss = loss + (total * pos).sum() / pos.sum().clamp_min(1)
                active = active + (count * pos).sum()
                terms = terms + (pos.sum(1) * neg.sum(1)).sum()
            with torch.no_grad():
                order, violation, counted = _hardest_pair_stats(d, pos, self.margin)
                ordered, violated, anchors = ordered + order.sum(), violated + violation.sum(), anchors + counted.sum()
        with torch.no_grad():
            self.record_stats(
                active_fraction=active / terms.clamp_min(1),
                correct_order_fraction=ordered / anchors.clamp_min(1),
                margin_violation_fraction=violated / anchors.clamp_min(1),
                mean_d_ap=_mean(distance, positive),
                mean_d_an=_mean(distance, ~positive),
            )
        return loss


@register_loss("info_nce")
class SymmetricInfoNCELoss(MetricLoss):
    """Symmetric InfoNCE, the CLIP objective (Radford et al., "Learning Transferable Visual Models
    From Natural Language Supervision", ICML 2021), a cross-modal baseline.

    Logits are cosine similarities divided by a fixed ``temperature`` (CLIP learns it, starting at
    0.07). Each direction is the mean over anchors of ``-log softmax`` of the paired item; with
    ``label_positives`` it is the mean over the anchor's positives of their log-probabilities (the
    UniCL form, Yang et al. CVPR 2022). The loss is the average of the A->B and B->A directions, as
    in CLIP.

    Statistics (both directions pooled): ``correct_order_fraction`` is the fraction of anchors
    whose least similar positive beats their most similar negative; ``margin_violation_fraction``
    the fraction whose most similar negative is within one temperature of it;
    ``active_fraction`` the fraction of negative pairs within one temperature of the anchor's least
    similar positive (those carry at least 1/e of its softmax weight); distances are ``1 - cos``.
    """

    paper = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
    cross_modal = True
    hyperparams = (
        HyperParam("temperature", float, 0.07, "softmax temperature", low=0.0, low_open=True, high=10.0,
                   search=(0.01, 1.0), log=True),
        HyperParam("label_positives", bool, False, "same-label A/B pairs are positives too"),
    )

    def __init__(self, temperature: float = 0.07, label_positives: bool = False) -> None:
        super().__init__()
        self.temperature, self.label_positives = temperature, label_positives

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        positive = paired_positives(labels, embeddings, ref_embeddings, ref_labels, self.label_positives)
        sim = F.normalize(embeddings, dim=1) @ F.normalize(ref_embeddings, dim=1).T
        loss = sim.new_zeros(())
        active = negatives = ordered = violated = anchors = sim.new_zeros(())
        for s, pos in _directions(sim, positive, "both"):
            log_prob = torch.log_softmax(s / self.temperature, dim=1)
            per_anchor = -(log_prob * pos).sum(1) / pos.sum(1)
            loss = loss + per_anchor.sum() / (2 * max(per_anchor.numel(), 1))
            with torch.no_grad():
                neg = ~pos
                weakest_pos = s.masked_fill(~pos, float("inf")).amin(1, keepdim=True)
                order, violation, counted = _hardest_pair_stats(-s, pos, self.temperature)
                ordered, violated, anchors = ordered + order.sum(), violated + violation.sum(), anchors + counted.sum()
                active = active + (neg & (s > weakest_pos - self.temperature)).sum()
                negatives = negatives + neg.sum()
        with torch.no_grad():
            self.record_stats(
                active_fraction=active / negatives.clamp_min(1),
                correct_order_fraction=ordered / anchors.clamp_min(1),
                margin_violation_fraction=violated / anchors.clamp_min(1),
                mean_d_ap=_mean(1 - sim, positive),
                mean_d_an=_mean(1 - sim, ~positive),
            )
        return loss
