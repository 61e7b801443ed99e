"""The text tower for cross-modal retrieval: a bag of word embeddings and a projection.

A mean-pooled ``nn.EmbeddingBag`` (fastText-style, Joulin et al. 2017) followed by a two-layer
projection into the shared embedding space; trained from scratch, nothing is downloaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BagOfWordsEncoder(nn.Module):
    """Token ids (N, L), 0 = padding, to (N, embedding_dim) embeddings."""

    def __init__(self, vocab_size: int, embedding_dim: int, width: int = 128, normalize: bool = False):
        super().__init__()
        self.bag = nn.EmbeddingBag(vocab_size, width, mode="mean", padding_idx=0)
        self.project = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, embedding_dim))
        self.normalize = normalize

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.project(self.bag(tokens))
        return F.normalize(out, dim=1) if self.normalize else out
