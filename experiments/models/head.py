"""What every embedding network shares: the embedding head and a seeded initialisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class EmbeddingHead(nn.Module):
    """Linear projection to the embedding, L2-normalised when ``normalize``."""

    def __init__(self, in_features: int, embedding_dim: int, normalize: bool) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, embedding_dim)
        self.normalize = normalize

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        out = self.linear(features)
        return F.normalize(out, dim=1) if self.normalize else out


def reset_parameters(model: nn.Module, generator: torch.Generator) -> None:
    """Initialise from ``generator`` alone (thread-safe seeding): He-normal convolutions (fan-out,
    as in He et al. 2015), PyTorch's default uniform linear layers, BN weight 1 and bias 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu", generator=generator)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            bound = 1.0 / module.in_features**0.5
            nn.init.uniform_(module.weight, -bound, bound, generator=generator)
            nn.init.uniform_(module.bias, -bound, bound, generator=generator)
        elif isinstance(module, nn.BatchNorm2d):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
