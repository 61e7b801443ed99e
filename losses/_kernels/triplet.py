"""Fused triplet kernels: the ``triplet``/``batch_all`` loss and FaceNet's ``semi_hard`` loss.

Three engines over the k positive slots of each anchor (see :mod:`losses.mining`), none building a
list of triplets:

- :func:`threshold_triplet_loss`: hinge loss with margin-based mining. Every mining strategy keeps,
  per (anchor, positive), the negatives whose distance lies in an interval between the bounds of
  :data:`losses.mining.DIFFICULTY_BOUNDS`, so the loss is a sum of counts and distance sums below a
  few thresholds: one float compare of the (n, m) distances per slot and threshold, in blocks of
  anchors.
- :func:`nearest_farther_triplet_loss`: FaceNet's one negative per (anchor, positive), one masked row
  minimum per slot, in blocks of anchors.
- :func:`dense_triplet_loss`: any mining, soft margin and distance swap, term by term over (n, k, m)
  slot tensors.

Each returns the value and ``weights`` = d loss / d distances (an (n, m) matrix, or a few columns per
anchor for the nearest-farther engine): hinge and softplus terms are linear in the distances to first
order, so ``losses.distances.distance_sum_gradients`` (or its form for pairs,
``losses.distances.column_distance_gradients``) turns the weights into the exact gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from ..distances import (
    column_distance_gradients,
    distance_matrix,
    distance_sum_gradients,
    self_distance_sum_gradient,
    with_gradients,
)
from ..mining import (
    BOUNDS,
    DIFFICULTIES,
    DIFFICULTY_BOUNDS,
    TRIPLET_MINING,
    PositiveSlots,
    bound_values,
    mined_triplets,
    negative_mask,
    positive_slots,
    slot_chunks,
)
from ..triplet_terms import STAT_SUMS, finish_stats, hinge, reduce_terms, triplet_stats
from .workspace import Workspace


@dataclass
class DenseTriplets:
    """Loss value, gradient weights and statistics of the dense and threshold engines."""

    value: torch.Tensor
    weights: torch.Tensor  # d loss / d distances (n, m)
    swap_weights: torch.Tensor | None  # d loss / d (ref-ref distances) (m, m) when swapping
    stats: dict[str, torch.Tensor]


@dataclass
class PairTriplets:
    """Result of :func:`nearest_farther_triplet_loss`: loss value, gradient weights on a few columns
    per anchor (d loss / d distances there, zero elsewhere) and statistics."""

    value: torch.Tensor
    columns: torch.Tensor  # (n, p) int64: the columns of each anchor's pairs
    weights: torch.Tensor  # (n, p) d loss / d distances[a, columns[a]]
    distances: torch.Tensor  # (n, p) distances[a, columns[a]]
    stats: dict[str, torch.Tensor]


def triplet_loss(
    x: torch.Tensor,
    y: torch.Tensor | None,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None,
    *,
    margin: float,
    distance: str,
    mining: str,
    reduction: str,
    soft_margin: bool,
    swap: bool,
    admitted: torch.Tensor | None,
    workspace: Workspace,
) -> tuple[torch.Tensor, dict]:
    """``TripletLoss``' value (differentiable) and statistics from the prepared embeddings ``x`` and
    references ``y`` (``None``: the batch itself)."""
    with torch.no_grad():
        distances = distance_matrix(x, y, distance)
        slots, negatives = positive_slots(labels, ref_labels), negative_mask(labels, ref_labels)
        swap_distances = None
        if swap:
            swap_distances = distances if y is None else distance_matrix(y, None, distance)
    if soft_margin or swap:
        result = dense_triplet_loss(
            distances, slots, negatives, margin, mining, soft_margin, reduction, swap_distances, admitted
        )
    else:
        result = threshold_triplet_loss(
            distances, slots, negatives, margin, mining, reduction, admitted, workspace
        )
    weights = result.weights
    if y is None:
        if result.swap_weights is not None:
            weights = weights + result.swap_weights
        grad = self_distance_sum_gradient(x, weights, distance, distances)
        return with_gradients(result.value, [(x, grad)]), result.stats
    grad_x, grad_y = distance_sum_gradients(x, y, weights, distance, distances)
    pairs = [(x, grad_x), (y, grad_y)]
    if result.swap_weights is not None:
        grad_p, grad_n = distance_sum_gradients(y, y, result.swap_weights, distance, swap_distances)
        pairs += [(y, grad_p), (y, grad_n)]
    return with_gradients(result.value, pairs), result.stats


def semi_hard_loss(
    x: torch.Tensor,
    y: torch.Tensor | None,
    labels: torch.Tensor,
    ref_labels: torch.Tensor | None,
    *,
    margin: float,
    distance: str,
    fallback: str,
    reduction: str,
    workspace: Workspace,
) -> tuple[torch.Tensor, dict]:
    """``SemiHardLoss``' value (differentiable) and statistics, as :func:`triplet_loss`."""
    with torch.no_grad():
        distances = distance_matrix(x, y, distance)
        slots, negatives = positive_slots(labels, ref_labels), negative_mask(labels, ref_labels)
    result = nearest_farther_triplet_loss(distances, slots, negatives, margin, fallback, reduction, workspace)
    grad_x, grad_y = column_distance_gradients(
        x, x if y is None else y, result.columns, result.weights, result.distances, distance
    )
    return with_gradients(result.value, [(x, grad_x), (x if y is None else y, grad_y)]), result.stats


