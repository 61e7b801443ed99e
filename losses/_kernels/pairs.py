"""Fused kernels of the pair-based losses (Multi-Similarity, Circle): normalised rows and their
cosine similarities split into a positive and a negative group, the losses and their statistics.

Pair-based losses score every (anchor, candidate) pair of a cosine similarity matrix ``s``;
candidates are the batch itself or a reference set. The kernels compute the value and its
gradient with respect to ``s`` in closed form, in a few passes over the (n, m) matrix with no
per-anchor loop, each (n, m) step writing into a spent buffer (fresh large tensors cost page faults
on CPU); :func:`similarity_gradients` turns that gradient into the gradient of the normalised rows
and ``losses.distances.with_gradients`` hands it to autograd, which back-propagates through the L2
normalisation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..distances import with_gradients
from .workspace import Workspace


def normalized_rows(
    embeddings: torch.Tensor, ref_embeddings: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The L2-normalised rows of the batch and of the reference set (``None``: the batch itself),
    in float32 at least: the losses' exponentials need more range than float16/bfloat16 have."""

    def rows(t: torch.Tensor) -> torch.Tensor:
        t = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
        return torch.nn.functional.normalize(t, p=2, dim=1)

    return rows(embeddings), None if ref_embeddings is None else rows(ref_embeddings)


def cosine_similarity(x: torch.Tensor, y: torch.Tensor | None, workspace: Workspace) -> torch.Tensor:
    """Detached (n, m) cosine similarities of rows from :func:`normalized_rows`."""
    with torch.no_grad():
        y = x if y is None else y
        return torch.mm(x, y.T, out=workspace("similarity", x, (x.shape[0], y.shape[0])))


