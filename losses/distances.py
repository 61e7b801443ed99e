"""Distances between embeddings: euclidean, squared euclidean and cosine (``1 - cos``).

- :func:`pairwise_distances`: an (n, m) matrix, differentiable by autograd.
- :func:`paired_distances`: row-wise ``d(x_i, y_i)`` for explicitly chosen pairs.
- :func:`distance_sum_gradients`, :func:`self_distance_sum_gradient`, :func:`column_distance_gradients`
  and :func:`with_gradients`: the closed-form gradient of ``sum_ij W_ij d(x_i, y_j)`` for a fixed
  (detached) weight matrix ``W``. Hinge-type losses are piecewise linear in the distances, so a loss
  whose value and ``W`` come from a no-grad pass gets its exact gradient from two matmuls, without an
  autograd graph through (n, m) intermediates.

Euclidean distance takes its square root with a zero-safe gradient (0 where the distance is 0),
so identical embeddings give finite gradients; this matches ``torch.cdist``'s subgradient, which
pytorch-metric-learning's ``LpDistance`` uses. Matrices use the matmul expansion (as ``torch.cdist``
does for large inputs), which resolves euclidean distances down to about ``sqrt(eps) * norm``
(~3e-4 of the norm in float32); :func:`paired_distances` takes exact differences. Half-precision inputs are
computed in float32 (:func:`prepare_embeddings`): squared norms overflow float16 beyond a norm of ~256.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .params import DISTANCES


def check_distance(kind: str) -> None:
    if kind not in DISTANCES:
        raise ValueError(f"unknown distance {kind!r}; choose one of {', '.join(DISTANCES)}")


def _safe_sqrt(x: torch.Tensor) -> torch.Tensor:
    positive = x > 0
    return torch.where(
        positive, torch.sqrt(torch.where(positive, x, torch.ones_like(x))), torch.zeros_like(x)
    )


def prepare_embeddings(x: torch.Tensor, kind: str, normalize: bool) -> torch.Tensor:
    """Upcast float16/bfloat16 to float32 and L2-normalise when asked (always for cosine)."""
    if x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    return F.normalize(x, dim=1) if normalize or kind == "cosine" else x


def squared_euclidean(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||x_i - y_j||^2`` by the matmul expansion, clamped at 0."""
    xx = (x * x).sum(1, keepdim=True)
    yy = (y * y).sum(1, keepdim=True)
    return (xx - 2 * (x @ y.T) + yy.T).clamp_min(0)


def distance_matrix(x: torch.Tensor, y: torch.Tensor | None, kind: str) -> torch.Tensor:
    """(n, m) distances between rows already prepared by :func:`prepare_embeddings`; ``y=None``
    means ``x`` against itself, with an exact zero diagonal. Without autograd it works in place."""
    check_distance(kind)
    same = y is None
    y = x if same else y
    if torch.is_grad_enabled() and (x.requires_grad or y.requires_grad):
        if kind == "cosine":
            return 1 - x @ y.T
        d2 = squared_euclidean(x, y)
        if same:  # exact zeros on the diagonal despite rounding in the expansion
            d2 = d2 * (1 - torch.eye(d2.shape[0], device=d2.device, dtype=d2.dtype))
        return d2 if kind == "squared_euclidean" else _safe_sqrt(d2)
    if kind == "cosine":
        return torch.addmm(torch.ones((), dtype=x.dtype, device=x.device), x, y.T, alpha=-1)
    d2 = torch.addmm((y * y).sum(1), x, y.T, alpha=-2).add_((x * x).sum(1, keepdim=True)).clamp_min_(0)
    if same:
        d2.fill_diagonal_(0)
    return d2 if kind == "squared_euclidean" else d2.sqrt_()


def pairwise_distances(
    x: torch.Tensor, y: torch.Tensor | None = None, kind: str = "euclidean", normalize: bool = False
) -> torch.Tensor:
    """An (n, m) distance matrix between the rows of ``x`` and of ``y`` (default ``x``)."""
    check_distance(kind)
    if normalize or kind == "cosine":
        x = F.normalize(x, dim=1)
        y = None if y is None else F.normalize(y, dim=1)
    return distance_matrix(x, y, kind)


