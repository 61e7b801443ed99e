"""Positive / negative pair masks and the training statistics shared by the pair-based losses.

Pair-based losses (Multi-Similarity, Circle) score every (anchor, candidate) pair of a cosine
similarity matrix ``sim``; candidates are the batch itself or a reference set. Statistics use the
cosine distance ``1 - sim`` so they read like the triplet losses' ``mean_d_ap`` / ``mean_d_an``.
"""
from __future__ import annotations

import torch


def pair_masks(labels: torch.Tensor, ref_labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean (n, m) masks of positive and negative pairs.

    Without a reference set a sample is not its own positive (the diagonal is excluded); with one,
    every reference row of the same label is a positive, as in pytorch-metric-learning.
    """
    same = labels[:, None] == (labels if ref_labels is None else ref_labels)[None, :]
    if ref_labels is None:
        same.fill_diagonal_(False)
        negative = ~same
        negative.fill_diagonal_(False)
    else:
        negative = ~same
    return same, negative


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp_min(1)


def similarity_pair_stats(sim: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                          active: torch.Tensor, violating: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``STAT_NAMES`` statistics of a pair-based loss on a cosine similarity matrix.

    - ``active_fraction``: pairs flagged ``active`` (carrying loss weight) over all valid pairs;
    - ``margin_violation_fraction``: pairs flagged ``violating`` (on the wrong side of the loss's
      decision boundary) over all valid pairs;
    - ``mean_d_ap`` / ``mean_d_an``: mean cosine distance ``1 - sim`` of positive / negative pairs;
    - ``correct_order_fraction``: among anchors with a positive and a negative, the fraction whose
      hardest (least similar) positive is more similar than their hardest (most similar) negative.
    """
    with torch.no_grad():
        valid = positive | negative
        distance = 1 - sim
        hardest_pos = sim.masked_fill(~positive, float("inf")).amin(1)
        hardest_neg = sim.masked_fill(~negative, float("-inf")).amax(1)
        has_both = positive.any(1) & negative.any(1)
        return {
            "active_fraction": _masked_mean(active.to(sim.dtype), valid),
            "correct_order_fraction": _masked_mean((hardest_pos > hardest_neg).to(sim.dtype), has_both),
            "margin_violation_fraction": _masked_mean(violating.to(sim.dtype), valid),
            "mean_d_ap": _masked_mean(distance, positive),
            "mean_d_an": _masked_mean(distance, negative),
        }


def masked_logsumexp(logits: torch.Tensor, mask: torch.Tensor, add_one: bool = False) -> torch.Tensor:
    """Row-wise ``log(sum(exp(logits[mask])))``, or ``log(1 + sum(...))`` with ``add_one``;
    0 for a row with no masked entry, as pytorch-metric-learning's ``logsumexp``.

    Unmasked entries are filled with the dtype's lowest finite value rather than ``-inf`` so that
    empty rows keep finite gradients.
    """
    out = torch.logsumexp(logits.masked_fill(~mask, torch.finfo(logits.dtype).min), dim=1)
    if add_one:
        out = torch.logaddexp(out, out.new_zeros(()))
    return out.masked_fill(~mask.any(1), 0)


def cosine_similarity(embeddings: torch.Tensor, ref_embeddings: torch.Tensor | None) -> torch.Tensor:
    """(n, m) cosine similarities between L2-normalised rows (the batch itself when no reference)."""
    x = torch.nn.functional.normalize(embeddings, p=2, dim=1)
    y = x if ref_embeddings is None else torch.nn.functional.normalize(ref_embeddings, p=2, dim=1)
    return x @ y.T
