"""What the pair-based losses (Multi-Similarity, Circle) share: cosine similarities and statistics."""

from __future__ import annotations

import torch

from .distances import prepare_embeddings


def cosine_similarities(embeddings: torch.Tensor, ref_embeddings: torch.Tensor | None) -> torch.Tensor:
    """(n, m) cosine similarities of the batch against the references (``None``: itself), in float32
    at least: the losses' exponentials need more range than float16/bfloat16 have."""
    x = prepare_embeddings(embeddings, "cosine", True)
    y = x if ref_embeddings is None else prepare_embeddings(ref_embeddings, "cosine", True)
    return x @ y.T


def log1p_sum_exp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row, ``log(1 + sum over the mask of exp(logits))``, computed stably."""
    masked = logits.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(torch.cat([logits.new_zeros(logits.shape[0], 1), masked], 1), 1)


@torch.no_grad()
def pair_stats(
    s: torch.Tensor,
    positive: torch.Tensor,
    negative: torch.Tensor,
    active: torch.Tensor,
    violating: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The ``STAT_NAMES`` statistics of a pair-based loss on similarities ``s``.

    - ``active_fraction``: pairs in ``active`` (carrying loss weight) over all valid pairs;
    - ``margin_violation_fraction``: pairs in ``violating`` (on the wrong side of the loss's
      decision boundary) over all valid pairs;
    - ``mean_d_ap`` / ``mean_d_an``: mean cosine distance ``1 - s`` of positive / negative pairs;
    - ``correct_order_fraction``: among anchors with a positive and a negative, the fraction whose
      least similar positive is more similar than their most similar negative.
    """
    n_positive, n_negative = positive.sum(), negative.sum()
    hardest_pos = torch.where(positive, s, float("inf")).amin(1)
    hardest_neg = torch.where(negative, s, float("-inf")).amax(1)
    has_both = positive.any(1) & negative.any(1)
    n_valid = (n_positive + n_negative).clamp_min(1)
    return {
        "active_fraction": ((active & (positive | negative)).sum() / n_valid).to(s.dtype),
        "correct_order_fraction": (has_both & (hardest_pos > hardest_neg)).sum()
        / has_both.sum().clamp_min(1),
        "margin_violation_fraction": ((violating & (positive | negative)).sum() / n_valid).to(s.dtype),
        "mean_d_ap": 1 - torch.where(positive, s, 0).sum() / n_positive.clamp_min(1),
        "mean_d_an": 1 - torch.where(negative, s, 0).sum() / n_negative.clamp_min(1),
    }
