"""tripletlab's loss registry: triplet variants, Multi-Similarity, Circle and cross-modal losses.

    >>> from losses import build_loss, list_losses
    >>> loss = build_loss("batch_hard", margin=0.2)
    >>> value = loss(embeddings, labels)
"""
from .base import STAT_NAMES, MetricLoss, check_inputs
from .params import HyperParam
from .registry import LossInfo, build_loss, list_losses, loss_info, register_loss, validate_params

__all__ = [
    "HyperParam", "LossInfo", "MetricLoss", "STAT_NAMES", "build_loss", "check_inputs",
    "list_losses", "loss_info", "register_loss", "validate_params",
]
