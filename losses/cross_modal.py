"""Cross-modal losses: rows of modality A (e.g. images) against rows of modality B (e.g. captions).

Both are called ``loss(emb_a, labels, emb_b, labels_b)``; row i of A is paired with row i of B,
and paired rows are positives. With ``label_positives`` every A/B pair sharing a label is a
positive too; every other pair is a negative.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import MetricLoss
from .distances import distance_matrix, pairwise_distances, with_gradients
from .params import HyperParam, distance_params, margin_param
from .registry import register_loss

DIRECTIONS = ("both", "a_to_b", "b_to_a")
NEGATIVES = ("hardest", "sum")


def check_pairing(emb_a: torch.Tensor, emb_b: torch.Tensor) -> None:
    """Raise ``ValueError`` unless A and B have as many rows (row i of A is paired with row i of B)."""
    if emb_a.shape[0] != emb_b.shape[0]:
        raise ValueError(
            f"cross-modal losses pair row i of A with row i of B, but A has {emb_a.shape[0]} rows and "
            f"B has {emb_b.shape[0]}; pass aligned pairs of equal length"
        )


def paired_positives(labels: torch.Tensor, emb_a: torch.Tensor, emb_b: torch.Tensor, labels_b: torch.Tensor,
                     label_positives: bool) -> torch.Tensor:
    """(n, n) boolean mask of positive A/B pairs: the diagonal, plus same-label pairs if asked."""
    check_pairing(emb_a, emb_b)
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


def _anchor_dims(direction: str) -> tuple[int, ...]:
    """The dimension of the (A x B) matrix that each requested direction reduces over: 1 for A->B
    (anchors are rows), 0 for B->A (anchors are columns)."""
    return {"both": (1, 0), "a_to_b": (1,), "b_to_a": (0,)}[direction]


@torch.no_grad()
def paired_hardest_negatives(distance: torch.Tensor, dims: tuple[int, ...]):
    """With each row paired to the same-index column only: the paired distances, and for each
    reduction dim each anchor's hardest negative distance (``inf`` if none) and its index.

    Columns are reduced as the rows of a transposed copy, much faster on CPU than a strided
    reduction with indices. ``distance`` is modified in place and restored.
    """
    diagonal = distance.diagonal()
    paired = diagonal.clone()
    diagonal.fill_(float("inf"))
    hardest = [(distance if dim == 1 else distance.T.contiguous()).min(1) for dim in dims]
    diagonal.copy_(paired)
    return paired, hardest


@torch.no_grad()
def aligned_pair_gradients(x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, distance: torch.Tensor,
                           kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_k weights_k * d(x_k, y_k)`` with respect to the prepared embeddings ``x``
    and ``y``, for row-aligned pairs at distances ``distance`` (taken from the distance matrix).

    The closed form of :func:`losses.distances.distance_sum_gradients` for one pair per row: O(n d)
    instead of two (n, n) matmuls. Euclidean pairs at distance 0 get gradient 0.
    """
    if kind == "cosine":
        return -weights[:, None] * y, -weights[:, None] * x
    if kind == "euclidean":
        weights = (weights / distance).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
    to_x = ((2.0 if kind == "squared_euclidean" else 1.0) * weights)[:, None] * (x - y)
    return to_x, -to_x


