"""Which (anchor, positive, negative) triplets count, decided from labels and a detached distance matrix.

The difficulty of a triplet, with ``d_ap = d(a, p)``, ``d_an = d(a, n)`` and margin ``m >= 0``, is
FaceNet's (Schroff et al., CVPR 2015), written once, in :data:`DIFFICULTY_BOUNDS`, and used by the
losses, their statistics and the embedding-quality metrics (:func:`triplet_difficulty`):

- hard: ``d_an < d_ap`` (the negative is closer than the positive);
- semi-hard: ``d_ap <= d_an < d_ap + m`` (farther than the positive, but inside the margin);
- easy: ``d_an >= d_ap + m`` (its hinge term ``max(d_ap - d_an + m, 0)`` is zero).

Ties: ``d_an == d_ap`` is semi-hard (easy when ``m == 0``) and ``d_an == d_ap + m`` is easy, so the
three classes partition every triplet and "easy" is exactly "no hinge loss". ``d_ap + m`` is rounded
once, as the losses compute it.

A mining strategy of the ``triplet`` loss (:data:`TRIPLET_MINING`) keeps *every* valid triplet of some
difficulties; it is not the ``batch_hard`` loss (the hardest positive and negative per anchor) nor the
``semi_hard`` loss (one FaceNet negative per anchor-positive pair).

Nothing here builds a list of every triplet. Valid triplets are described densely:
:func:`positive_slots` lists each anchor's positives in ``k`` slots (``k`` = most positives any
anchor has: ``K - 1`` in a PK batch), so a batch of triplets is an (n, k, m) boolean mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

# The one table of triplet difficulties: each is the d_an interval [low, high) between two of the
# BOUNDS, which are in ascending order for any margin >= 0 (see bound_values).
DIFFICULTIES = ("hard", "semi-hard", "easy")
BOUNDS = ("-inf", "d_ap", "d_ap+m", "inf")
DIFFICULTY_BOUNDS = {"hard": ("-inf", "d_ap"), "semi-hard": ("d_ap", "d_ap+m"), "easy": ("d_ap+m", "inf")}

# Mining strategy -> the difficulties kept among all valid triplets ("every") and, for the curriculum,
# among the triplets whose (anchor, negative) pair the curriculum admitted ("admitted").
TRIPLET_MINING: dict[str, dict[str, tuple[str, ...]]] = {
    "all": {"every": DIFFICULTIES},
    "hard-triplets": {"every": ("hard",)},
    "semi-hard-triplets": {"every": ("semi-hard",)},
    "easy-triplets": {"every": ("easy",)},
    "curriculum": {"every": ("semi-hard", "easy"), "admitted": ("hard",)},
}


def check_mining(mining: str) -> None:
    if mining not in TRIPLET_MINING:
        raise ValueError(f"unknown mining {mining!r}; choose one of {', '.join(TRIPLET_MINING)}")


def bound_values(d_ap, margin: float) -> dict[str, object]:
    """The value of each of the :data:`BOUNDS` for positive distances ``d_ap`` (a tensor or a number):
    ``d_ap + margin`` is rounded once, here, for every user of the table."""
    inf = float("inf")
    return {"-inf": -inf, "d_ap": d_ap, "d_ap+m": d_ap + margin, "inf": inf}


def triplet_difficulty(
    d_ap: torch.Tensor, d_an: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hard, semi_hard, easy)`` boolean masks of triplets with distances ``d_ap`` and ``d_an``
    (broadcast against each other) and margin ``margin >= 0``, by FaceNet's definitions (see the
    module docstring, ties included): a partition of the triplets."""
    value = bound_values(d_ap, margin)
    return tuple(
        (value[low] <= d_an) & (d_an < value[high])
        for low, high in (DIFFICULTY_BOUNDS[kind] for kind in DIFFICULTIES)
    )


