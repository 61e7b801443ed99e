"""Shared machinery of the pair-based losses (Multi-Similarity, Circle): normalised rows and their
cosine similarities, a two-group log-sum-exp with its softmax weights, and the training statistics.

Pair-based losses score every (anchor, candidate) pair of a cosine similarity matrix ``sim``;
candidates are the batch itself or a reference set. The losses compute their value and their
gradient with respect to ``sim`` in closed form, in a handful of passes over the (n, m) matrix
with no per-anchor loop; :func:`similarity_gradients` turns that gradient into the gradient of
the normalised rows and ``losses.distances.with_gradients`` hands it to autograd, which
back-propagates through the L2 normalisation.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


def normalized_rows(embeddings: torch.Tensor,
                    ref_embeddings: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The L2-normalised rows of the batch and of the reference set (``None``: the batch itself)."""
    x = torch.nn.functional.normalize(embeddings, p=2, dim=1)
    return x, None if ref_embeddings is None else torch.nn.functional.normalize(ref_embeddings, p=2, dim=1)


def cosine_similarity(x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Detached (n, m) cosine similarities of rows from :func:`normalized_rows`."""
    with torch.no_grad():
        return x @ (x if y is None else y).T


def similarity_gradients(x: torch.Tensor, y: torch.Tensor | None,
                         grad: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(tensor, gradient)`` pairs for ``with_gradients`` from ``grad`` = d loss / d (x @ y^T).

    Against itself the similarity is symmetric, so ``x`` gets ``(G + G^T) x``: one matmul, not two.
    """
    with torch.no_grad():
        if y is None:
            return [(x, (grad + grad.T) @ x)]
        return [(x, grad @ y), (y, grad.T @ x)]


@dataclass
class GroupedLogSumExp:
    """Row-wise log-sum-exp of the positive and of the negative logits of each anchor.

    ``exp_logits`` holds ``exp(logit - shift)`` on valid pairs (0 elsewhere) and ``norm_pos`` /
    ``norm_neg`` the matching row sums (1 for an empty group), so ``exp_logits / norm`` is each group's softmax (the
    derivative of its log-sum-exp). ``max_pos`` / ``max_neg`` are the raw row maxima (``-inf`` for an
    empty group).
    """

    lse_pos: torch.Tensor
    lse_neg: torch.Tensor
    exp_logits: torch.Tensor
    norm_pos: torch.Tensor
    norm_neg: torch.Tensor
    max_pos: torch.Tensor
    max_neg: torch.Tensor


@torch.no_grad()
def grouped_logsumexp(logits: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                      add_one: bool) -> GroupedLogSumExp:
    """``log(sum_group exp(logits))`` per row and group, or ``log(1 + sum ...)`` with ``add_one``.

    An empty group gives 0, as pytorch-metric-learning's masked ``logsumexp``. ``logits`` is
    overwritten. Each group is shifted by its own row maximum (and by at least 0 with ``add_one``),
    so no term overflows and a small group is not swamped by a large one.
    """
    max_pos = torch.where(positive, logits, float("-inf")).amax(1)
    max_neg = torch.where(negative, logits, float("-inf")).amax(1)
    if add_one:  # the extra term exp(0) = 1: shift by at least 0
        shift_pos, shift_neg = max_pos.clamp_min(0), max_neg.clamp_min(0)
    else:
        shift_pos = torch.where(torch.isfinite(max_pos), max_pos, 0)
        shift_neg = torch.where(torch.isfinite(max_neg), max_neg, 0)
    logits.sub_(torch.where(positive, shift_pos[:, None], shift_neg[:, None])).exp_()
    exp_logits = logits.masked_fill_(~(positive | negative), 0)
    norm_pos = torch.where(positive, exp_logits, 0).sum(1)
    norm_neg = torch.where(negative, exp_logits, 0).sum(1)
    if add_one:
        norm_pos, norm_neg = norm_pos + torch.exp(-shift_pos), norm_neg + torch.exp(-shift_neg)
    else:  # an empty group has no terms to normalise; 1 keeps exp_logits / norm finite
        norm_pos, norm_neg = norm_pos.masked_fill(norm_pos == 0, 1), norm_neg.masked_fill(norm_neg == 0, 1)
    lse_pos = torch.where(torch.isfinite(max_pos), shift_pos + torch.log(norm_pos), 0)
    lse_neg = torch.where(torch.isfinite(max_neg), shift_neg + torch.log(norm_neg), 0)
    return GroupedLogSumExp(lse_pos, lse_neg, exp_logits, norm_pos, norm_neg, max_pos, max_neg)


def pair_stats(sim: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, active: torch.Tensor,
               violating: torch.Tensor, hardest_pos: torch.Tensor, hardest_neg: torch.Tensor) -> dict[str, torch.Tensor]:
    """The ``STAT_NAMES`` statistics of a pair-based loss (all detached, no host synchronisation).

    - ``active_fraction``: pairs flagged ``active`` (carrying loss weight) over all valid pairs;
    - ``margin_violation_fraction``: pairs flagged ``violating`` (on the wrong side of the loss's
      decision boundary) over all valid pairs;
    - ``mean_d_ap`` / ``mean_d_an``: mean cosine distance ``1 - sim`` of positive / negative pairs;
    - ``correct_order_fraction``: among anchors with a positive and a negative, the fraction whose
      hardest (least similar, ``hardest_pos``) positive is more similar than their hardest (most
      similar, ``hardest_neg``) negative.
    """
    with torch.no_grad():
        n_pos, n_neg = torch.count_nonzero(positive), torch.count_nonzero(negative)
        n_valid = (n_pos + n_neg).clamp_min(1)
        has_both = torch.isfinite(hardest_pos) & torch.isfinite(hardest_neg)
        return {
            "active_fraction": torch.count_nonzero(active) / n_valid,
            "correct_order_fraction": torch.count_nonzero(has_both & (hardest_pos > hardest_neg))
            / torch.count_nonzero(has_both).clamp_min(1),
            "margin_violation_fraction": torch.count_nonzero(violating) / n_valid,
            "mean_d_ap": 1 - torch.where(positive, sim, 0).sum() / n_pos.clamp_min(1),
            "mean_d_an": 1 - torch.where(negative, sim, 0).sum() / n_neg.clamp_min(1),
        }