def _diagonal_means(matrix: torch.Tensor, diagonal: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of a square ``matrix`` over its ``diagonal`` and over the other entries."""
    n = matrix.shape[0]
    total = matrix.sum(dtype=torch.promote_types(matrix.dtype, torch.float32))
    return diagonal.sum() / max(n, 1), (total - diagonal.sum()) / max(n * n - n, 1)


class _ProductGradient(torch.autograd.Function):
    """Returns ``value``, a function of ``x @ y.T`` whose gradient with respect to that product is
    ``scale * weights``; backward sends ``weights @ y`` to ``x`` and ``weights.T @ x`` to ``y``."""

    @staticmethod
    def forward(ctx, value, x, y, weights, scale):
        ctx.save_for_backward(x, y, weights)
        ctx.scale = scale
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        x, y, weights = ctx.saved_tensors
        step = grad_output * ctx.scale
        grad_x = (weights @ y).mul_(step) if ctx.needs_input_grad[1] else None
        grad_y = (weights.T @ x).mul_(step) if ctx.needs_input_grad[2] else None
        return None, grad_x, grad_y, None, None


@torch.no_grad()
def paired_info_nce(logits: torch.Tensor, row_max: torch.Tensor, col_max: torch.Tensor, out: torch.Tensor):
    """Symmetric InfoNCE with each row's only positive its same-index column: the value, and
    ``2n`` times its gradient with respect to ``logits`` (row softmax + column softmax, minus 2 on
    the diagonal), written to ``out``. ``row_max``/``col_max`` are the rows'/columns' maxima;
    ``logits`` is overwritten.
    """
    paired = logits.diagonal().clone()
    col_probs = torch.sub(logits, col_max, out=out).exp_()
    col_sum = col_probs.sum(0)
    row_probs = logits.sub_(row_max[:, None]).exp_()
    row_sum = row_probs.sum(1)
    value = ((row_max + row_sum.log() - paired).sum()
             + (col_max + col_sum.log() - paired).sum()) / (2 * max(logits.shape[0], 1))
    grad = col_probs.div_(col_sum).addcmul_(row_probs, row_sum.reciprocal()[:, None])
    grad.diagonal().sub_(2)
    return value, grad


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
        if self.negatives == "hardest" and not self.label_positives:
            return self._paired_hardest(embeddings, ref_embeddings)
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
            self._record_counts(active, terms, ordered, violated, anchors, mean_d_ap, mean_d_an)
        return loss

    def _record_counts(self, active, terms, ordered, violated, anchors, mean_d_ap, mean_d_an) -> None:
        """Record the statistics from the pooled counts of both directions (see the class docstring)."""
        self.record_stats(
            active_fraction=active / terms.clamp_min(1),
            correct_order_fraction=ordered / anchors.clamp_min(1),
            margin_violation_fraction=violated / anchors.clamp_min(1),
            mean_d_ap=mean_d_ap, mean_d_an=mean_d_an,
        )

    def _paired_hardest(self, emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
        """The default case, each anchor's only positive its pair: no (n, n) masks, and each hinge's
        gradient touches two pairs, applied in O(n d) by :func:`aligned_pair_gradients`."""
        check_pairing(emb_a, emb_b)
        prepare = self.normalize or self.distance == "cosine"
        emb_x, emb_y = (F.normalize(emb_a, dim=1), F.normalize(emb_b, dim=1)) if prepare else (emb_a, emb_b)
        with torch.no_grad():
            x, y = emb_x.detach(), emb_y.detach()
            distance = distance_matrix(x, y, self.distance)
            n = max(distance.shape[0], 1)
            dims = _anchor_dims(self.direction)
            paired, hardest = paired_hardest_negatives(distance, dims)
            value, paired_weight = distance.new_zeros(()), 0
            grad_x, grad_y = torch.zeros_like(x), torch.zeros_like(y)
            active = terms = ordered = violated = anchors = 0
            for (hardest_neg, nearest), dim in zip(hardest, dims):
                hinge = (paired - hardest_neg).add_(self.margin).relu_()
                value = value + hinge.sum() / n
                on = (hinge > 0).to(distance.dtype)
                paired_weight = paired_weight + on
                if dim == 1:  # anchor x_i, hardest negative y[nearest_i]
                    to_x, to_y = aligned_pair_gradients(x, y.index_select(0, nearest), -on / n, hardest_neg,
                                                        self.distance)
                    grad_x.add_(to_x)
                    grad_y.index_add_(0, nearest, to_y)
                else:  # anchor y_j, hardest negative x[nearest_j]
                    to_x, to_y = aligned_pair_gradients(x.index_select(0, nearest), y, -on / n, hardest_neg,
                                                        self.distance)
                    grad_x.index_add_(0, nearest, to_x)
                    grad_y.add_(to_y)
                order, violation, counted = _order_stats(paired, hardest_neg, self.margin)
                active, terms = active + on.sum(), terms + torch.count_nonzero(torch.isfinite(hardest_neg))
                ordered, violated, anchors = ordered + order, violated + violation, anchors + counted
            to_x, to_y = aligned_pair_gradients(x, y, paired_weight / n, paired, self.distance)
            grad_x.add_(to_x)
            grad_y.add_(to_y)
            mean_d_ap, mean_d_an = _diagonal_means(distance, paired)
            self._record_counts(active, terms, ordered, violated, anchors, mean_d_ap, mean_d_an)
        return with_gradients(value, [(emb_x, grad_x), (emb_y, grad_y)])


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
        if not self.label_positives:
            return self._paired(embeddings, ref_embeddings)
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

    def _paired(self, emb_a: torch.Tensor, emb_b: torch.Tensor) -> torch.Tensor:
        """The default case, each anchor's only positive its pair: logits scaled inside the matmul,
        both softmaxes in two (n, n) buffers, and the two gradient matmuls left to backward."""
        check_pairing(emb_a, emb_b)
        x, y = F.normalize(emb_a, dim=1), F.normalize(emb_b, dim=1)
        with torch.no_grad():
            logits = torch.addmm(x.new_zeros(()), x.detach(), y.detach().T, beta=0, alpha=1 / self.temperature)
            scratch = torch.empty_like(logits)
            row_max, col_max = self._record_paired(logits, scratch)
            value, grad = paired_info_nce(logits, row_max, col_max, out=scratch)
        scale = 1 / (2 * max(logits.shape[0], 1) * self.temperature)
        return _ProductGradient.apply(value, x, y, grad, scale)

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
        self._store(active / n_neg.clamp_min(1), ordered, violated, anchors, mean_s_ap, mean_s_an)

    def _record_paired(self, logits: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_record` for paired positives, in logit units (one temperature is 1), using the
        (n, n) buffer ``scratch`` (a float compare and sum beat a boolean mask); returns the rows'
        and the columns' maxima."""
        diagonal = logits.diagonal()
        paired = diagonal.clone()
        diagonal.fill_(float("-inf"))
        active = ordered = violated = anchors = 0
        strongest = []
        for dim in (1, 0):  # A->B anchors are rows, B->A anchors are columns
            strongest_neg = logits.amax(dim)
            order, violation, counted = _order_stats(-paired, -strongest_neg, 1.0)
            near = torch.gt(logits, (paired - 1).unsqueeze(dim), out=scratch)
            active = active + near.sum(dtype=torch.float32)
            ordered, violated, anchors = ordered + order, violated + violation, anchors + counted
            strongest.append(torch.maximum(strongest_neg, paired))
        diagonal.copy_(paired)
        mean_ap, mean_an = _diagonal_means(logits, paired)
        n = logits.shape[0]
        self._store(active / max(2 * (n * n - n), 1), ordered, violated, anchors,
                    mean_ap * self.temperature, mean_an * self.temperature)
        return strongest[0], strongest[1]

    def _store(self, active_fraction, ordered, violated, anchors, mean_s_ap, mean_s_an) -> None:
        """Record the statistics from the pooled counts and the mean positive/negative similarity."""
        self.record_stats(
            active_fraction=active_fraction,
            correct_order_fraction=ordered / anchors.clamp_min(1),
            margin_violation_fraction=violated / anchors.clamp_min(1),
            mean_d_ap=1 - mean_s_ap, mean_d_an=1 - mean_s_an,
        )