def difficulty_counts(
    d_ap: torch.Tensor, sorted_d_an: torch.Tensor, margin: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(hard, semi_hard, easy)`` counts of negatives per positive distance, the sums over the
    negatives of :func:`triplet_difficulty`'s masks without building them.

    ``d_ap`` is (..., p): per anchor (the leading dimensions) the distances to its positives;
    ``sorted_d_an`` is (..., m): the anchor's negative distances, sorted ascending. Each count is the
    number of negatives in its difficulty's ``[low, high)`` interval, by binary search: O(p log m)
    per anchor.
    """
    value = bound_values(d_ap, margin)

    def below(bound: str) -> torch.Tensor:
        if bound == "-inf":
            return torch.zeros_like(d_ap, dtype=torch.long)
        if bound == "inf":
            return torch.full_like(d_ap, sorted_d_an.shape[-1], dtype=torch.long)
        return torch.searchsorted(sorted_d_an.contiguous(), value[bound].contiguous(), side="left")

    return tuple(below(high) - below(low) for low, high in (DIFFICULTY_BOUNDS[kind] for kind in DIFFICULTIES))


def mined_triplets(
    mining: str,
    d_ap: torch.Tensor,
    d_an: torch.Tensor,
    margin: float,
    valid: torch.Tensor,
    admitted: torch.Tensor | None = None,
) -> torch.Tensor:
    """The triplets a mining strategy keeps, among the ``valid`` ones (all broadcast to one shape,
    e.g. (n, k, 1) positive and (n, 1, m) negative distances); ``admitted`` is the curriculum's (n, m)
    mask of (anchor, negative) pairs whose hard triplets count."""
    check_mining(mining)
    if "admitted" in TRIPLET_MINING[mining] and admitted is None:
        raise ValueError(f"{mining} mining needs the admitted (anchor, negative) mask")
    kinds = dict(zip(DIFFICULTIES, triplet_difficulty(d_ap, d_an, margin)))
    used = torch.zeros_like(valid)
    for part, difficulties in TRIPLET_MINING[mining].items():
        keep = valid if part == "every" else valid & admitted.unsqueeze(-2)
        for kind in difficulties:
            used = used | (keep & kinds[kind])
    return used


def label_masks(
    labels: torch.Tensor, ref_labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives) boolean (n, m) masks; without ``ref_labels`` a sample is not its own
    positive."""
    other = labels if ref_labels is None else ref_labels
    same = labels.unsqueeze(1) == other.unsqueeze(0)
    negatives = ~same
    if ref_labels is None:
        same.fill_diagonal_(False)
    return same, negatives


@dataclass(frozen=True)
class PositiveSlots:
    """Each anchor's positives: ``index[a, s]`` is the s-th positive of anchor ``a`` where ``valid[a, s]``."""

    index: torch.Tensor  # (n, k) int64
    valid: torch.Tensor  # (n, k) bool

    @property
    def k(self) -> int:
        return self.index.shape[1]


def positive_slots(labels: torch.Tensor, ref_labels: torch.Tensor | None = None) -> PositiveSlots:
    """Each anchor's positives packed into (n, k) slots (one host sync to learn ``k``).

    Sorting the reference labels puts each class in one run, so an anchor's positives are the
    run of its label (without the anchor itself when there is no reference set): O(n log n + n k)
    instead of scanning an (n, m) mask.
    """
    own_batch = ref_labels is None
    labels = labels.long()
    ref = labels if own_batch else ref_labels.long()
    order = torch.argsort(ref, stable=True)
    sorted_ref = ref[order]
    start = torch.searchsorted(sorted_ref, labels)
    count = torch.searchsorted(sorted_ref, labels, right=True) - start - int(own_batch)
    k = int(count.max()) if labels.numel() and ref.numel() else 0
    slot = torch.arange(k, device=labels.device)
    position = start.unsqueeze(1) + slot
    if own_batch:  # step over the anchor's own place in the sorted order
        rank = torch.empty_like(order)
        rank[order] = torch.arange(order.numel(), device=order.device)
        position += position >= rank.unsqueeze(1)
    valid = slot < count.unsqueeze(1)
    index = order[position.clamp_max_(max(ref.numel() - 1, 0))] if k else position
    return PositiveSlots(index, valid)


def negative_mask(labels: torch.Tensor, ref_labels: torch.Tensor | None = None) -> torch.Tensor:
    """(n, m) boolean mask of the pairs with different labels."""
    return labels.unsqueeze(1) != (labels if ref_labels is None else ref_labels).unsqueeze(0)


def slot_chunks(k: int, n: int, m: int, budget: int = 1 << 24) -> Iterator[slice]:
    """Slices of the slot axis whose (n, chunk, m) tensors stay under ``budget`` elements."""
    step = max(1, budget // max(1, n * m))
    for start in range(0, k, step):
        yield slice(start, min(k, start + step))


def hardest_pairs(
    distances: torch.Tensor, positives: torch.Tensor, negatives: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-hard mining: per anchor the farthest positive and the nearest negative.

    Returns (positive index (n,), negative index (n,), valid (n,)): an anchor is valid when it has
    at least one positive and one negative.
    """
    inf = float("inf")
    farthest, positive = torch.where(positives, distances, -inf).max(1)
    nearest, negative = torch.where(negatives, distances, inf).min(1)
    return positive, negative, (farthest > -inf) & (nearest < inf)  # inf: no such pair
