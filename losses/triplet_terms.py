"""Triplet terms from a detached distance matrix: loss value, gradient weights and statistics.

Three engines over the k positive slots of each anchor (see :mod:`losses.mining`), none building
a list of triplets:

- :func:`threshold_triplet_loss`: hinge loss with margin-based mining. Every mining rule keeps, per
  (anchor, positive), the negatives whose distance lies in an interval, so the loss is a sum of
  counts and distance sums below a few thresholds: one float compare of the (n, m) distances per
  slot and threshold, in blocks of anchors.
- :func:`nearest_farther_triplet_loss`: FaceNet's one negative per (anchor, positive), one masked
  row minimum per slot, in blocks of anchors.
- :func:`dense_triplet_loss`: any selection, soft margin and distance swap, term by term over
  (n, k, m) slot tensors.

Each returns the value and ``weights`` = d loss / d distances (an (n, m) matrix, or a few columns per
anchor for the nearest-farther engine): hinge and softplus terms are linear in the distances to first
order, so ``losses.distances.distance_sum_gradients`` (or its form for pairs,
``losses.distances.column_distance_gradients``) turns the weights into the exact gradient.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from .mining import PositiveSlots, Selection, slot_chunks
from .workspace import Workspace

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


@dataclass
class PairTriplets:
    """Result of :func:`nearest_farther_triplet_loss`: loss value, gradient weights on a few columns
    per anchor (d loss / d distances there, zero elsewhere) and statistics."""

    value: torch.Tensor
    columns: torch.Tensor  # (n, p) int64: the columns of each anchor's pairs
    weights: torch.Tensor  # (n, p) d loss / d distances[a, columns[a]]
    distances: torch.Tensor  # (n, p) distances[a, columns[a]]
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


def row_blocks(n: int, m: int, budget: int = 1 << 19) -> Iterator[slice]:
    """Slices of the anchor axis whose (rows, m) temporaries stay under ``budget`` elements, small
    enough to stay in cache from one pass over them to the next."""
    step = max(1, budget // max(1, m))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


class _Candidates:
    """The candidate negatives (``mask``) of a block of anchors, counted below per-slot thresholds.

    A threshold is an (n, k) tensor, one distance per (anchor, slot), of which the block takes its
    ``rows``, or -inf/+inf; invalid slots count nothing. Work goes one slot at a time through one
    reused plane of float compares ``[d_aj < x_as]``, with ``d = +inf`` off the mask: on CPU,
    boolean temporaries and data-dependent selects cost more than float compares.
    """

    def __init__(self, distances: torch.Tensor, mask: torch.Tensor, slot_valid: torch.Tensor, rows: slice,
                 workspace: Workspace) -> None:
        self.rows = rows
        self.distances = distances[rows]
        self.mask = mask[rows]
        infinity = distances.new_full((), float("inf"))
        self.masked = torch.where(self.mask, self.distances, infinity, out=workspace("masked", self.distances))
        self.slot_valid = slot_valid[rows]
        self.plane = workspace("plane", self.distances)
        self.memo: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self.all_candidates: tuple[torch.Tensor, torch.Tensor] | None = None

    def _slot_thresholds(self, threshold: torch.Tensor) -> list[torch.Tensor]:
        """The (rows, 1) threshold column of each slot, -inf on invalid slots."""
        masked = torch.where(self.slot_valid, threshold[self.rows], float("-inf"))
        return [masked[:, s:s + 1] for s in range(masked.shape[1])]

    def _slot_zeros(self) -> torch.Tensor:
        return torch.zeros(self.slot_valid.shape, dtype=self.distances.dtype, device=self.distances.device)

    def _everything(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per (anchor, slot): the count of all candidates and the sum of their distances."""
        if self.all_candidates is None:
            valid = self.slot_valid.to(self.distances.dtype)
            mask = self.plane.copy_(self.mask)
            counts = valid * mask.sum(1, keepdim=True)
            distance_sums = valid * torch.mul(mask, self.distances, out=self.plane).sum(1, keepdim=True)
            self.all_candidates = (counts, distance_sums)
        return self.all_candidates

    def below(self, threshold, sums: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per (anchor, slot): the count of candidates ``< threshold`` and, when ``sums``, the sum of
        their distances (``None`` otherwise: only ask for what is used)."""
        if isinstance(threshold, float):
            counts, distance_sums = self._everything() if threshold > 0 else (self._slot_zeros(),) * 2
            return counts, distance_sums if sums else None
        seen = self.memo.get(id(threshold))
        if seen is not None and (seen[2] is not None or not sums):
            return seen[1], seen[2]
        counts = self._slot_zeros()
        distance_sums = self._slot_zeros() if sums else None
        for s, column in enumerate(self._slot_thresholds(threshold)):
            plane = torch.lt(self.masked, column, out=self.plane)
            counts[:, s] = plane.sum(1)
            if sums:
                distance_sums[:, s] = torch.mul(plane, self.distances, out=self.plane).sum(1)
        self.memo[id(threshold)] = (threshold, counts, distance_sums)
        return counts, distance_sums

    def between(self, low, high, sums: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`below` for the candidates in ``[low, high)``, where ``high >= low`` and ``low`` is
        a tensor or -inf."""
        if low is high:
            return self.below(float("-inf"), sums)
        if isinstance(low, float):
            return self.below(high, sums)
        upper_counts, upper_sums = self.below(high, sums)
        lower_counts, lower_sums = self.below(low, sums)
        return upper_counts - lower_counts, upper_sums - lower_sums if sums else None

    def _add_columns_below(self, threshold: torch.Tensor, columns: torch.Tensor, sign: float) -> torch.Tensor:
        """Add ``sign`` times each candidate's number of slots with ``d < threshold`` to ``columns``;
        return the per-slot counts of candidates ``< threshold``."""
        counts = self._slot_zeros()
        for s, column in enumerate(self._slot_thresholds(threshold)):
            plane = torch.lt(self.masked, column, out=self.plane)
            counts[:, s] = plane.sum(1)
            columns.add_(plane, alpha=sign)
        return counts

    def subtract_columns(self, low, high: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
        """Subtract from ``columns`` (rows, m) the number of slots whose ``[low, high)`` holds each
        candidate; return the per-slot counts of candidates in ``[low, high)`` (``high >= low``,
        ``low`` a tensor or -inf)."""
        counts = self._add_columns_below(high, columns, -1.0)
        if isinstance(low, float):
            return counts
        return counts - self._add_columns_below(low, columns, 1.0)


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum()`` without an (n, m) temporary."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


def _lower(a, b):
    """min of two bounds, each a tensor or -inf/+inf."""
    if a is b:
        return a
    if isinstance(a, float):
        return b if a > 0 else a
    if isinstance(b, float):
        return a if b > 0 else b
    return torch.minimum(a, b)


def _upper(a, b):
    """max of two bounds, each a tensor or -inf/+inf."""
    if a is b:
        return a
    if isinstance(a, float):
        return b if a < 0 else a
    if isinstance(b, float):
        return a if b < 0 else b
    return torch.maximum(a, b)


def next_up(x: torch.Tensor) -> torch.Tensor:
    """The next float above each element: ``d < next_up(x)`` is ``d <= x``."""
    return torch.nextafter(x, torch.full_like(x, float("inf")))


def mining_intervals(mining: str, above_ap: torch.Tensor,
                     above_margin: torch.Tensor) -> list[tuple[str, object, object]]:
    """The negatives each mining rule keeps, as ``[low, high)`` distance intervals per slot.

    ``above_ap`` and ``above_margin`` are :func:`next_up` of ``d_ap`` and ``d_ap + m``. Returns
    ``(part, low, high)`` items: ``part`` is ``"negatives"`` or, for the curriculum's hard triplets,
    ``"admitted"``. Closed bounds use the next float up, so the rules are exactly PML's ``t <= 0``
    (hard), ``0 < t <= m`` (semi-hard), ``t > m`` (easy) up to rounding of ``t = d_an - d_ap``
    versus ``d_an`` compared with ``d_ap`` and ``d_ap + m``.
    """
    inf = float("inf")
    return {
        "all": [("negatives", -inf, inf)],
        "hard": [("negatives", -inf, above_ap)],
        "semi-hard": [("negatives", above_ap, above_margin)],
        "easy": [("negatives", above_margin, inf)],
        "curriculum": [("negatives", above_ap, inf), ("admitted", -inf, above_ap)],
    }[mining]


def triplet_intervals(low, high, threshold: torch.Tensor, above_ap: torch.Tensor):
    """The (used, active, correct) intervals ``[low, high)`` of one mining interval: all its
    negatives, those inside the margin (``d < d_ap + m``), those farther than the positive.

    Every upper bound is raised to its lower bound (an empty interval, not a negative count), and
    a bound is the same object wherever it is the same value, so counts below it are reused.
    """
    used = (low, _upper(high, low))
    active = (low, _upper(_lower(high, threshold), low))
    correct_low = _upper(low, above_ap)
    correct = used if correct_low is low else (correct_low, _upper(high, correct_low))
    return used, active, correct


def _block_counts(distances: torch.Tensor, slot_valid: torch.Tensor, rows: slice, intervals: list,
                  weights: torch.Tensor, workspace: Workspace) -> torch.Tensor:
    """Per (anchor, slot) of one block of anchors, stacked: used negatives, the sum of their
    distances, those farther than the positive and the active ones; each negative's number of
    active slots is subtracted from ``weights``."""
    counts = 0
    for mask, used_interval, active_interval, correct_interval in intervals:
        candidates = _Candidates(distances, mask, slot_valid, rows, workspace)
        used, used_distances = candidates.between(*used_interval, sums=True)
        correct, _ = candidates.between(*correct_interval)
        active = candidates.subtract_columns(*active_interval, weights[rows])
        counts = counts + torch.stack([used, used_distances, correct, active])
    return counts


@torch.no_grad()
def threshold_triplet_loss(distances: torch.Tensor, slots: PositiveSlots, negatives: torch.Tensor,
                           margin: float, mining: str, reduction: str = "mean_nonzero",
                           admitted: torch.Tensor | None = None, workspace: Workspace | None = None) -> DenseTriplets:
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
    parts = {"negatives": negatives}
    if mining == "curriculum":
        parts["admitted"] = negatives & admitted
    index = slots.index
    d_ap = distances.gather(1, index)
    threshold = d_ap + margin
    above_ap = next_up(d_ap)
    intervals = [(parts[part], *triplet_intervals(low, high, threshold, above_ap))
                 for part, low, high in mining_intervals(mining, above_ap, next_up(threshold))]
    counts = distances.new_zeros(4, *index.shape)
    weights = workspace("weights", distances).zero_()
    total = distances.new_zeros(())
    for rows in row_blocks(n, m):
        counts[:, rows] += _block_counts(distances, slots.valid, rows, intervals, weights, workspace)
        total += _dot(weights[rows], distances[rows])
    used, used_distances, correct, active = counts
    total += (active * threshold).sum()
    weights.scatter_add_(1, index, active)
    count, d_an, correct_order, active_count = counts.sum((1, 2))
    sums = {"count": count, "active": active_count, "correct_order": correct_order,
            "margin_violation": active_count, "d_ap": _dot(used, d_ap), "d_an": d_an}
    scale = 1 / reduce_terms(total, sums, reduction)
    weights *= scale
    return DenseTriplets(total * scale, weights, None, finish_stats(sums))


def nearest_farther(candidates: torch.Tensor, thresholds: torch.Tensor,
                    plane: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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
        torch.sub(thresholds[:, s:s + 1], candidates, out=plane)
        torch.copysign(infinity, plane, out=plane)
        nearest[:, s], nearest_index[:, s] = torch.maximum(candidates, plane, out=plane).min(1)
    return nearest, nearest_index


@torch.no_grad()
def nearest_farther_triplet_loss(distances: torch.Tensor, slots: PositiveSlots, negatives: torch.Tensor,
                                 margin: float, fallback: str = "easiest", reduction: str = "mean",
                                 workspace: Workspace | None = None) -> PairTriplets:
    """FaceNet's semi-hard loss: per (anchor, positive), the nearest negative farther than the positive.

    When no negative is farther, ``fallback="easiest"`` takes the anchor's farthest negative
    (TensorFlow Addons' ``triplet_semihard_loss``) and ``"skip"`` drops the pair. The weights sit on
    2 k columns per anchor (each slot's positive and negative), so the gradient needs no (n, m) matrix.
    O(n k m) time; O(n k) memory besides small blocks of anchors, in ``workspace`` when given.
    """
    if fallback not in ("easiest", "skip"):
        raise ValueError(f"unknown fallback {fallback!r}; choose 'easiest' or 'skip'")
    n, m = distances.shape
    workspace = Workspace() if workspace is None else workspace
    inf = float("inf")
    minus_infinity = distances.new_full((), -inf)
    index = slots.index
    d_ap = distances.gather(1, index)
    easiest, easiest_index = distances.new_empty(n, 1), index.new_empty(n, 1)
    nearest, nearest_index = torch.empty_like(d_ap), torch.empty_like(index)
    for rows in row_blocks(n, m):
        block = distances[rows]
        farthest = torch.where(negatives[rows], block, minus_infinity, out=workspace("candidates", block))
        easiest[rows], easiest_index[rows] = farthest.max(1, keepdim=True)
        candidates = farthest.nan_to_num_(nan=float("nan"), posinf=inf, neginf=inf)  # +inf off the negatives
        nearest[rows], nearest_index[rows] = nearest_farther(candidates, d_ap[rows], workspace("plane", block))
    has_negative = easiest > -inf  # the farthest negative is -inf only where there is none
    has_farther = torch.isfinite(nearest)
    used = slots.valid & (has_farther | has_negative if fallback == "easiest" else has_farther)
    d_an = torch.where(has_farther, nearest, easiest)
    negative_index = torch.where(has_farther, nearest_index, easiest_index)
    violation = d_ap - d_an + margin
    term, slope = hinge(violation, False)
    term, slope = torch.where(used, term, 0), torch.where(used, slope, 0)
    sums = triplet_stats(d_ap, d_an, violation, term, used)
    total = term.sum()
    scale = 1 / reduce_terms(total, sums, reduction)
    return PairTriplets(total * scale, torch.cat([index, negative_index], 1), torch.cat([slope, -slope], 1) * scale,
                        torch.cat([d_ap, d_an], 1), finish_stats(sums))
