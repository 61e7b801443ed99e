"""Pairwise distances: euclidean, squared euclidean and cosine (``1 - cos``).

Euclidean distance takes its square root with a zero-safe gradient (0 where the distance is 0),
so identical embeddings give finite gradients; this matches ``torch.cdist``'s subgradient, which
pytorch-metric-learning's ``LpDistance`` uses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .params import DISTANCES


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    positive = x > 0
    return torch.where(positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x))


def squared_euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||x_i - y_j||^2`` by the matmul expansion, clamped at 0."""
    xx = (x * x).sum(1, keepdim=True)
    yy = (y * y).sum(1, keepdim=True)
    return (xx - 2 * (x @ y.T) + yy.T).clamp_min(0)


def pairwise_distances(x: torch.Tensor, y: torch.Tensor | None = None, kind: str = "euclidean",
                       normalize: bool = False) -> torch.Tensor:
    """An (n, m) distance matrix between the rows of ``x`` and of ``y`` (default ``x``)."""
    if kind not in DISTANCES:
        raise ValueError(f"unknown distance {kind!r}; choose one of {', '.join(DISTANCES)}")
    same = y is None
    if normalize or kind == "cosine":
        x = F.normalize(x, dim=1)
        y = x if same else F.normalize(y, dim=1)
    elif same:
        y = x
    if kind == "cosine":
        return 1 - x @ y.T
    d2 = squared_euclidean(x, y)
    if same:  # exact zeros on the diagonal despite rounding in the expansion
        d2 = d2 * (1 - torch.eye(d2.shape[0], device=d2.device, dtype=d2.dtype))
    return d2 if kind == "squared_euclidean" else _safe_sqrt(d2)