def paired_distances(x: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """``d(x_i, y_i)`` for rows already prepared by :func:`prepare_embeddings` (no normalising here)."""
    check_distance(kind)
    if kind == "cosine":
        return 1 - (x * y).sum(1)
    d2 = (x - y).pow(2).sum(1)
    return d2 if kind == "squared_euclidean" else _safe_sqrt(d2)


def _linear_weights(
    weights: torch.Tensor, kind: str, distances: torch.Tensor | None, in_place: bool
) -> torch.Tensor:
    """Weights of the squared-euclidean (or cosine) form of ``sum_ij weights_ij * d_ij``: euclidean
    ``d = sqrt(d2)`` has ``dd/dd2 = 1 / (2 d)``, taken as 0 at distance 0."""
    if kind != "euclidean":
        return weights
    if distances is None:
        raise ValueError("distance_sum_gradients needs the distance matrix for kind='euclidean'")
    scaled = weights.div_(distances) if in_place else weights / distances
    return scaled.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)  # 0 at distance 0


def distance_sum_gradients(
    x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, kind: str, distances: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_ij weights_ij * d(x_i, y_j)`` with respect to ``x`` and to ``y``.

    ``x``, ``y`` are prepared embeddings (normalised if the distance is); ``distances`` is the
    euclidean matrix, needed for ``kind="euclidean"`` (pairs at distance 0 get gradient 0).
    """
    check_distance(kind)
    with torch.no_grad():
        weights = _linear_weights(weights, kind, distances, in_place=False)
        if kind == "cosine":
            return -weights @ y, -weights.T @ x
        scale = 2.0 if kind == "squared_euclidean" else 1.0
        grad_x = scale * (weights.sum(1, keepdim=True) * x - weights @ y)
        grad_y = scale * (weights.sum(0).unsqueeze(1) * y - weights.T @ x)
        return grad_x, grad_y


def self_distance_sum_gradient(
    x: torch.Tensor, weights: torch.Tensor, kind: str, distances: torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient of ``sum_ij weights_ij * d(x_i, x_j)`` with respect to ``x`` (the batch against itself).

    The distance is symmetric, so this is :func:`distance_sum_gradients`' ``grad_x + grad_y`` with
    one matmul instead of two: the rows of ``x`` see the symmetrised weights ``W + W^T``.
    """
    check_distance(kind)
    with torch.no_grad():
        symmetric = _linear_weights(weights.T.contiguous().add_(weights), kind, distances, in_place=True)
        if kind == "cosine":
            return symmetric @ x.neg()
        scale = 2.0 if kind == "squared_euclidean" else 1.0
        return torch.addmm(symmetric.sum(1, keepdim=True) * x, symmetric, x, alpha=-1).mul_(scale)


def column_distance_gradients(
    x: torch.Tensor,
    y: torch.Tensor,
    columns: torch.Tensor,
    weights: torch.Tensor,
    distances: torch.Tensor,
    kind: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of ``sum_ap weights_ap * d(x_a, y[columns_ap])`` with respect to ``x`` and ``y``.

    :func:`distance_sum_gradients` for a few columns per row of ``x`` ((n, p) ``columns``,
    ``weights`` and their ``distances``) instead of a dense weight matrix; pairs at distance 0 get
    gradient 0.
    """
    with torch.no_grad():
        (n, p), dim = columns.shape, y.shape[1]
        flat_columns = columns.reshape(-1)
        weights = weights.unsqueeze(2)
        others = y.index_select(0, flat_columns).view(n, p, dim)
        if kind == "cosine":
            grad_x = torch.bmm(weights.transpose(1, 2), others).squeeze(1).neg_()
            to_columns = (weights * x.unsqueeze(1)).view(n * p, dim)
            return grad_x, torch.zeros_like(y).index_add_(0, flat_columns, to_columns, alpha=-1)
        if kind == "euclidean":
            weights = (weights / distances.unsqueeze(2)).nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        else:
            weights = 2 * weights
        to_columns = others.sub_(x.unsqueeze(1)).mul_(weights)  # weight * (y_j - x_a)
        grad_x = to_columns.sum(1).neg_()
        return grad_x, torch.zeros_like(y).index_add_(0, flat_columns, to_columns.view(n * p, dim))


class _WithGradients(torch.autograd.Function):
    """Returns ``value``; backward sends ``grad_output * g_k`` to each tensor ``t_k``."""

    @staticmethod
    def forward(ctx, value, *tensors_and_grads):
        half = len(tensors_and_grads) // 2
        ctx.save_for_backward(*tensors_and_grads[half:])
        return value.clone()

    @staticmethod
    def backward(ctx, grad_output):
        grads = tuple(grad_output * g for g in ctx.saved_tensors)
        return (None, *grads, *(None,) * len(grads))


def with_gradients(value: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``value`` (computed without grad) made differentiable: d value / d t = g for each ``(t, g)``.

    The same tensor may appear in several pairs; its gradients add up.
    """
    tensors = [t for t, _ in pairs]
    grads = [g.detach().to(t.dtype) for t, g in pairs]
    return _WithGradients.apply(value.detach(), *tensors, *grads)
