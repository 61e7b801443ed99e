"""Paired (image, caption, label) datasets as a run trains on them: splits and device batches.

A paired dataset is one registered with ``paired=True`` (``digits-captions``, built in, or
``paired-file``: a CSV/JSONL of ``image_path, caption, label``). Splits are by class
(``class-disjoint``) or within each class (``standard``), as for images. On the device a batch is
``((images, tokens), labels)`` with the labels given once per modality, ``cat(labels, labels)``,
matching a two-tower model's output that stacks the image embeddings over the text embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from experiments.data.base import LabeledImages
from experiments.data.captions import PairedSplit, Vocabulary
from experiments.data.device_data import DeviceImages
from experiments.data.splits import split_indices

MAX_CAPTION_TOKENS = 32


@dataclass
class PairedSplits:
    train: PairedSplit
    val: PairedSplit
    test: PairedSplit
    info: dict


def split_pairs(data: PairedSplit, split: str, val_fraction: float, seed: int, source: str) -> PairedSplits:
    """``data`` split by class (``class-disjoint``) or within each class (``standard``)."""
    parts = split_indices(split, data.labels, None, val_fraction, seed)
    info = {**parts.info, "source": source}
    return PairedSplits(data.subset(parts.train), data.subset(parts.val), data.subset(parts.test), info)


class PairedDeviceData:
    """Images (as :class:`DeviceImages`) and caption tokens of one split, both on the device.

    ``batch(indices)`` and ``iterate(batch_size)`` give ``((images, tokens), cat(labels, labels))``.
    """

    def __init__(
        self,
        split: PairedSplit,
        vocabulary: Vocabulary,
        device: torch.device,
        augment: bool,
        mean,
        std,
        seed: int = 0,
    ):
        self.images = DeviceImages(
            LabeledImages(split.images, split.labels), device, augment, mean, std, seed
        )
        self.tokens = vocabulary.encode(split.captions, MAX_CAPTION_TOKENS).to(device)
        self.device = self.images.device

    def __len__(self) -> int:
        return len(self.images)

    def batch(self, indices: torch.Tensor):
        images, labels = self.images.batch(indices)
        return (images, self.tokens[indices.to(self.device)]), torch.cat([labels, labels])

    def iterate(self, batch_size: int):
        for start, (images, labels) in zip(range(0, len(self), batch_size), self.images.iterate(batch_size)):
            yield (images, self.tokens[start : start + batch_size]), torch.cat([labels, labels])
