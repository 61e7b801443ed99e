"""Triplet terms from a detached distance matrix: loss value, gradient weights and statistics.

Three engines, all dense over (n, k, m) slot tensors (k = positives per anchor, see
:mod:`losses.mining`), none building a list of triplets:

- :func:`threshold_triplet_loss`: hinge loss with margin-based mining. Every mining rule keeps, per
  (anchor, positive), the negatives whose distance lies in an interval, so the loss is a sum of
  counts and distance sums below a few thresholds (one compare and one batched matmul each).
- :func:`nearest_farther_triplet_loss`: FaceNet's one negative per (anchor, positive).
- :func:`dense_triplet_loss`: any selection, soft margin and distance swap, term by term.

Each returns the value and ``weights`` = d loss / d distances: hinge and softplus terms are
linear in the distances to first order, so ``losses.distances.distance_sum_gradients`` turns the
weights into the exact gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .mining import PositiveSlots, Selection, slot_chunks

REDUCTIONS = ("mean_nonzero", "mean")
STAT_SUMS = ("count", "active", "correct_order", "margin_violation", "d_ap", "d_an")


def hinge(violation: torch.Tensor, soft_margin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss term, its derivative) of the hinge ``max(v, 0)`` or the soft margin ``softplus(v)``."""
    if soft_margin:
        return F.softplus(violation), torch.sigmoid(violation)
    return violation.clamp_min(0), (violation > 0).to(violation.dtype)


def triplet_stats(d_ap, d_an, violation, term, used) -> dict[str, torch.Tensor]:
    """The five ``STAT_NAMES`` summed over ``used`` triplets (counts and sums, not yet averaged)."""
    return {
        "count": used.sum(),
        "active": (used & (term > 0)).sum(),
        "correct_order": (used & (d_ap < d_an)).sum(),
        "margin_violation": (used & (violation > 0)).sum(),
        "d_ap": torch.where(used, d_ap, 0).sum(),
        "d_an": torch.where(used, d_an, 0).sum(),
    }