def similarity_gradients(
    x: torch.Tensor, y: torch.Tensor | None, grad: torch.Tensor, scratch: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(tensor, gradient)`` pairs for ``with_gradients`` from ``grad`` = d loss / d (x @ y^T),
    which is overwritten, as is ``scratch`` (a spent tensor of the same shape).

    Against itself the similarity is symmetric, so ``x`` gets ``(G + G^T) x``: one matmul, not two
    (``G^T`` is copied into ``scratch`` first: adding a contiguous copy beats a strided read).
    """
    with torch.no_grad():
        if y is None:
            return [(x, grad.add_(scratch.copy_(grad.T)) @ x)]
        return [(x, grad @ y), (y, grad.T @ x)]


def _class_keys(
    labels: torch.Tensor, other: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """One key per distinct label, shared by ``labels`` and ``other``: the label's first position in
    their sorted concatenation, exact in ``dtype`` (comparing int64 labels into a float tensor
    costs twenty times more than comparing float keys)."""
    known = torch.sort(torch.cat([labels, other])).values
    return torch.searchsorted(known, labels).to(dtype), torch.searchsorted(known, other).to(dtype)


def compare(op, a: torch.Tensor, b, out: torch.Tensor | None = None) -> torch.Tensor:
    """``op(a, b)`` (``torch.lt``, ``torch.eq``...) as a 0/1 tensor of ``a``'s dtype, written into
    ``out`` when given: into a floating tensor a comparison costs a quarter of a boolean one plus
    its conversion."""
    if out is None:
        shape = torch.broadcast_shapes(a.shape, b.shape if isinstance(b, torch.Tensor) else ())
        out = torch.empty(shape, dtype=a.dtype, device=a.device)
    return op(a, b, out=out)


# Cosine similarities lie in [-1, 1]; a pair outside a group is moved this far past it, which keeps
# every group's own values exact (adding 0) and puts the others beyond any threshold a loss uses.
OFF_GROUP = 8.0


def masked_exp(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``exp(logits)`` where ``mask`` is 1 and 0 elsewhere, in place; ``logits`` must be at most 0 on
    the mask (shifted by the group maximum). Clamping to the smallest normal exponent keeps the
    CPU's ``exp`` off its slow paths (``-inf`` and subnormal results) and every value finite; a
    clamped term is below ``tiny`` (1e-38 in float32), which no sum it enters can resolve."""
    floor = math.log(torch.finfo(logits.dtype).tiny) + 1
    return logits.clamp_(floor, 1).exp_().mul_(mask)


@dataclass
class SimilarityGroups:
    """A similarity matrix split by labels, with the sums the statistics need.

    ``positive`` and ``negative`` are 0/1 masks of ``s``'s dtype (a sample is neither its own
    positive nor negative). ``positive_view`` is ``s`` moved up by :data:`OFF_GROUP` off the
    positive pairs and ``negative_view`` is ``s`` moved down by it off the negative pairs, so each
    group's extreme is one row reduction and each group is one comparison with a threshold.
    ``hardest_pos`` (least similar positive, ``+inf`` if none) and ``hardest_neg`` (most similar
    negative, ``-inf`` if none) are per row; ``positive_sum`` / ``negative_sum`` are the sums of
    ``s`` over each group.
    """

    positive: torch.Tensor
    negative: torch.Tensor
    positive_view: torch.Tensor
    negative_view: torch.Tensor
    hardest_pos: torch.Tensor
    hardest_neg: torch.Tensor
    n_positive: torch.Tensor
    n_negative: torch.Tensor
    positive_sum: torch.Tensor
    negative_sum: torch.Tensor

    @classmethod
    @torch.no_grad()
    def split(
        cls, s: torch.Tensor, labels: torch.Tensor, ref_labels: torch.Tensor | None, workspace: Workspace
    ) -> "SimilarityGroups":
        same_source = ref_labels is None
        keys, other_keys = _class_keys(labels, labels if same_source else ref_labels, s.dtype)
        positive = torch.eq(keys.unsqueeze(1), other_keys.unsqueeze(0), out=workspace("positive", s))
        negative = torch.sub(s.new_ones(()), positive, out=workspace("negative", s))
        if same_source:
            positive.diagonal().zero_()
        positive_sum = torch.dot(s.reshape(-1), positive.reshape(-1))
        negative_sum = torch.dot(s.reshape(-1), negative.reshape(-1))
        positive_view = torch.add(s, negative, alpha=OFF_GROUP, out=workspace("positive_view", s))
        negative_view = torch.add(s, positive, alpha=-OFF_GROUP, out=workspace("negative_view", s))
        if same_source:  # a sample is neither its own positive nor negative
            positive_view.diagonal().add_(OFF_GROUP)
            negative_view.diagonal().sub_(OFF_GROUP)
        hardest_pos, hardest_neg = positive_view.amin(1), negative_view.amax(1)
        hardest_pos = hardest_pos.masked_fill(hardest_pos > OFF_GROUP / 2, float("inf"))
        hardest_neg = hardest_neg.masked_fill(hardest_neg < -OFF_GROUP / 2, float("-inf"))
        return cls(
            positive,
            negative,
            positive_view,
            negative_view,
            hardest_pos,
            hardest_neg,
            positive.sum(),
            negative.sum(),
            positive_sum,
            negative_sum,
        )

    def positives_below(self, threshold, out: torch.Tensor | None = None) -> torch.Tensor:
        """0/1 (n, m) mask of the positive pairs with similarity below ``threshold`` (a number or
        a per-row tensor, at most ``OFF_GROUP / 2``), written into ``out`` when given."""
        return compare(torch.lt, self.positive_view, _per_row(threshold), out)

    def negatives_above(self, threshold, out: torch.Tensor | None = None) -> torch.Tensor:
        """0/1 (n, m) mask of the negative pairs with similarity above ``threshold`` (at least
        ``-OFF_GROUP / 2``), written into ``out`` when given."""
        return compare(torch.gt, self.negative_view, _per_row(threshold), out)

    def count(self, positives_below: float, negatives_above: float, scratch: torch.Tensor) -> torch.Tensor:
        """Positive pairs below one similarity plus negative pairs above another, using ``scratch``."""
        return (
            self.positives_below(positives_below, scratch).sum()
            + self.negatives_above(negatives_above, scratch).sum()
        )

    def stats(self, n_active: torch.Tensor, n_violating: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ``STAT_NAMES`` statistics (all detached, no host synchronisation).

        - ``active_fraction``: ``n_active`` pairs (carrying loss weight) over all valid pairs;
        - ``margin_violation_fraction``: ``n_violating`` pairs (on the wrong side of the loss's
          decision boundary) over all valid pairs;
        - ``mean_d_ap`` / ``mean_d_an``: mean cosine distance ``1 - s`` of positive / negative pairs;
        - ``correct_order_fraction``: among anchors with a positive and a negative, the fraction
          whose hardest (least similar) positive is more similar than their hardest (most
          similar) negative.
        """
        n_valid = (self.n_positive + self.n_negative).clamp_min(1)
        has_both = torch.isfinite(self.hardest_pos) & torch.isfinite(self.hardest_neg)
        return {
            "active_fraction": n_active / n_valid,
            "correct_order_fraction": torch.count_nonzero(has_both & (self.hardest_pos > self.hardest_neg))
            / torch.count_nonzero(has_both).clamp_min(1),
            "margin_violation_fraction": n_violating / n_valid,
            "mean_d_ap": 1 - self.positive_sum / self.n_positive.clamp_min(1),
            "mean_d_an": 1 - self.negative_sum / self.n_negative.clamp_min(1),
        }


def _per_row(threshold):
    return threshold.unsqueeze(1) if isinstance(threshold, torch.Tensor) else threshold


def _similarity_groups(embeddings, labels, ref_embeddings, ref_labels, workspace: Workspace):
    """What both pair losses start from: the L2-normalised rows ``x`` and references ``y``, their
    cosine similarities ``s`` and those split into positive and negative groups."""
    x, y = normalized_rows(embeddings, ref_embeddings)
    s = cosine_similarity(x, y, workspace)
    with torch.no_grad():
        groups = SimilarityGroups.split(s, labels, ref_labels, workspace)
    return x, y, s, groups


def multi_similarity_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    *,
    alpha: float,
    beta: float,
    base: float,
    miner: bool,
    epsilon: float,
    workspace: Workspace,
) -> tuple[torch.Tensor, dict]:
    """``MultiSimilarityLoss``' value (differentiable) and statistics."""
    x, y, s, groups = _similarity_groups(embeddings, labels, ref_embeddings, ref_labels, workspace)
    with torch.no_grad():
        hardest_pos, hardest_neg = groups.hardest_pos, groups.hardest_neg
        n_violating = groups.count(base, base, workspace("scratch", s))
        pos_used, neg_used = groups.positive, groups.negative
        if miner:  # PML's MultiSimilarityMiner: S_ap - epsilon < max S_an, S_an + epsilon > min S_ap
            groups.positives_below(hardest_neg + epsilon, out=pos_used)
            groups.negatives_above(hardest_pos - epsilon, out=neg_used)
        n_pos_used, n_neg_used = pos_used.sum(), neg_used.sum()
        # log(1 + sum exp(logits)) per group, shifted by the group's largest logit (at least 0):
        # that of the least similar positive and of the most similar negative, used whenever any is
        shift_pos = (alpha * (base - hardest_pos)).clamp_min(0)
        shift_neg = (beta * (hardest_neg - base)).clamp_min(0)
        exp_pos = masked_exp(
            torch.add((alpha * base - shift_pos)[:, None], s, alpha=-alpha, out=groups.positive_view),
            pos_used,
        )
        exp_neg = masked_exp(
            torch.add((-beta * base - shift_neg)[:, None], s, alpha=beta, out=groups.negative_view), neg_used
        )
        norm_pos = exp_pos.sum(1) + torch.exp(-shift_pos)
        norm_neg = exp_neg.sum(1) + torch.exp(-shift_neg)
        per_anchor = (shift_pos + norm_pos.log()) / alpha + (shift_neg + norm_neg.log()) / beta
        n_rows = max(per_anchor.shape[0], 1)
        keep = ((n_pos_used > 1) | (n_neg_used > 1)).to(s.dtype)
        value = per_anchor.sum() / n_rows * keep
        # d value / d s: each used pair's softmax weight, negative for positives
        grad = exp_neg.mul_((keep / (n_rows * norm_neg))[:, None])
        grad.addcmul_(exp_pos, (keep / (n_rows * norm_pos))[:, None], value=-1)
        stats = groups.stats(n_pos_used + n_neg_used, n_violating)
    return with_gradients(value.to(x.dtype), similarity_gradients(x, y, grad, s)), stats


def circle_loss(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    ref_embeddings: torch.Tensor | None,
    ref_labels: torch.Tensor | None,
    *,
    m: float,
    gamma: float,
    workspace: Workspace,
) -> tuple[torch.Tensor, dict]:
    """``CircleLoss``' value (differentiable) and statistics."""
    x, y, s, groups = _similarity_groups(embeddings, labels, ref_embeddings, ref_labels, workspace)
    with torch.no_grad():
        hardest_pos, hardest_neg = groups.hardest_pos, groups.hardest_neg
        positive, negative = groups.positive, groups.negative
        scratch = workspace("scratch", s)
        n_violating = groups.count(1 - m, m, scratch)
        # logits: gamma a_p ((1 - m) - s_p) and gamma a_n (s_n - m), with the paper's self-paced
        # weights a_p = relu(1 + m - s_p) and a_n = relu(s_n + m) held constant; taken from the
        # groups' views, the weights are 0 outside their group, so their non-zeros are the active pairs
        weight_pos = torch.sub(s.new_tensor(1 + m), groups.positive_view, out=groups.positive_view).relu_()
        weight_neg = torch.add(groups.negative_view, m, out=groups.negative_view).relu_()
        n_active = torch.count_nonzero(weight_pos) + torch.count_nonzero(weight_neg)
        offset_pos, offset_neg = torch.sub(s.new_tensor(1 - m), s, out=scratch), s.sub_(m)
        # the positive logit falls as s_p rises: its row maximum is the least similar positive's;
        # the negatives' maximum is taken with them lifted by 1 past the others (logit / gamma
        # lies in [-1, 1.25], scaled by 1/8 into [-1/8, 5/32])
        top_pos = torch.rsub(hardest_pos, 1 + m).relu_().mul_(torch.rsub(hardest_pos, 1 - m))
        logit_neg = torch.addcmul(negative, offset_neg, weight_neg, value=1 / 8)
        top_neg = (logit_neg.amax(1) - 1) * 8
        has_pos, has_neg = torch.isfinite(hardest_pos), torch.isfinite(hardest_neg)
        shift_pos, shift_neg = torch.where(has_pos, top_pos, 0), torch.where(has_neg, top_neg, 0)
        exp_pos = masked_exp(
            torch.addcmul((-gamma * shift_pos)[:, None], offset_pos, weight_pos, value=gamma, out=offset_pos),
            positive,
        )
        exp_neg = masked_exp(
            torch.addcmul((-gamma * shift_neg)[:, None], offset_neg, weight_neg, value=gamma, out=logit_neg),
            negative,
        )
        norm_pos = exp_pos.sum(1).masked_fill_(~has_pos, 1)
        norm_neg = exp_neg.sum(1).masked_fill_(~has_neg, 1)
        has_both = has_pos & has_neg
        total = torch.where(has_both, gamma * (shift_pos + shift_neg) + (norm_pos * norm_neg).log(), 0)
        per_anchor = F.softplus(total) * has_both
        nonzero = per_anchor > 0
        count = torch.count_nonzero(nonzero).clamp_min(1)
        value = per_anchor.sum() / count
        # d value / d s: each pair's softmax weight in its group times d logit / d s = -/+ gamma a
        row = torch.sigmoid(total) * nonzero * gamma / count
        grad = exp_neg.mul_(weight_neg).mul_((row / norm_neg)[:, None])
        grad.addcmul_(exp_pos.mul_(weight_pos), (row / norm_pos)[:, None], value=-1)
        stats = groups.stats(n_active, n_violating)
    return with_gradients(value.to(x.dtype), similarity_gradients(x, y, grad, positive)), stats