@torch.no_grad()
def dense_triplet_loss(
    distances: torch.Tensor,
    slots: PositiveSlots,
    negatives: torch.Tensor,
    margin: float,
    mining: str,
    soft_margin: bool = False,
    reduction: str = "mean_nonzero",
    swap_distances: torch.Tensor | None = None,
    admitted: torch.Tensor | None = None,
) -> DenseTriplets:
    """Triplet loss over the triplets ``mining`` keeps, from a detached (n, m) distance matrix.

    Works on (n, k, chunk) slot tensors (k = positives per anchor), never on triplet index lists.
    The loss is ``sum_ij weights_ij * d_ij`` to first order, so ``weights`` gives its exact
    gradient through :func:`losses.distances.distance_sum_gradients`. With ``swap_distances``
    (the (m, m) distances among the references) each term uses ``min(d(a,n), d(p,n))`` (mining
    still uses ``d(a,n)``).
    """
    n, m = distances.shape
    weights = torch.zeros_like(distances)
    swap_weights = None if swap_distances is None else distances.new_zeros(m, m)
    total = distances.new_zeros(())
    sums = {key: distances.new_zeros(()) for key in STAT_SUMS}
    d_an_all = distances.unsqueeze(1)
    for chunk in slot_chunks(slots.k, n, m):
        index = slots.index[:, chunk]
        d_ap = distances.gather(1, index).unsqueeze(2)
        valid = slots.valid[:, chunk].unsqueeze(2) & negatives.unsqueeze(1)
        used = mined_triplets(mining, d_ap, d_an_all, margin, valid, admitted)
        d_an = d_an_all
        if swap_distances is not None:
            d_pn = swap_distances[index]
            use_pn = d_pn < d_an
            d_an = torch.where(use_pn, d_pn, d_an)
        term, slope = hinge(d_ap - d_an + margin, soft_margin)
        term = torch.where(used, term, 0)
        slope = torch.where(used, slope, 0)
        total += term.sum()
        for key, value in triplet_stats(d_ap, d_an, margin, term, used).items():
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


