"""Fused kernels of the cross-modal losses: VSE++'s triplet loss and symmetric InfoNCE.

In the default case, each anchor's only positive its pair, no (n, n) masks are built and the
gradients are applied in O(n d) (triplet) or left to two matmuls in backward (InfoNCE); otherwise
the hardest-negative hinge and InfoNCE get their gradient in closed form, and the summed hinge over
all negatives is computed by sorting each anchor's negative distances once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..cross_modal_terms import (
    check_pairing,
    directions,
    info_nce_stats,
    order_stats,
    pair_means,
    paired_positives,
    similarity_stats,
    triplet_counts_stats,
)
from ..distances import distance_matrix, pairwise_distances, with_gradients


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
def aligned_pair_gradients(
    x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, distance: torch.Tensor, kind: str
) -> tuple[torch.Tensor, torch.Tensor]:
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


def cross_modal_triplet_loss(
    emb_a: torch.Tensor,
    labels: torch.Tensor,
    emb_b: torch.Tensor,
    labels_b: torch.Tensor,
    *,
    margin: float,
    negatives: str,
    direction: str,
    label_positives: bool,
    distance: str,
    normalize: bool,
) -> tuple[torch.Tensor, dict]:
    """``CrossModalTripletLoss``' value (differentiable) and statistics."""
    if negatives == "hardest" and not label_positives:
        return _paired_hardest(
            emb_a, emb_b, margin=margin, direction=direction, kind=distance, normalize=normalize
        )
    positive = paired_positives(labels, emb_a, emb_b, labels_b, label_positives)
    matrix = pairwise_distances(emb_a, emb_b, distance, normalize)
    detached = matrix.detach()
    n_pos = torch.count_nonzero(positive).clamp_min(1)
    loss, closed_form_value, closed_form_grad = matrix.new_zeros(()), matrix.new_zeros(()), None
    active = terms = ordered = violated = anchors = torch.zeros((), dtype=torch.long, device=matrix.device)
    for d, pos, transposed in directions(matrix, positive, direction):
        if negatives == "hardest":
            value, grad, n_active, n_terms, hardest_pos, hardest_neg = hardest_negative_hinge(
                d.detach(), pos, margin
            )
            closed_form_value = closed_form_value + value / n_pos
            grad = grad.T if transposed else grad
            closed_form_grad = grad if closed_form_grad is None else closed_form_grad.add_(grad)
        else:
            total, count = hinge_sum_over_negatives(d, pos, margin)
            loss = loss + torch.where(pos, total, 0).sum() / n_pos
            with torch.no_grad():
                n_active = torch.where(pos, count, 0).sum()
                per_row = torch.count_nonzero(pos, dim=1)
                n_terms = (per_row * (pos.shape[1] - per_row)).sum()
                hardest_pos = torch.where(pos, d, float("-inf")).amax(1)
                hardest_neg = d.detach().masked_fill(pos, float("inf")).amin(1)
        order, violation, counted = order_stats(hardest_pos, hardest_neg, margin)
        active, terms = active + n_active, terms + n_terms
        ordered, violated, anchors = ordered + order, violated + violation, anchors + counted
    if closed_form_grad is not None:
        loss = loss + with_gradients(closed_form_value, [(matrix, closed_form_grad / n_pos)])
    mean_d_ap, mean_d_an = pair_means(detached, positive)
    return loss, triplet_counts_stats(active, terms, ordered, violated, anchors, mean_d_ap, mean_d_an)


def _paired_hardest(
    emb_a: torch.Tensor, emb_b: torch.Tensor, *, margin: float, direction: str, kind: str, normalize: bool
) -> tuple[torch.Tensor, dict]:
    """The default case, each anchor's only positive its pair: no (n, n) masks, and each hinge's
    gradient touches two pairs, applied in O(n d) by :func:`aligned_pair_gradients`."""
    check_pairing(emb_a, emb_b)
    prepare = normalize or kind == "cosine"
    emb_x, emb_y = (F.normalize(emb_a, dim=1), F.normalize(emb_b, dim=1)) if prepare else (emb_a, emb_b)
    with torch.no_grad():
        x, y = emb_x.detach(), emb_y.detach()
        distance = distance_matrix(x, y, kind)
        n = max(distance.shape[0], 1)
        dims = _anchor_dims(direction)
        paired, hardest = paired_hardest_negatives(distance, dims)
        value, paired_weight = distance.new_zeros(()), 0
        grad_x, grad_y = torch.zeros_like(x), torch.zeros_like(y)
        active = terms = ordered = violated = anchors = 0
        for (hardest_neg, nearest), dim in zip(hardest, dims):
            hinge = (paired - hardest_neg).add_(margin).relu_()
            value = value + hinge.sum() / n
            on = (hinge > 0).to(distance.dtype)
            paired_weight = paired_weight + on
            if dim == 1:  # anchor x_i, hardest negative y[nearest_i]
                to_x, to_y = aligned_pair_gradients(x, y.index_select(0, nearest), -on / n, hardest_neg, kind)
                grad_x.add_(to_x)
                grad_y.index_add_(0, nearest, to_y)
            else:  # anchor y_j, hardest negative x[nearest_j]
                to_x, to_y = aligned_pair_gradients(x.index_select(0, nearest), y, -on / n, hardest_neg, kind)
                grad_x.index_add_(0, nearest, to_x)
                grad_y.add_(to_y)
            order, violation, counted = order_stats(paired, hardest_neg, margin)
            active, terms = active + on.sum(), terms + torch.count_nonzero(torch.isfinite(hardest_neg))
            ordered, violated, anchors = ordered + order, violated + violation, anchors + counted
        to_x, to_y = aligned_pair_gradients(x, y, paired_weight / n, paired, kind)
        grad_x.add_(to_x)
        grad_y.add_(to_y)
        mean_d_ap, mean_d_an = _diagonal_means(distance, paired)
        stats = triplet_counts_stats(active, terms, ordered, violated, anchors, mean_d_ap, mean_d_an)
    return with_gradients(value, [(emb_x, grad_x), (emb_y, grad_y)]), stats


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
    value = ((row_max + row_sum.log() - paired).sum() + (col_max + col_sum.log() - paired).sum()) / (
        2 * max(logits.shape[0], 1)
    )
    grad = col_probs.div_(col_sum).addcmul_(row_probs, row_sum.reciprocal()[:, None])
    grad.diagonal().sub_(2)
    return value, grad


