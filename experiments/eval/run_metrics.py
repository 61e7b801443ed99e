"""Embedding a split with a trained model, and the validation and test metrics of a run."""

from __future__ import annotations

import torch
from torch import nn

from experiments.data.device_data import DeviceImages
from experiments.eval.embedding_quality import embedding_quality
from experiments.eval.geometry import embedding_geometry
from experiments.eval.retrieval import HEADLINE_METRICS, retrieval_metrics
from experiments.eval.verification import MAX_SAMPLES, verification_metrics

VAL_METRICS = tuple(HEADLINE_METRICS)  # validated every epoch


def channels_last(inputs):
    """4-D image tensors in channels-last memory order (faster convolutions on CUDA and on CPU);
    other inputs, and the tensors inside a tuple (a two-tower model's images and tokens), as needed."""
    if isinstance(inputs, tuple):
        return tuple(channels_last(x) for x in inputs)
    return inputs.contiguous(memory_format=torch.channels_last) if inputs.dim() == 4 else inputs


@torch.no_grad()
def embed_split(model: nn.Module, data: DeviceImages, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 embeddings and labels of every image of a split, in order, never augmented."""
    was_training = model.training
    model.eval()
    device = data.device
    chunks, labels = [], []
    for images, lab in data.iterate(batch_size):
        images = channels_last(images)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            chunks.append(model(images).float())
        labels.append(lab)
    model.train(was_training)
    return torch.cat(chunks), torch.cat(labels)


def validation_metrics(embeddings: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """P@1, R-precision and MAP@R (Musgrave et al. 2020), each query against the rest of the split."""
    metrics = retrieval_metrics(embeddings, labels, ks=(1,), with_nmi=False)
    return {k: float(metrics[k]) for k in VAL_METRICS}


def validate_split(model: nn.Module, data: DeviceImages, batch_size: int) -> dict[str, float]:
    """The validation metrics of ``model`` on a split (NaN when its embeddings are not finite) and
    the geometry of its embeddings (:mod:`experiments.eval.geometry`)."""
    embeddings, labels = embed_split(model, data, batch_size)
    if not bool(torch.isfinite(embeddings).all()):
        return {k: float("nan") for k in VAL_METRICS}
    return {**validation_metrics(embeddings, labels), **embedding_geometry(embeddings, labels)}


def test_metrics(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    verification: bool,
    seed: int = 0,
    gallery: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Every retrieval metric, embedding quality (alignment, uniformity, class distances and the
    easy/semi-hard/hard triplet shares, in the reference geometry of
    :mod:`experiments.eval.embedding_quality`) and, with ``verification``, face
    verification metrics (``verification_<name>``) over all pairs of at most
    ``verification.MAX_SAMPLES`` embeddings (a seeded subset when there are more).

    With ``gallery`` (embeddings, labels), ``embeddings`` are queries and retrieval ranks the
    gallery (In-shop's protocol, Liu et al. 2016); quality and verification cover both sets."""
    ref = gallery if gallery is not None else (None, None)
    metrics = {k: float(v) for k, v in retrieval_metrics(embeddings, labels, *ref, seed=seed).items()}
    if gallery is not None:
        embeddings, labels = torch.cat([embeddings, gallery[0]]), torch.cat([labels, gallery[1]])
    metrics.update({k: float(v) for k, v in embedding_quality(embeddings, labels).items()})
    if verification:
        if embeddings.shape[0] > MAX_SAMPLES:
            keep = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(seed))[
                :MAX_SAMPLES
            ]
            embeddings, labels = embeddings[keep.to(embeddings.device)], labels[keep.to(labels.device)]
        pairs = verification_metrics(embeddings, labels, seed=seed)
        metrics.update({f"verification_{k}": float(v) for k, v in pairs.items()})
    return metrics
