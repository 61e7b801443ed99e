"""What the cross-modal losses share: the pairing of rows across modalities and the statistics."""

from __future__ import annotations

import torch

from .mining import triplet_difficulty

DIRECTIONS = ("both", "a_to_b", "b_to_a")


def check_pairing(emb_a: torch.Tensor, emb_b: torch.Tensor) -> None:
    """Raise ``ValueError`` unless A and B have as many rows (row i of A is paired with row i of B)."""
    if emb_a.shape[0] != emb_b.shape[0]:
        raise ValueError(
            f"cross-modal losses pair row i of A with row i of B, but A has {emb_a.shape[0]} rows and "
            f"B has {emb_b.shape[0]}; pass aligned pairs of equal length"
        )


def paired_positives(
    labels: torch.Tensor,
    emb_a: torch.Tensor,
    emb_b: torch.Tensor,
    labels_b: torch.Tensor,
    label_positives: bool,
) -> torch.Tensor:
    """(n, n) boolean mask of positive A/B pairs: the diagonal, plus same-label pairs if asked."""
    check_pairing(emb_a, emb_b)
    positive = torch.eye(emb_a.shape[0], dtype=torch.bool, device=emb_a.device)
    if label_positives:
        positive = positive | (labels[:, None] == labels_b[None, :])
    return positive


def directions(matrix: torch.Tensor, positive: torch.Tensor, direction: str):
    """(anchor x candidate) matrices and masks for the requested directions, and whether each is the
    transpose of ``matrix``: A->B anchors are rows, B->A anchors are columns."""
    if direction in ("both", "a_to_b"):
        yield matrix, positive, False
    if direction in ("both", "b_to_a"):
        yield matrix.T, positive.T, True


@torch.no_grad()
def order_stats(hardest_pos: torch.Tensor, hardest_neg: torch.Tensor, margin: float):
    """Counts of anchors (with a positive and a negative) whose hardest triplet is not hard
    (hardest negative no closer than the hardest positive), of those whose hardest triplet is not
    easy (hardest negative within ``margin`` of it; :func:`losses.mining.triplet_difficulty`), and of
    anchors."""
    counted = torch.isfinite(hardest_pos) & torch.isfinite(hardest_neg)
    hard, _, easy = triplet_difficulty(hardest_pos, hardest_neg, margin)
    return (
        torch.count_nonzero(counted & ~hard),
        torch.count_nonzero(counted & ~easy),
        torch.count_nonzero(counted),
    )


@torch.no_grad()
def pair_means(values: torch.Tensor, positive: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of ``values`` over the positive and over the negative pairs."""
    n_pos = torch.count_nonzero(positive)
    pos_sum = torch.where(positive, values, 0).sum()
    return pos_sum / n_pos.clamp_min(1), (values.sum() - pos_sum) / (positive.numel() - n_pos).clamp_min(1)


def triplet_counts_stats(active, terms, ordered, violated, anchors, mean_d_ap, mean_d_an) -> dict:
    """The ``STAT_NAMES`` statistics from counts pooled over both directions: ``active`` non-zero
    terms of ``terms``, ``ordered`` and ``violated`` anchors (:func:`order_stats`) of ``anchors``."""
    return {
        "active_fraction": active / terms.clamp_min(1),
        "correct_order_fraction": ordered / anchors.clamp_min(1),
        "margin_violation_fraction": violated / anchors.clamp_min(1),
        "mean_d_ap": mean_d_ap,
        "mean_d_an": mean_d_an,
    }


@torch.no_grad()
def info_nce_stats(s: torch.Tensor, positive: torch.Tensor, temperature: float) -> dict:
    """``SymmetricInfoNCELoss``' statistics from the similarities ``s`` (see its docstring)."""
    pos_s, neg_s = s.masked_fill(~positive, float("inf")), s.masked_fill(positive, float("-inf"))
    active = ordered = violated = anchors = 0
    for dim in (1, 0):  # A->B anchors are rows, B->A anchors are columns
        weakest_pos, strongest_neg = pos_s.amin(dim), neg_s.amax(dim)
        order, violation, counted = order_stats(-weakest_pos, -strongest_neg, temperature)
        near = neg_s > (weakest_pos - temperature).unsqueeze(dim)
        active, ordered = active + torch.count_nonzero(near), ordered + order
        violated, anchors = violated + violation, anchors + counted
    mean_s_ap, mean_s_an = pair_means(s, positive)
    n_neg = 2 * (positive.numel() - torch.count_nonzero(positive))
    return similarity_stats(active / n_neg.clamp_min(1), ordered, violated, anchors, mean_s_ap, mean_s_an)


def similarity_stats(active_fraction, ordered, violated, anchors, mean_s_ap, mean_s_an) -> dict:
    """The ``STAT_NAMES`` statistics of a similarity-based loss from pooled anchor counts
    (:func:`order_stats` on negated similarities) and the mean positive and negative similarity."""
    return {
        "active_fraction": active_fraction,
        "correct_order_fraction": ordered / anchors.clamp_min(1),
        "margin_violation_fraction": violated / anchors.clamp_min(1),
        "mean_d_ap": 1 - mean_s_ap,
        "mean_d_an": 1 - mean_s_an,
    }
