"""What the triplet-type losses share: the hinge, the reductions and the training statistics.

Every statistic classifies triplets with :func:`losses.mining.triplet_difficulty`: a used triplet is
in *correct order* when it is not hard (``d_an >= d_ap``) and *violates the margin* when it is not
easy (``d_an < d_ap + m``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .mining import triplet_difficulty

REDUCTIONS = ("mean_nonzero", "mean")
STAT_SUMS = ("count", "active", "correct_order", "margin_violation", "d_ap", "d_an")


def check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {', '.join(REDUCTIONS)}")


def hinge(violation: torch.Tensor, soft_margin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss term, its derivative) of the hinge ``max(v, 0)`` or the soft margin ``softplus(v)``."""
    if soft_margin:
        return F.softplus(violation), torch.sigmoid(violation)
    return violation.clamp_min(0), (violation > 0).to(violation.dtype)


def triplet_stats(d_ap, d_an, margin: float, term, used) -> dict[str, torch.Tensor]:
    """The five ``STAT_NAMES`` summed over ``used`` triplets (counts and sums, not yet averaged)."""
    hard, _, easy = triplet_difficulty(d_ap, d_an, margin)
    return {
        "count": used.sum(),
        "active": (used & (term > 0)).sum(),
        "correct_order": (used & ~hard).sum(),
        "margin_violation": (used & ~easy).sum(),
        "d_ap": torch.where(used, d_ap, 0).sum(),
        "d_an": torch.where(used, d_an, 0).sum(),
    }


def finish_stats(sums: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``STAT_NAMES`` statistics: :func:`triplet_stats`' sums over the number of used triplets."""
    count = sums["count"].clamp_min(1).to(sums["d_ap"].dtype)
    return {
        "active_fraction": sums["active"] / count,
        "correct_order_fraction": sums["correct_order"] / count,
        "margin_violation_fraction": sums["margin_violation"] / count,
        "mean_d_ap": sums["d_ap"] / count,
        "mean_d_an": sums["d_an"] / count,
    }


def reduce_terms(total: torch.Tensor, sums: dict[str, torch.Tensor], reduction: str) -> torch.Tensor:
    """The divisor of the summed terms: number of non-zero terms (``mean_nonzero``) or of used
    triplets (``mean``), at least 1."""
    check_reduction(reduction)
    denominator = sums["active"] if reduction == "mean_nonzero" else sums["count"]
    return denominator.clamp_min(1).to(total.dtype)
