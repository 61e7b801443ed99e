"""The two-tower model for cross-modal retrieval: an image tower and a text tower projecting into
one space (as VSE++, Faghri et al. 2018); its output stacks the image embeddings over the text
embeddings of a batch of pairs."""

from __future__ import annotations

import torch
from torch import nn

from experiments.data.captions import PairedSplit, Vocabulary
from experiments.models.image import build_model
from experiments.models.text import BagOfWordsEncoder


class TwoTower(nn.Module):
    """``forward((images, tokens)) -> cat(image_tower(images), text_tower(tokens))``."""

    def __init__(self, image: nn.Module, text: nn.Module):
        super().__init__()
        self.image, self.text = image, text

    def forward(self, inputs):
        images, tokens = inputs
        return torch.cat([self.image(images), self.text(tokens)])


def build_two_tower(cfg, train: PairedSplit, vocabulary: Vocabulary) -> TwoTower:
    """``cfg.model``'s image network for the training images and a bag-of-words text tower, seeded."""
    _, channels, height, width = train.images.shape
    image = build_model(
        cfg.model.name, channels, (height, width), cfg.model.embedding_dim, cfg.model.normalize, cfg.seed
    )
    torch.manual_seed(cfg.seed)
    text = BagOfWordsEncoder(len(vocabulary), cfg.model.embedding_dim, normalize=cfg.model.normalize)
    return TwoTower(image, text)
