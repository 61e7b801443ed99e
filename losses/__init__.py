"""tripletlab's loss registry: triplet variants, Multi-Similarity, Circle and cross-modal losses.

    >>> from losses import build_loss, list_losses
    >>> loss = build_loss("batch_hard", margin=0.2)
    >>> value = loss(embeddings, labels)

Importing the package registers the built-in losses and the ``pml:<ClassName>`` resolver; plugins
come from entry points (on first use) and :func:`load_plugins`.
"""

from . import (  # noqa: F401  (importing them registers the built-in losses and the pml: resolver)
    batch_hard,
    circle,
    cross_modal,
    multi_similarity,
    pml_adapter,
    semi_hard,
    triplet,
    triplet_center,
)
from .base import STAT_NAMES, MetricLoss, check_inputs
from .params import HyperParam
from .registry import (
    LossInfo,
    PluginWarning,
    build_loss,
    list_losses,
    load_plugins,
    loss_info,
    register_loss,
    validate_params,
)

__all__ = [
    "HyperParam",
    "LossInfo",
    "MetricLoss",
    "PluginWarning",
    "STAT_NAMES",
    "build_loss",
    "check_inputs",
    "list_losses",
    "load_plugins",
    "loss_info",
    "register_loss",
    "validate_params",
]
