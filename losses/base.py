"""The base class every registry loss derives from: input checks and last-call statistics."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from .params import HyperParam

STAT_NAMES = (
    "active_fraction",  # triplets/pairs with a non-zero loss term
    "correct_order_fraction",  # not hard: d(a,n) >= d(a,p) (losses.mining.triplet_difficulty)
    "margin_violation_fraction",  # not easy: d(a,n) < d(a,p) + margin
    "mean_d_ap",
    "mean_d_an",
)


def check_inputs(embeddings: torch.Tensor, labels: torch.Tensor, what: str = "embeddings") -> None:
    """Raise ``ValueError`` naming the problem for malformed (embeddings, labels)."""
    if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 2:
        shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings).__name__
        raise ValueError(
            f"{what} must be a 2-D tensor (batch, dim), got shape {shape}; flatten or stack them first"
        )
    if not embeddings.is_floating_point():
        raise ValueError(f"{what} must be floating point, got {embeddings.dtype}")
    if not isinstance(labels, torch.Tensor) or labels.dim() != 1:
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels for {what} must be a 1-D tensor, got shape {shape}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer tensor, got {labels.dtype}; convert class ids with .long()"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"{what} has {embeddings.shape[0]} rows but labels has {labels.shape[0]}; they must match"
        )
    # the sum is finite whenever every value is (short of overflowing float32's 3e38): one fast
    # reduction, and the exact elementwise test only when it is not
    if not bool(torch.isfinite(embeddings.sum())) and not bool(torch.isfinite(embeddings).all()):
        raise ValueError(f"{what} contain NaN or inf; check the model output and learning rate")


class MetricLoss(nn.Module):
    """A registry loss: ``loss(embeddings, labels[, ref_embeddings, ref_labels]) -> scalar``.

    Subclasses declare ``hyperparams`` and ``paper`` once and implement :meth:`compute`.
    After each call, :attr:`last_stats` holds detached device tensors named in ``STAT_NAMES``
    (no host synchronisation).
    """

    hyperparams: ClassVar[tuple[HyperParam, ...]] = ()
    paper: ClassVar[str] = ""
    cross_modal: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.last_stats: dict[str, torch.Tensor] = {}

    def forward(self, embeddings, labels, ref_embeddings=None, ref_labels=None):
        check_inputs(embeddings, labels)
        if (ref_embeddings is None) != (ref_labels is None):
            raise ValueError("pass ref_embeddings and ref_labels together, or neither")
        if ref_embeddings is not None:
            check_inputs(ref_embeddings, ref_labels, "ref_embeddings")
            if ref_embeddings.shape[1] != embeddings.shape[1]:
                raise ValueError(
                    f"ref_embeddings have dimension {ref_embeddings.shape[1]} but embeddings have "
                    f"{embeddings.shape[1]}; project both modalities to the same embedding size"
                )
        elif self.cross_modal:
            raise ValueError(
                f"{type(self).__name__} is cross-modal: call it as loss(emb, labels, ref_emb, ref_labels)"
            )
        return self.compute(embeddings, labels, ref_embeddings, ref_labels)

    def compute(self, embeddings, labels, ref_embeddings, ref_labels) -> torch.Tensor:
        raise NotImplementedError

    def set_progress(self, fraction: float) -> None:
        """Told the fraction of training done (0..1) before each epoch; curricula use it."""

    def record_stats(self, **stats: torch.Tensor) -> None:
        self.last_stats = {k: v.detach().float() for k, v in stats.items()}
