"""Triplet-center loss: the triplet loss with class centres in place of positives and negatives."""

from __future__ import annotations

import torch
from torch import nn

from .base import MetricLoss
from .distances import check_distance, distance_matrix, paired_distances, prepare_embeddings
from .params import HyperParam, distance_params, margin_param
from .registry import register_loss
from .triplet import reduction_param
from .triplet_terms import check_reduction, finish_stats, hinge, reduce_terms, triplet_stats


@register_loss("triplet_center")
class TripletCenterLoss(MetricLoss):
    """``max(d(x, c_y) - min_{j != y} d(x, c_j) + m, 0)`` per sample, with learnable centres ``c``.

    The centre form bounds the triplet loss from above (Do et al., CVPR 2019), and costs O(n * C)
    instead of O(n^3). The centres are an ``nn.Parameter`` of shape (num_classes, embedding_dim),
    initialised from the global torch RNG as N(0, 1/embedding_dim) (unit norm on average); the
    trainer passes ``loss.parameters()`` to the optimiser. ``num_classes = 0`` and
    ``embedding_dim = 0`` mean "infer": the trainer fills them in from the dataset and the model
    before building the optimiser; calling the loss with them still at 0 raises ``ValueError``.
    Labels must be class ids in ``[0, num_classes)``. Reduction ``mean`` averages over the samples
    (He et al. sum over the batch); ``mean_nonzero`` over the non-zero terms. Defaults: m = 1,
    squared euclidean, not normalised.
    """

    paper = (
        "He et al., Triplet-Center Loss for Multi-View 3D Object Retrieval, CVPR 2018 (squared "
        "euclidean to learnable centres, trained jointly with softmax)"
    )
    hyperparams = (
        margin_param(search=(0.05, 5.0), high=100.0),
        *distance_params(),
        reduction_param(),
        HyperParam(
            "num_classes", int, doc="number of centres (0 = infer from the dataset)", low=0, search=None
        ),
        HyperParam(
            "embedding_dim", int, doc="centre dimension (0 = infer from the model)", low=0, search=None
        ),
    )

    def __init__(
        self,
        margin: float = 1.0,
        distance: str = "squared_euclidean",
        normalize: bool = False,
        reduction: str = "mean",
        num_classes: int = 0,
        embedding_dim: int = 0,
    ) -> None:
        super().__init__()
        check_distance(distance)
        check_reduction(reduction)
        self.margin, self.distance, self.normalize, self.reduction = margin, distance, normalize, reduction
        if num_classes > 0 and embedding_dim > 0:
            self.centres = nn.Parameter(torch.randn(num_classes, embedding_dim) / embedding_dim**0.5)
        else:
            self.register_parameter("centres", None)

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        if self.centres is None:
            raise ValueError(
                "triplet_center needs num_classes and embedding_dim (> 0); set loss.num_classes "
                "and loss.embedding_dim, or leave them at 0 for the trainer to infer before "
                "training"
            )
        if ref_embeddings is not None:
            raise ValueError(
                "triplet_center compares embeddings with class centres; it takes no reference embeddings"
            )
        num_classes, dim = self.centres.shape
        if embeddings.shape[1] != dim:
            raise ValueError(
                f"embeddings have dimension {embeddings.shape[1]} but the centres {dim}; "
                f"set embedding_dim to the model's embedding size"
            )
        if bool(((labels < 0) | (labels >= num_classes)).any()):
            raise ValueError(
                f"labels must be class ids in [0, {num_classes}); set num_classes to the number "
                f"of training classes and remap the labels to 0..num_classes-1"
            )
        x = prepare_embeddings(embeddings, self.distance, self.normalize)
        centres = prepare_embeddings(self.centres, self.distance, self.normalize)
        dtype = torch.promote_types(x.dtype, centres.dtype)
        x, centres = x.to(dtype), centres.to(dtype)
        with torch.no_grad():
            other = torch.arange(num_classes, device=labels.device) != labels.unsqueeze(1)
            nearest = distance_matrix(x, centres, self.distance).masked_fill(~other, float("inf")).argmin(1)
            valid = other.any(1)
        d_ap = paired_distances(x, centres[labels], self.distance)
        d_an = paired_distances(x, centres[nearest], self.distance)
        term, _ = hinge(d_ap - d_an + self.margin, False)
        term = torch.where(valid, term, 0)
        with torch.no_grad():
            sums = triplet_stats(d_ap, d_an, self.margin, term, valid)
        self.record_stats(**finish_stats(sums))
        return term.sum() / reduce_terms(term, sums, self.reduction)