def finish_stats(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    count = sums["count"].clamp_min(1).to(sums["d_ap"].dtype)
    return {
        "active_fraction": sums["active"] / count,
        "correct_order_fraction": sums["correct_order"] / count,
        "margin_violation_fraction": sums["margin_violation"] / count,
        "mean_d_ap": sums["d_ap"] / count,
        "mean_d_an": sums["d_an"] / count,
    }


def reduce_terms(total: torch.Tensor, sums: dict[str, torch.Tensor], reduction: str) -> torch.Tensor:
    """The divisor of the summed terms: number of non-zero terms or of used triplets (at least 1)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")
    denominator = sums["active"] if reduction == "mean_nonzero" else sums["count"]
    return denominator.clamp_min(1).to(total.dtype)


@dataclass
class DenseTriplets:
    """Result of :func:`dense_triplet_loss`: loss value, gradient weights and statistics."""

    value: torch.Tensor
    weights: torch.Tensor  # d loss / d distances (n, m)
    swap_weights: torch.Tensor | None  # d loss / d (ref-ref distances) (m, m) when swapping
    stats: dict[str, torch.Tensor]


@torch.no_grad()
def dense_triplet_loss(distances: torch.Tensor, slots: PositiveSlots, negatives: torch.Tensor, margin: float,
                       select: Selection, soft_margin: bool = False, reduction: str = "mean_nonzero",
                       swap_distances: torch.Tensor | None = None) -> DenseTriplets:
    """Triplet loss over the triplets ``select`` keeps, from a detached (n, m) distance matrix.

    Works on (n, k, chunk) slot tensors (k = positives per anchor), never on triplet index lists.
    The loss is ``sum_ij weights_ij * d_ij`` to first order, so ``weights`` gives its exact
    gradient through :func:`losses.distances.distance_sum_gradients`. With ``swap_distances``
    (the (m, m) distances among the references) each term uses ``min(d(a,n), d(p,n))``.
    """
    n, m = distances.shape
    weights = torch.zeros_like(distances)
    swap_weights = torch.zeros(m, m, dtype=distances.dtype, device=distances.device) if swap_distances is not None else None
    total = distances.new_zeros(())
    sums = {key: distances.new_zeros(()) for key in STAT_SUMS}
    d_an_all = distances.unsqueeze(1)
    for chunk in slot_chunks(slots.k, n, m):
        index = slots.index[:, chunk]
        d_ap = distances.gather(1, index).unsqueeze(2)
        valid = slots.valid[:, chunk].unsqueeze(2) & negatives.unsqueeze(1)
        used = select(d_ap, d_an_all, valid)
        d_an = d_an_all
        if swap_distances is not None:
            d_pn = swap_distances[index]
            use_pn = d_pn < d_an
            d_an = torch.where(use_pn, d_pn, d_an)
        violation = d_ap - d_an + margin
        term, slope = hinge(violation, soft_margin)
        term = torch.where(used, term, 0)
        slope = torch.where(used, slope, 0)
        total += term.sum()
        for key, value in triplet_stats(d_ap, d_an, violation, term, used).items():
            sums[key] += value
        weights.scatter_add_(1, index, slope.sum(2))
        if swap_distances is None:
            weights -= slope.sum(1)
        else:
            weights -= torch.where(use_pn, 0, slope).sum(1)
            swap_weights.index_add_(0, index.reshape(-1), -torch.where(use_pn, slope, 0).reshape(-1, m))
    scale = 1 / reduce_terms(total, sums, reduction)
    weights *= scale
    if swap_weights is not None:
        swap_weights *= scale
    return DenseTriplets(total * scale, weights, swap_weights, finish_stats(sums))


class _Candidates:
    """An anchor's candidate negatives (``mask``, (n, m)), counted below per-slot thresholds.

    :meth:`below` returns, for thresholds ``x`` of shape (n, k), the count per (anchor, slot) of
    candidates ``< x`` and, when ``columns``, the count per (anchor, column) of slots whose
    threshold lies above that candidate (``None`` otherwise: only ask for what is used). The
    indicator ``[d < x]`` is ``sign(relu(x - d))`` with ``d = +inf`` off the mask, computed in place
    in one reused (n, k, m) buffer: on CPU, fresh allocations and boolean compares, not arithmetic,
    dominate the cost.
    """

    def __init__(self, distances: torch.Tensor, mask: torch.Tensor, slot_valid: torch.Tensor) -> None:
        self.distances = torch.where(mask, distances, float("inf")).unsqueeze(1)
        self.mask = mask
        self.slot_valid = slot_valid
        self.buffer = torch.empty(*slot_valid.shape, distances.shape[1], dtype=distances.dtype,
                                  device=distances.device)
        self.memo: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

    def _everything(self, columns: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        dtype = self.distances.dtype
        valid = self.slot_valid.to(dtype)
        slot_counts = valid * torch.count_nonzero(self.mask, dim=1).to(dtype).unsqueeze(1)
        return slot_counts, self.mask.to(dtype).mul_(valid.sum(1, keepdim=True)) if columns else None

    def below(self, threshold, columns: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        if isinstance(threshold, float):  # -inf or +inf
            slot_counts, column_counts = self._everything(columns)
            if threshold > 0:
                return slot_counts, column_counts
            return slot_counts.zero_(), None if column_counts is None else column_counts.zero_()
        for seen, slot_counts, column_counts in self.memo:
            if (column_counts is not None or not columns) and torch.equal(seen, threshold):
                return slot_counts, column_counts
        masked = torch.where(self.slot_valid, threshold, float("-inf"))
        indicator = torch.sub(masked.unsqueeze(2), self.distances, out=self.buffer).clamp_min_(0).sign_()
        slot_counts, column_counts = indicator.sum(2), indicator.sum(1) if columns else None
        self.memo.append((threshold, slot_counts, column_counts))
        return slot_counts, column_counts

    def between(self, low, high, columns: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Counts of candidates in ``[low, high)`` (empty when high <= low), as :meth:`below`."""
        if isinstance(low, torch.Tensor) and isinstance(high, torch.Tensor):
            high = torch.maximum(high, low)
        upper_slots, upper_columns = self.below(high, columns)
        if isinstance(low, float) and low < 0:
            return upper_slots, upper_columns
        lower_slots, lower_columns = self.below(low, columns)
        return upper_slots - lower_slots, upper_columns - lower_columns if columns else None


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum()`` without an (n, m) temporary; columns never counted have count 0."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _lower(a, b):
    """min of two bounds, each a tensor or -inf/+inf."""
    if isinstance(a, float):
        return b if a > 0 else a
    if isinstance(b, float):
        return a if b > 0 else b
    return torch.minimum(a, b)


def _upper(a, b):
    """max of two bounds, each a tensor or -inf/+inf."""
    if isinstance(a, float):
        return b if a < 0 else a
    if isinstance(b, float):
        return a if b < 0 else b
    return torch.maximum(a, b)


def mining_intervals(mining: str, d_ap: torch.Tensor, margin: float) -> list[tuple[str, object, object]]:
    """The negatives each mining rule keeps, as ``[low, high)`` distance intervals per slot.

    Returns ``(part, low, high)`` items: ``part`` is ``"negatives"`` or, for the curriculum's
    hard triplets, ``"admitted"``. Closed bounds use the next float up, so the rules are exactly
    PML's ``t <= 0`` (hard), ``0 < t <= m`` (semi-hard), ``t > m`` (easy) up to rounding of
    ``t = d_an - d_ap`` versus ``d_an`` compared with ``d_ap`` and ``d_ap + m``.
    """
    inf = float("inf")
    above_ap = torch.nextafter(d_ap, torch.full_like(d_ap, inf))
    above_margin = torch.nextafter(d_ap + margin, torch.full_like(d_ap, inf))
    return {
        "all": [("negatives", -inf, inf)],
        "hard": [("negatives", -inf, above_ap)],
        "semi-hard": [("negatives", above_ap, above_margin)],
        "easy": [("negatives", above_margin, inf)],
        "curriculum": [("negatives", above_ap, inf), ("admitted", -inf, above_ap)],
    }[mining]


@torch.no_grad()
def threshold_triplet_loss(distances: torch.Tensor, slots: PositiveSlots, negatives: torch.Tensor,
                           margin: float, mining: str, reduction: str = "mean_nonzero",
                           admitted: torch.Tensor | None = None) -> DenseTriplets:
    """Hinge triplet loss under margin-based mining, from counts below per-slot thresholds.

    For a slot with positive distance ``d_ap`` and kept negatives in ``[low, high)``, the active
    terms are the negatives in ``[low, min(high, d_ap + m))``; with ``c_s`` active negatives per
    slot and ``c_aj`` active slots per (anchor, negative), the summed terms are
    ``sum_s c_s (d_ap + m) - sum_aj c_aj d_aj``, and the weights are ``+c_s`` on the positive and
    ``-c_aj`` on the negative. ``admitted`` (curriculum) is the (n, m) mask of (anchor, negative)
    pairs whose hard triplets are kept.
    """
    n, m = distances.shape
    inf = float("inf")
    parts = {"negatives": negatives}
    if mining == "curriculum":
        parts["admitted"] = negatives & admitted
    weights = torch.zeros_like(distances)
    total = distances.new_zeros(())
    sums = {key: distances.new_zeros(()) for key in STAT_SUMS}
    for chunk in slot_chunks(slots.k, n, m):
        index, valid = slots.index[:, chunk], slots.valid[:, chunk]
        d_ap = distances.gather(1, index)
        threshold = d_ap + margin
        above_ap = torch.nextafter(d_ap, torch.full_like(d_ap, inf))
        active_per_slot = torch.zeros_like(d_ap)
        for part, low, high in mining_intervals(mining, d_ap, margin):
            candidates = _Candidates(distances, parts[part], valid)
            used, used_columns = candidates.between(low, high, columns=True)
            active, active_columns = candidates.between(low, _lower(high, threshold), columns=True)
            correct, _ = candidates.between(_upper(low, above_ap), high, columns=False)
            total += (active * threshold).sum() - _dot(active_columns, distances)
            active_per_slot += active
            weights -= active_columns
            sums["count"] += used.sum()
            sums["active"] += active.sum()
            sums["margin_violation"] += active.sum()
            sums["correct_order"] += correct.sum()
            sums["d_ap"] += (used * d_ap).sum()
            sums["d_an"] += _dot(used_columns, distances)
        weights.scatter_add_(1, index, active_per_slot)
    scale = 1 / reduce_terms(total, sums, reduction)
    weights *= scale
    return DenseTriplets(total * scale, weights, None, finish_stats(sums))


@torch.no_grad()
def nearest_farther_triplet_loss(distances: torch.Tensor, slots: PositiveSlots, negatives: torch.Tensor,
                                 margin: float, fallback: str = "easiest",
                                 reduction: str = "mean") -> DenseTriplets:
    """FaceNet's semi-hard loss: per (anchor, positive), the nearest negative farther than the positive.

    When no negative is farther, ``fallback="easiest"`` takes the anchor's farthest negative
    (TensorFlow Addons' ``triplet_semihard_loss``) and ``"skip"`` drops the pair.
    """
    if fallback not in ("easiest", "skip"):
        raise ValueError(f"unknown fallback {fallback!r}; choose 'easiest' or 'skip'")
    n, m = distances.shape
    inf = float("inf")
    candidates = distances.masked_fill(~negatives, inf)
    easiest, easiest_index = distances.masked_fill(~negatives, -inf).max(1, keepdim=True)
    has_negative = negatives.any(1, keepdim=True)
    weights = torch.zeros_like(distances)
    total = distances.new_zeros(())
    sums = {key: distances.new_zeros(()) for key in STAT_SUMS}
    for chunk in slot_chunks(slots.k, n, m):
        index = slots.index[:, chunk]
        d_ap = distances.gather(1, index)
        farther = candidates.unsqueeze(1) > d_ap.unsqueeze(2)
        nearest, nearest_index = torch.where(farther, candidates.unsqueeze(1), inf).min(2)
        has_farther = torch.isfinite(nearest)
        used = slots.valid[:, chunk] & (has_farther | has_negative if fallback == "easiest" else has_farther)
        d_an = torch.where(has_farther, nearest, easiest)
        negative_index = torch.where(has_farther, nearest_index, easiest_index)
        violation = d_ap - d_an + margin
        term, slope = hinge(violation, False)
        term, slope = torch.where(used, term, 0), torch.where(used, slope, 0)
        total += term.sum()
        for key, value in triplet_stats(d_ap, d_an, violation, term, used).items():
            sums[key] += value
        weights.scatter_add_(1, index, slope)
        weights.scatter_add_(1, negative_index, -slope)
    scale = 1 / reduce_terms(total, sums, reduction)
    weights *= scale
    return DenseTriplets(total * scale, weights, None, finish_stats(sums))