def info_nce_loss(
    emb_a: torch.Tensor,
    labels: torch.Tensor,
    emb_b: torch.Tensor,
    labels_b: torch.Tensor,
    *,
    temperature: float,
    label_positives: bool,
) -> tuple[torch.Tensor, dict]:
    """``SymmetricInfoNCELoss``' value (differentiable) and statistics."""
    if not label_positives:
        return _paired_info_nce(emb_a, emb_b, temperature)
    positive = paired_positives(labels, emb_a, emb_b, labels_b, label_positives)
    sim = F.normalize(emb_a, dim=1) @ F.normalize(emb_b, dim=1).T
    with torch.no_grad():
        s, n = sim.detach(), max(sim.shape[0], 1)
        logits = s / temperature
        lse_rows, lse_cols = torch.logsumexp(logits, 1), torch.logsumexp(logits, 0)
        pos_logits = torch.where(positive, logits, 0)
        per_row = torch.count_nonzero(positive, dim=1).clamp_min(1).to(s.dtype)  # 1 / int64 is float32
        per_col = torch.count_nonzero(positive, dim=0).clamp_min(1).to(s.dtype)
        value = (
            (lse_rows - pos_logits.sum(1) / per_row).sum() + (lse_cols - pos_logits.sum(0) / per_col).sum()
        ) / (2 * n)
        # d value / d logits: row softmax + column softmax - each direction's positive weights
        grad = (logits - lse_rows[:, None]).exp_().add_((logits - lse_cols[None, :]).exp_())
        grad.sub_(torch.where(positive, 1 / per_row[:, None] + 1 / per_col[None, :], 0))
        grad.div_(2 * n * temperature)
        stats = info_nce_stats(s, positive, temperature)
    return with_gradients(value.to(sim.dtype), [(sim, grad)]), stats


def _paired_info_nce(
    emb_a: torch.Tensor, emb_b: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, dict]:
    """The default case, each anchor's only positive its pair: logits scaled inside the matmul,
    both softmaxes in two (n, n) buffers, and the two gradient matmuls left to backward."""
    check_pairing(emb_a, emb_b)
    x, y = F.normalize(emb_a, dim=1), F.normalize(emb_b, dim=1)
    with torch.no_grad():
        logits = torch.addmm(x.new_zeros(()), x.detach(), y.detach().T, beta=0, alpha=1 / temperature)
        scratch = torch.empty_like(logits)
        (row_max, col_max), stats = _paired_stats(logits, scratch, temperature)
        value, grad = paired_info_nce(logits, row_max, col_max, out=scratch)
    scale = 1 / (2 * max(logits.shape[0], 1) * temperature)
    return _ProductGradient.apply(value, x, y, grad, scale), stats


def _paired_stats(logits: torch.Tensor, scratch: torch.Tensor, temperature: float):
    """:func:`info_nce_stats` for paired positives, in logit units (one temperature is 1), using the
    (n, n) buffer ``scratch`` (a float compare and sum beat a boolean mask); returns the rows' and
    the columns' maxima, and the statistics."""
    diagonal = logits.diagonal()
    paired = diagonal.clone()
    diagonal.fill_(float("-inf"))
    active = ordered = violated = anchors = 0
    strongest = []
    for dim in (1, 0):  # A->B anchors are rows, B->A anchors are columns
        strongest_neg = logits.amax(dim)
        order, violation, counted = order_stats(-paired, -strongest_neg, 1.0)
        near = torch.gt(logits, (paired - 1).unsqueeze(dim), out=scratch)
        active = active + near.sum(dtype=torch.float32)
        ordered, violated, anchors = ordered + order, violated + violation, anchors + counted
        strongest.append(torch.maximum(strongest_neg, paired))
    diagonal.copy_(paired)
    mean_ap, mean_an = _diagonal_means(logits, paired)
    n = logits.shape[0]
    stats = similarity_stats(
        active / max(2 * (n * n - n), 1),
        ordered,
        violated,
        anchors,
        mean_ap * temperature,
        mean_an * temperature,
    )
    return (strongest[0], strongest[1]), stats
