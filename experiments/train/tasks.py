"""What differs between a run on labelled images and one on (image, caption) pairs: a task.

A run is the same steps for both (:mod:`experiments.train.run`): data, model, objective, train,
evaluate, log. A task says how to do the steps that depend on the data: build the model, wrap the
registry loss as the training objective, put the splits on the device, validate, and embed and
score the test split.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from experiments.config import ExperimentConfig
from experiments.data.base import DatasetSplits, LabeledImages
from experiments.data.captions import Vocabulary
from experiments.data.device_data import DeviceImages
from experiments.data.imaging import channel_stats
from experiments.data.paired import PairedDeviceData, PairedSplits
from experiments.data.registry import is_paired
from experiments.eval.crossmodal import cross_modal_metrics
from experiments.eval.retrieval import HEADLINE_METRICS, retrieval_metrics
from experiments.eval.run_metrics import embed_split, test_metrics, validate_split
from experiments.models.backbones import input_options, load_backbone_weights
from experiments.models.image import build_model
from experiments.models.two_tower import TwoTower, build_two_tower
from losses import MetricLoss

IDENTITY_DATASETS = ("orl-faces",)  # verification metrics on by default


def with_dense_labels(split: LabeledImages) -> LabeledImages:
    """The training split with class ids renumbered 0..C-1 (losses with one parameter per class,
    like triplet_center, index by label; a class-disjoint split keeps the dataset's own ids)."""
    _, dense = torch.unique(split.labels, return_inverse=True)
    return split.with_labels(dense)


def build_run_model(cfg: ExperimentConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    """The freshly initialised embedding network of ``cfg`` for images of ``image_shape`` (C, H, W)."""
    channels, height, width = image_shape
    crop = cfg.dataset.crop_size
    return build_model(
        cfg.model.name,
        channels,
        (crop, crop) if crop else (height, width),
        cfg.model.embedding_dim,
        cfg.model.normalize,
        cfg.seed,
        freeze_bn=cfg.model.freeze_bn,
    )


class ImageTask:
    """Labelled images: one network, validation and test retrieval within a split (or against the
    gallery), embedding quality and, for identities, face verification."""

    def __init__(self, cfg: ExperimentConfig, splits: DatasetSplits):
        self.cfg, self.splits = cfg, splits
        self.inputs = {
            **input_options(cfg.dataset.crop_size, cfg.model.weights),
            "resident_mb": cfg.dataset.resident_mb,
        }

    def training_split(self) -> LabeledImages:
        return with_dense_labels(self.splits.train)

    def run_params(self) -> dict[str, Any]:
        return {}

    def build_model(self, train_split: LabeledImages, log_params) -> nn.Module:
        """The network, with its pretrained backbone weights (their file and digest logged)."""
        model = build_run_model(self.cfg, train_split.image_shape)
        if self.cfg.model.weights:
            log_params(load_backbone_weights(model, self.cfg.model.weights))
        return model

    def objective(self, loss: MetricLoss) -> MetricLoss:
        return loss

    def device_data(self, train_split: LabeledImages, val_split: LabeledImages, device: torch.device):
        """``(training data, validation data or None)`` on the device; only training is augmented."""
        train = DeviceImages(
            train_split, device, augment=self.cfg.dataset.augment, seed=self.cfg.seed, **self.inputs
        )
        val = DeviceImages(val_split, device, augment=False, **self.inputs) if len(val_split) > 1 else None
        return train, val

    validate = staticmethod(validate_split)

    def embed(self, model: nn.Module, split: LabeledImages | None, device: torch.device):
        """``(embeddings, labels)`` of ``split`` fed to the model as in training, never augmented
        (``None`` for no split: the test queries rank no separate gallery)."""
        if split is None:
            return None
        return embed_split(
            model, DeviceImages(split, device, augment=False, **self.inputs), self.cfg.eval.batch_size
        )

    def score(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor,
        gallery: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict[str, float]:
        """Unprefixed test metrics: retrieval (against ``gallery`` when given), embedding quality in
        one reference geometry for every loss, and verification where ``eval.verification`` (or the
        dataset) asks."""
        cfg = self.cfg
        verification = cfg.eval.verification
        if verification is None:
            verification = cfg.dataset.name in IDENTITY_DATASETS
        return test_metrics(embeddings, labels, verification, cfg.seed, gallery=gallery)

    def test(self, model: nn.Module, device: torch.device):
        """``(unprefixed test metrics, arrays of the embeddings artifact)``."""
        embeddings, labels = self.embed(model, self.splits.test, device)
        gallery = self.embed(model, self.splits.gallery, device)
        arrays = {"embeddings": embeddings, "labels": labels}
        if gallery is not None:
            arrays.update(ref_embeddings=gallery[0], ref_labels=gallery[1])
        return self.score(embeddings, labels, gallery), arrays


class PairedObjective(MetricLoss):
    """A registry loss applied to a paired batch's stacked (image; text) embeddings, whose labels come
    once per modality: a cross-modal loss gets ``loss(image, labels, text, labels)``; any other loss
    the concatenated modalities, ``loss(cat(image, text), cat(labels, labels))``."""

    def __init__(self, loss: MetricLoss):
        super().__init__()
        self.loss = loss
        self.cross_modal_loss = type(loss).cross_modal

    def set_progress(self, fraction: float) -> None:
        self.loss.set_progress(fraction)

    def compute(self, embeddings, labels, ref_embeddings, ref_labels) -> torch.Tensor:
        if self.cross_modal_loss:
            image, text = embeddings.chunk(2)
            pair_labels = labels[: image.shape[0]]
            value = self.loss.compute(image, pair_labels, text, pair_labels)
        else:
            value = self.loss.compute(embeddings, labels, None, None)
        self.last_stats = self.loss.last_stats
        return value


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
    image, text, labels = embed_pairs(model, data, batch_size)
    if not bool(torch.isfinite(image).all() & torch.isfinite(text).all()):
        return {k: float("nan") for k in HEADLINE_METRICS}
    metrics = retrieval_metrics(image, labels, text, labels, ks=(1,), with_nmi=False)
    return {k: float(metrics[k]) for k in HEADLINE_METRICS}


class PairedTask:
    """(image, caption, label) pairs: two towers into one space (VSE++, Faghri et al. 2018).

    Test metrics: image-to-text and text-to-image Recall@{1,5,10}, median rank and label-level MAP@R
    (:mod:`experiments.eval.crossmodal`), plus P@1, R-precision and MAP@R of image queries against
    the text gallery by label, so sweeps compare cross-modal losses with the same columns as the
    others. The embeddings artifact holds the image embeddings as ``embeddings`` and the text
    embeddings as ``ref_embeddings``.
    """

    validate = staticmethod(validate_pairs)

    def __init__(self, cfg: ExperimentConfig, splits: PairedSplits):
        unsupported = [
            key
            for key, value in (
                ("model.weights", cfg.model.weights),
                ("model.freeze_bn", cfg.model.freeze_bn),
                ("dataset.crop_size", cfg.dataset.crop_size),
            )
            if value
        ]
        if unsupported:
            raise ValueError(
                f"{', '.join(unsupported)} are not supported for the paired dataset "
                f"{cfg.dataset.name!r} (its image tower is the small CNN or ResNet): remove them"
            )
        self.cfg, self.splits = cfg, splits
        self.vocabulary = Vocabulary(splits.train.captions)
        self.stats = channel_stats(splits.train.images)  # every split is normalised as training is

    def _on_device(self, split, device: torch.device, augment: bool) -> PairedDeviceData:
        return PairedDeviceData(split, self.vocabulary, device, augment, *self.stats, self.cfg.seed)

    def training_split(self):
        return self.splits.train

    def run_params(self) -> dict[str, Any]:
        return {"data.vocabulary_size": len(self.vocabulary)}

    def build_model(self, train_split, log_params) -> nn.Module:
        return build_two_tower(self.cfg, train_split, self.vocabulary)

    def objective(self, loss: MetricLoss) -> MetricLoss:
        return PairedObjective(loss)

    def device_data(self, train_split, val_split, device: torch.device):
        val = self._on_device(val_split, device, augment=False)
        return self._on_device(train_split, device, self.cfg.dataset.augment), val if len(val) > 1 else None

    def test(self, model: nn.Module, device: torch.device):
        data = self._on_device(self.splits.test, device, augment=False)
        image, text, labels = embed_pairs(model, data, self.cfg.eval.batch_size)
        metrics = cross_modal_metrics(image, text, labels)
        by_label = retrieval_metrics(image, labels, text, labels, with_nmi=False)
        metrics.update({k: by_label[k] for k in HEADLINE_METRICS})
        return metrics, {"embeddings": image, "labels": labels, "ref_embeddings": text, "ref_labels": labels}


def make_task(cfg: ExperimentConfig, splits) -> ImageTask | PairedTask:
    """The task for ``cfg``'s dataset and its loaded ``splits``."""
    if is_paired(cfg.dataset.name):
        return PairedTask(cfg, splits)
    return ImageTask(cfg, splits)


__all__ = ["ImageTask", "PairedObjective", "PairedTask", "build_run_model", "make_task", "with_dense_labels"]
