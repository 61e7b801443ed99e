"""Cross-modal losses: rows of modality A (e.g. images) against rows of modality B (e.g. captions).

Both are called ``loss(emb_a, labels, emb_b, labels_b)``; row i of A is paired with row i of B,
and paired rows are positives. With ``label_positives`` every A/B pair sharing a label is a
positive too; every other pair is a negative.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MetricLoss
from .distances import pairwise_distances, with_gradients
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
    """(anchor x candidate) matrices and masks for the requested directions, and whether each is
    the transpose of ``matrix``."""
    if direction in ("both", "a_to_b"):
        yield matrix, positive, False
    if direction in ("both", "b_to_a"):
        yield matrix.T, positive.T, True


def _order_stats(hardest_pos: torch.Tensor, hardest_neg: torch.Tensor, margin: float):
    """Counts of anchors (with a positive and a negative) whose hardest positive is closer than their
    hardest negative, of those whose hardest negative is within ``margin`` of it, and of anchors."""
    counted = torch.isfinite(hardest_pos) & torch.isfinite(hardest_neg)
    return (torch.count_nonzero(counted & (hardest_pos < hardest_neg)),
            torch.count_nonzero(counted & (hardest_neg < hardest_pos + margin)), torch.count_nonzero(counted))


def _pair_means(values: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` over the positive and over the negative pairs."""
    n_pos = torch.count_nonzero(positive)
    pos_sum = torch.where(positive, values, 0).sum()
    return pos_sum / n_pos.clamp_min(1), (values.sum() - pos_sum) / (positive.numel() - n_pos).clamp_min(1)


@torch.no_grad()
def hardest_negative_hinge(distance: torch.Tensor, positive: torch.Tensor, margin: float):
    """VSE++'s max of hinges: ``sum over positive pairs (a, p) of relu(margin + d[a, p] - min_n d[a, n])``.

    Returns the sum, its gradient with respect to ``distance`` (closed form: +1 on each active
    (a, p), minus the anchor's active count on its hardest negative), the number of active and of
    counted terms, and each anchor's hardest positive and negative distance (``-inf`` / ``inf`` if
    none).
    """
    hardest_neg, nearest = distance.masked_fill(positive, float("inf")).min(1)
    hinge = (distance - hardest_neg[:, None]).add_(margin).relu_().masked_fill_(~positive, 0)
    grad = (hinge > 0).to(distance.dtype)
    per_anchor = grad.sum(1, keepdim=True)
    grad.scatter_add_(1, nearest[:, None], -per_anchor)
    has_neg = torch.isfinite(hardest_neg)
    terms = torch.where(has_neg, torch.count_nonzero(positive, dim=1), 0).sum()
    hardest_pos = torch.where(positive, distance, float("-inf")).amax(1)
    return hinge.sum(), grad, per_anchor.sum(), terms, hardest_pos, hardest_neg


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
        detached = distance.detach()
        n_pos = torch.count_nonzero(positive).clamp_min(1)
        loss, closed_form_value, closed_form_grad = distance.new_zeros(()), distance.new_zeros(()), None
        active = terms = ordered = violated = anchors = torch.zeros((), dtype=torch.long, device=distance.device)
        for d, pos, transposed in _directions(distance, positive, self.direction):
            if self.negatives == "hardest":
                value, grad, n_active, n_terms, hardest_pos, hardest_neg = hardest_negative_hinge(
                    detached.T if transposed else detached, pos, self.margin)
                closed_form_value = closed_form_value + value / n_pos
                grad = grad.T if transposed else grad
                closed_form_grad = grad if closed_form_grad is None else closed_form_grad.add_(grad)
            else:
                total, count = hinge_sum_over_negatives(d, pos, self.margin)
                loss = loss + torch.where(pos, total, 0).sum() / n_pos
                with torch.no_grad():
                    n_active = torch.where(pos, count, 0).sum()
                    n_terms = (torch.count_nonzero(pos, dim=1) * (pos.shape[1] - torch.count_nonzero(pos, dim=1))).sum()
                    hardest_pos = torch.where(pos, d, float("-inf")).amax(1)
                    hardest_neg = d.detach().masked_fill(pos, float("inf")).amin(1)
            with torch.no_grad():
                order, violation, counted = _order_stats(hardest_pos, hardest_neg, self.margin)
                active, terms = active + n_active, terms + n_terms
                ordered, violated, anchors = ordered + order, violated + violation, anchors + counted
        if closed_form_grad is not None:
            loss = loss + with_gradients(closed_form_value, [(distance, closed_form_grad / n_pos)])
        with torch.no_grad():
            mean_d_ap, mean_d_an = _pair_means(detached, positive)
            self.record_stats(
                active_fraction=active / terms.clamp_min(1),
                correct_order_fraction=ordered / anchors.clamp_min(1),
                margin_violation_fraction=violated / anchors.clamp_min(1),
                mean_d_ap=mean_d_ap, mean_d_an=mean_d_an,
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
        with torch.no_grad():
            s, n = sim.detach(), max(sim.shape[0], 1)
            logits = s / self.temperature
            lse_rows, lse_cols = torch.logsumexp(logits, 1), torch.logsumexp(logits, 0)
            pos_logits = torch.where(positive, logits, 0)
            per_row = torch.count_nonzero(positive, dim=1).clamp_min(1)
            per_col = torch.count_nonzero(positive, dim=0).clamp_min(1)
            value = ((lse_rows - pos_logits.sum(1) / per_row).sum()
                     + (lse_cols - pos_logits.sum(0) / per_col).sum()) / (2 * n)
            # d value / d logits: row softmax + column softmax - each direction's positive weights
            grad = (logits - lse_rows[:, None]).exp_().add_((logits - lse_cols[None, :]).exp_())
            grad.sub_(torch.where(positive, 1 / per_row[:, None] + 1 / per_col[None, :], 0))
            grad.div_(2 * n * self.temperature)
            self._record(s, positive)
        return with_gradients(value.to(sim.dtype), [(sim, grad)])

    def _record(self, s: torch.Tensor, positive: torch.Tensor) -> None:
        pos_s, neg_s = s.masked_fill(~positive, float("inf")), s.masked_fill(positive, float("-inf"))
        active = ordered = violated = anchors = 0
        for dim in (1, 0):  # A->B anchors are rows, B->A anchors are columns
            weakest_pos, strongest_neg = pos_s.amin(dim), neg_s.amax(dim)
            order, violation, counted = _order_stats(-weakest_pos, -strongest_neg, self.temperature)
            near = neg_s > (weakest_pos - self.temperature).unsqueeze(dim)
            active, ordered = active + torch.count_nonzero(near), ordered + order
            violated, anchors = violated + violation, anchors + counted
        mean_s_ap, mean_s_an = _pair_means(s, positive)
        n_neg = 2 * (positive.numel() - torch.count_nonzero(positive))
        self.record_stats(
            active_fraction=active / n_neg.clamp_min(1),
            correct_order_fraction=ordered / anchors.clamp_min(1),
            margin_violation_fraction=violated / anchors.clamp_min(1),
            mean_d_ap=1 - mean_s_ap, mean_d_an=1 - mean_s_an,
        )