def row_blocks(n: int, m: int, budget: int = 1 << 19) -> Iterator[slice]:
    """Slices of the anchor axis whose (rows, m) temporaries stay under ``budget`` elements, small
    enough to stay in cache from one pass over them to the next."""
    step = max(1, budget // max(1, m))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


def _order(bound: str) -> int:
    return BOUNDS.index(bound)


def _merged(difficulties: tuple[str, ...]) -> tuple[str, str]:
    """The ``[low, high)`` bounds of adjacent difficulties together."""
    first, last = DIFFICULTY_BOUNDS[difficulties[0]], DIFFICULTY_BOUNDS[difficulties[-1]]
    positions = [DIFFICULTIES.index(d) for d in difficulties]
    if positions != list(range(positions[0], positions[0] + len(positions))):
        raise ValueError(f"difficulties {difficulties} are not adjacent")
    return first[0], last[1]


class _Candidates:
    """The candidate negatives (``mask``) of a block of anchors, counted below per-slot bounds.

    A bound is named by :data:`losses.mining.BOUNDS`: ``-inf``/``inf`` or an (n, k) tensor of
    ``bounds`` (one distance per anchor and slot), of which the block takes its ``rows``; invalid
    slots count nothing. Work goes one slot at a time through one reused plane of float compares
    ``[d_aj < x_as]``, with ``d = +inf`` off the mask: on CPU, boolean temporaries and
    data-dependent selects cost more than float compares. Counts below each bound are computed once.
    """

    def __init__(
        self,
        distances: torch.Tensor,
        mask: torch.Tensor,
        slot_valid: torch.Tensor,
        rows: slice,
        bounds: dict[str, object],
        workspace: Workspace,
    ) -> None:
        self.rows = rows
        self.bounds = bounds
        self.distances = distances[rows]
        self.mask = mask[rows]
        infinity = distances.new_full((), float("inf"))
        self.masked = torch.where(
            self.mask, self.distances, infinity, out=workspace("masked", self.distances)
        )
        self.slot_valid = slot_valid[rows]
        self.plane = workspace("plane", self.distances)
        self.memo: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _slot_thresholds(self, bound: str) -> list[torch.Tensor]:
        """The (rows, 1) threshold column of each slot, -inf on invalid slots."""
        masked = torch.where(self.slot_valid, self.bounds[bound][self.rows], float("-inf"))
        return [masked[:, s : s + 1] for s in range(masked.shape[1])]

    def _slot_zeros(self) -> torch.Tensor:
        return torch.zeros(self.slot_valid.shape, dtype=self.distances.dtype, device=self.distances.device)

    def below(self, bound: str, sums: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per (anchor, slot): the count of candidates ``< bound`` and, when ``sums``, the sum of
        their distances (``None`` otherwise: only ask for what is used)."""
        seen = self.memo.get(bound)
        if seen is not None and (seen[1] is not None or not sums):
            return seen
        if bound == "-inf":
            counts = distance_sums = self._slot_zeros()
        elif bound == "inf":
            valid = self.slot_valid.to(self.distances.dtype)
            mask = self.plane.copy_(self.mask)
            counts = valid * mask.sum(1, keepdim=True)
            distance_sums = valid * torch.mul(mask, self.distances, out=self.plane).sum(1, keepdim=True)
        else:
            counts = self._slot_zeros()
            distance_sums = self._slot_zeros() if sums else None
            for s, column in enumerate(self._slot_thresholds(bound)):
                plane = torch.lt(self.masked, column, out=self.plane)
                counts[:, s] = plane.sum(1)
                if sums:
                    distance_sums[:, s] = torch.mul(plane, self.distances, out=self.plane).sum(1)
        self.memo[bound] = (counts, distance_sums)
        return counts, distance_sums

    def between(self, low: str, high: str, sums: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`below` for the candidates in ``[low, high)`` (empty unless ``low < high``)."""
        if _order(high) <= _order(low):
            return self.below("-inf", sums)
        upper_counts, upper_sums = self.below(high, sums)
        if low == "-inf":
            return upper_counts, upper_sums
        lower_counts, lower_sums = self.below(low, sums)
        return upper_counts - lower_counts, upper_sums - lower_sums if sums else None

    def _add_columns_below(self, bound: str, columns: torch.Tensor, sign: float) -> torch.Tensor:
        """Add ``sign`` times each candidate's number of slots with ``d < bound`` to ``columns``;
        return the per-slot counts of candidates ``< bound``."""
        counts = self._slot_zeros()
        for s, column in enumerate(self._slot_thresholds(bound)):
            plane = torch.lt(self.masked, column, out=self.plane)
            counts[:, s] = plane.sum(1)
            columns.add_(plane, alpha=sign)
        return counts

    def subtract_columns(self, low: str, high: str, columns: torch.Tensor) -> torch.Tensor:
        """Subtract from ``columns`` (rows, m) the number of slots whose ``[low, high)`` holds each
        candidate (``high`` a tensor bound); return the per-slot counts of candidates in ``[low, high)``."""
        if _order(high) <= _order(low):
            return self._slot_zeros()
        counts = self._add_columns_below(high, columns, -1.0)
        if low == "-inf":
            return counts
        return counts - self._add_columns_below(low, columns, 1.0)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum()`` without an (n, m) temporary."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def triplet_intervals(low: str, high: str) -> tuple[tuple[str, str], tuple[str, str], tuple[str, str]]:
    """The (used, active, correct) intervals of the negatives kept in ``[low, high)``: all of them,
    those not easy (``d < d_ap + m``: a non-zero hinge) and those not hard (``d >= d_ap``)."""
    active_high = min(high, "d_ap+m", key=_order)
    correct_low = max(low, "d_ap", key=_order)
    return (low, high), (low, active_high), (correct_low, high)


def _block_counts(
    distances: torch.Tensor,
    slot_valid: torch.Tensor,
    rows: slice,
    intervals: list,
    bounds: dict[str, object],
    weights: torch.Tensor,
    workspace: Workspace,
) -> torch.Tensor:
    """Per (anchor, slot) of one block of anchors, stacked: used negatives, the sum of their
    distances, those not hard and the active ones; each negative's number of active slots is
    subtracted from ``weights``."""
    counts = 0
    for mask, used_interval, active_interval, correct_interval in intervals:
        candidates = _Candidates(distances, mask, slot_valid, rows, bounds, workspace)
        used, used_distances = candidates.between(*used_interval, sums=True)
        correct, _ = candidates.between(*correct_interval)
        active = candidates.subtract_columns(*active_interval, weights[rows])
        counts = counts + torch.stack([used, used_distances, correct, active])
    return counts


@torch.no_grad()
def threshold_triplet_loss(
    distances: torch.Tensor,
    slots: PositiveSlots,
    negatives: torch.Tensor,
    margin: float,
    mining: str,
    reduction: str = "mean_nonzero",
    admitted: torch.Tensor | None = None,
    workspace: Workspace | None = None,
) -> DenseTriplets:
    """Hinge triplet loss under margin-based mining, from counts below per-slot thresholds.

    For a slot with positive distance ``d_ap`` and kept negatives in ``[low, high)``, the active
    terms are the negatives in ``[low, min(high, d_ap + m))``; with ``c_s`` active negatives per
    slot and ``c_aj`` active slots per (anchor, negative), the summed terms are
    ``sum_s c_s (d_ap + m) - sum_aj c_aj d_aj``, and the weights are ``+c_s`` on the positive and
    ``-c_aj`` on the negative. ``admitted`` (curriculum) is the (n, m) mask of (anchor, negative)
    pairs whose hard triplets are kept. O(n k m) time; memory O(n m) for the weights and small
    blocks of anchors otherwise, all in ``workspace`` when given (the weights are then valid until
    its next use).
    """
    n, m = distances.shape
    workspace = Workspace() if workspace is None else workspace
    parts = {"every": negatives}
    if "admitted" in TRIPLET_MINING[mining]:
        parts["admitted"] = negatives & admitted
    index = slots.index
    d_ap = distances.gather(1, index)
    bounds = bound_values(d_ap, margin)
    intervals = [
        (parts[part], *triplet_intervals(*_merged(difficulties)))
        for part, difficulties in TRIPLET_MINING[mining].items()
    ]
    counts = distances.new_zeros(4, *index.shape)
    weights = workspace("weights", distances).zero_()
    total = distances.new_zeros(())
    for rows in row_blocks(n, m):
        counts[:, rows] += _block_counts(distances, slots.valid, rows, intervals, bounds, weights, workspace)
        total += _dot(weights[rows], distances[rows])
    used, used_distances, correct, active = counts
    total += (active * bounds["d_ap+m"]).sum()
    weights.scatter_add_(1, index, active)
    count, d_an, correct_order, active_count = counts.sum((1, 2))
    sums = {
        "count": count,
        "active": active_count,
        "correct_order": correct_order,
        "margin_violation": active_count,
        "d_ap": _dot(used, d_ap),
        "d_an": d_an,
    }
    scale = 1 / reduce_terms(total, sums, reduction)
    weights *= scale
    return DenseTriplets(total * scale, weights, None, finish_stats(sums))


def nearest_farther(
    candidates: torch.Tensor, thresholds: torch.Tensor, plane: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per (anchor, slot): the smallest candidate distance ``> thresholds`` (+inf if none) and its
    column, the first one on ties (as ``min``).

    ``candidates`` (n, m) holds +inf off the candidates. One slot at a time through ``plane``, a
    scratch tensor of its shape, without a boolean mask (on CPU a data-dependent select costs
    several times more): ``copysign(inf, x - d)`` is -inf exactly where ``d > x``
    (``x - d`` is +0 on ties, and ``x + 0.0`` has no -0.0), so ``maximum(d, .)`` keeps those
    distances and turns the others into +inf.
    """
    infinity = candidates.new_full((), float("inf"))
    thresholds = thresholds + 0.0
    nearest = torch.empty_like(thresholds)
    nearest_index = torch.empty_like(thresholds, dtype=torch.long)
    for s in range(thresholds.shape[1]):
        torch.sub(thresholds[:, s : s + 1], candidates, out=plane)
        torch.copysign(infinity, plane, out=plane)
        nearest[:, s], nearest_index[:, s] = torch.maximum(candidates, plane, out=plane).min(1)
    return nearest, nearest_index


@torch.no_grad()
def nearest_farther_triplet_loss(
    distances: torch.Tensor,
    slots: PositiveSlots,
    negatives: torch.Tensor,
    margin: float,
    fallback: str = "easiest",
    reduction: str = "mean",
    workspace: Workspace | None = None,
) -> PairTriplets:
    """FaceNet's semi-hard loss: per (anchor, positive), the nearest negative that is not hard
    (``d_an >= d_ap``, :func:`losses.mining.triplet_difficulty`).

    When there is none, ``fallback="easiest"`` takes the anchor's farthest negative (TensorFlow
    Addons' ``triplet_semihard_loss``) and ``"skip"`` drops the pair. The weights sit on 2 k columns
    per anchor (each slot's positive and negative), so the gradient needs no (n, m) matrix.
    O(n k m) time; O(n k) memory besides small blocks of anchors, in ``workspace`` when given.
    """
    n, m = distances.shape
    workspace = Workspace() if workspace is None else workspace
    inf = float("inf")
    minus_infinity = distances.new_full((), -inf)
    index = slots.index
    d_ap = distances.gather(1, index)
    # d_an >= d_ap is d_an > the float below d_ap
    below_ap = torch.nextafter(d_ap, torch.full_like(d_ap, -inf))
    easiest, easiest_index = distances.new_empty(n, 1), index.new_empty(n, 1)
    nearest, nearest_index = torch.empty_like(d_ap), torch.empty_like(index)
    for rows in row_blocks(n, m):
        block = distances[rows]
        farthest = torch.where(negatives[rows], block, minus_infinity, out=workspace("candidates", block))
        easiest[rows], easiest_index[rows] = farthest.max(1, keepdim=True)
        candidates = farthest.nan_to_num_(nan=float("nan"), posinf=inf, neginf=inf)  # +inf off the negatives
        nearest[rows], nearest_index[rows] = nearest_farther(
            candidates, below_ap[rows], workspace("plane", block)
        )
    has_negative = easiest > -inf  # the farthest negative is -inf only where there is none
    has_farther = torch.isfinite(nearest)
    used = slots.valid & (has_farther | has_negative if fallback == "easiest" else has_farther)
    d_an = torch.where(has_farther, nearest, easiest)
    negative_index = torch.where(has_farther, nearest_index, easiest_index)
    term, slope = hinge(d_ap - d_an + margin, False)
    term, slope = torch.where(used, term, 0), torch.where(used, slope, 0)
    sums = triplet_stats(d_ap, d_an, margin, term, used)
    total = term.sum()
    scale = 1 / reduce_terms(total, sums, reduction)
    return PairTriplets(
        total * scale,
        torch.cat([index, negative_index], 1),
        torch.cat([slope, -slope], 1) * scale,
        torch.cat([d_ap, d_an], 1),
        finish_stats(sums),
    )
