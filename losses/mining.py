"""Which (anchor, positive, negative) triplets count, decided from labels and a detached distance matrix.

Nothing here builds a list of every triplet. Valid triplets are described densely:
:func:`positive_slots` lists each anchor's positives in ``k`` slots (``k`` = most positives any
anchor has: ``K - 1`` in a PK batch), so a batch of triplets is an (n, k, m) boolean mask and all
work is O(n * k * m), done in slot chunks of bounded size (:func:`slot_chunks`).

Mining rules follow pytorch-metric-learning's ``TripletMarginMiner`` tie conventions, with
``t = d(a,n) - d(a,p)``: hard ``t <= 0``, semi-hard ``0 < t <= m``, easy ``t > m`` (the
literature's strict inequalities, differing only on ties).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

TRIPLET_MINING = ("all", "hard", "semi-hard", "easy", "curriculum")

# A selection maps (d_ap (n, k, 1), d_an (n, 1, m), valid (n, k, m)) to the triplets used (n, k, m).
Selection = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def label_masks(labels: torch.Tensor, ref_labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(positives, negatives) boolean (n, m) masks; without ``ref_labels`` a sample is not its own positive."""
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


def margin_selection(mining: str, margin: float, admitted: torch.Tensor | None = None) -> Selection:
    """Triplet mining by the margin ``t = d_an - d_ap`` (PML ``TripletMarginMiner`` semantics).

    ``curriculum`` keeps every non-hard triplet and the hard ones whose (anchor, negative) pair is
    ``admitted`` (an (n, m) bool mask drawn by the curriculum).
    """
    if mining not in TRIPLET_MINING:
        raise ValueError(f"unknown mining {mining!r}; choose one of {', '.join(TRIPLET_MINING)}")
    if mining == "curriculum" and admitted is None:
        raise ValueError("curriculum mining needs the admitted (anchor, negative) mask")

    def select(d_ap: torch.Tensor, d_an: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        if mining == "all":
            return valid
        t = d_an - d_ap
        if mining == "hard":
            return valid & (t <= 0)
        if mining == "semi-hard":
            return valid & (t > 0) & (t <= margin)
        if mining == "easy":
            return valid & (t > margin)
        return valid & ((t > 0) | admitted.unsqueeze(1))

    return select


def hardest_pairs(distances: torch.Tensor, positives: torch.Tensor,
                  negatives: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batch-hard mining: per anchor the farthest positive and the nearest negative.

    Returns (positive index (n,), negative index (n,), valid (n,)): an anchor is valid when it has
    at least one positive and one negative.
    """
    inf = float("inf")
    farthest, positive = torch.where(positives, distances, -inf).max(1)
    nearest, negative = torch.where(negatives, distances, inf).min(1)
    return positive, negative, (farthest > -inf) & (nearest < inf)  # inf: no such pair
