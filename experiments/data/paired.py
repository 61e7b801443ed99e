"""Cross-modal (image-text) experiments: paired splits, two towers, and the paired objective.

A paired experiment is selected by its dataset name: ``digits-captions`` (built in) or
``paired-file`` (a CSV/JSONL of ``image_path, caption, label`` at ``dataset.path``). Both towers
embed into one space; the training loop sees a two-tower model whose output stacks the image
embeddings over the text embeddings, and :class:`PairedObjective` splits them again:
a cross-modal loss gets ``loss(image_emb, labels, text_emb, labels)``; any other registry loss is
applied to the concatenated modalities, ``loss(cat(image_emb, text_emb), cat(labels, labels))``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from experiments.data.base import LabeledImages
from experiments.data.imaging import channel_stats
from experiments.data.device_data import DeviceImages
from experiments.models.image import build_model
from experiments.data.captions import PairedSplit, Vocabulary, load_digits_paired, load_paired_file
from experiments.data.splits import split_indices
from experiments.models.text import BagOfWordsEncoder

PAIRED_DATASETS = ("digits-captions", "paired-file")
MAX_CAPTION_TOKENS = 32


def is_paired(dataset_name: str) -> bool:
    return dataset_name in PAIRED_DATASETS


@dataclass
class PairedSplits:
    train: PairedSplit
    val: PairedSplit
    test: PairedSplit
    info: dict


def load_paired(dataset_cfg, seed: int) -> PairedSplits:
    """Load and split a paired dataset by class (``class-disjoint``) or per class (``standard``)."""
    if dataset_cfg.name == "digits-captions":
        data = load_digits_paired(seed)
    else:
        path = dataset_cfg.path or os.environ.get("TRIPLETLAB_PAIRED_FILE_PATH", "")
        if not path:
            raise ValueError("dataset.path is empty: set it (or TRIPLETLAB_PAIRED_FILE_PATH) to a CSV or JSONL "
                             "file of image_path, caption, label")
        size = dataset_cfg.image_size if isinstance(dataset_cfg.image_size, int) and dataset_cfg.image_size else 32
        data = load_paired_file(path, image_size=size)
    parts = split_indices(dataset_cfg.split, data.labels, None, dataset_cfg.val_fraction, seed)
    info = {**parts.info, "source": dataset_cfg.name}
    return PairedSplits(data.subset(parts.train), data.subset(parts.val), data.subset(parts.test), info)


class PairedDeviceData:
    """Images (as :class:`DeviceImages`) and caption tokens of one split, both on the device.

    ``batch(indices) -> ((images, tokens), labels)``; ``iterate`` yields the same for evaluation
    with the labels repeated for both modalities, matching the model's stacked output.
    """

    def __init__(self, split: PairedSplit, vocabulary: Vocabulary, device: torch.device, augment: bool,
                 mean, std, seed: int = 0):
        self.images = DeviceImages(LabeledImages(split.images, split.labels), device, augment, mean, std, seed)
        self.tokens = vocabulary.encode(split.captions, MAX_CAPTION_TOKENS).to(device)
        self.device = self.images.device

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: torch.Tensor):
        images, labels = self.images.batch(indices)
        return (images, self.tokens[indices.to(self.device)]), labels

    def iterate(self, batch_size: int):
        for start, (images, labels) in zip(range(0, len(self), batch_size), self.images.iterate(batch_size)):
            yield (images, self.tokens[start:start + batch_size]), torch.cat([labels, labels])


class TwoTower(nn.Module):
    """An image tower and a text tower projecting into one space; output stacks image over text."""

    def __init__(self, image: nn.Module, text: nn.Module):
        super().__init__()
        self.image, self.text = image, text

    def forward(self, inputs):
        images, tokens = inputs
        return torch.cat([self.image(images), self.text(tokens)])


class PairedObjective(nn.Module):
    """Applies a registry loss to the stacked (image; text) embeddings of a paired batch."""

    def __init__(self, loss: nn.Module, cross_modal: bool):
        super().__init__()
        self.loss, self.cross_modal = loss, cross_modal

    @property
    def last_stats(self):
        return getattr(self.loss, "last_stats", {})

    def set_progress(self, fraction: float) -> None:
        getattr(self.loss, "set_progress", lambda f: None)(fraction)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        image, text = embeddings.chunk(2)
        if self.cross_modal:
            return self.loss(image, labels, text, labels)
        return self.loss(embeddings, torch.cat([labels, labels]))


def build_two_tower(cfg, train: PairedSplit, vocabulary: Vocabulary) -> TwoTower:
    _, channels, height, width = train.images.shape
    image = build_model(cfg.model.name, channels, (height, width), cfg.model.embedding_dim, cfg.model.normalize,
                        cfg.seed)
    torch.manual_seed(cfg.seed)
    text = BagOfWordsEncoder(len(vocabulary), cfg.model.embedding_dim, normalize=cfg.model.normalize)
    return TwoTower(image, text)


def paired_device_data(splits: PairedSplits, vocabulary: Vocabulary, device: torch.device, augment: bool,
                       seed: int):
    """Device-resident train/val/test data, all normalised with the training images' statistics."""
    mean, std = channel_stats(splits.train.images)
    return tuple(PairedDeviceData(split, vocabulary, device, augment and split is splits.train, mean, std, seed)
                 for split in (splits.train, splits.val, splits.test))


@torch.no_grad()
def embed_pairs(model: TwoTower, data: PairedDeviceData, batch_size: int):
    """(image embeddings, text embeddings, labels) of a split, in order."""
    was_training = model.training
    model.eval()
    images, texts, labels = [], [], []
    for (batch_images, tokens), lab in data.iterate(batch_size):
        images.append(model.image(batch_images).float())
        texts.append(model.text(tokens).float())
        labels.append(lab[: tokens.shape[0]])
    model.train(was_training)
    return torch.cat(images), torch.cat(texts), torch.cat(labels)


def validate_pairs(model: TwoTower, data: PairedDeviceData, batch_size: int) -> dict[str, float]:
    """Validation P@1, R-precision and MAP@R of image queries against the text gallery, by label
    (NaN when the embeddings are not finite)."""
    from experiments.eval.run_metrics import VAL_METRICS
    from experiments.eval.retrieval import retrieval_metrics

    image, text, labels = embed_pairs(model, data, batch_size)
    if not bool(torch.isfinite(image).all() & torch.isfinite(text).all()):
        return {k: float("nan") for k in VAL_METRICS}
    metrics = retrieval_metrics(image, labels, text, labels, ks=(1,), with_nmi=False)
    return {k: float(metrics[k]) for k in VAL_METRICS}
