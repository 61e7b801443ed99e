"""Embedding geometry of a labelled split, tracked per epoch on validation.

- alignment and uniformity (Wang & Isola, ICML 2020) and the mean intra- and inter-class distances
  with their ratio (intra / inter; lower separates classes better), from
  :mod:`experiments.eval.embedding_quality`, in its reference geometry (squared euclidean between
  L2-normalised embeddings) for every loss;
- spectral decay rho (Roth et al., "Revisiting Training Strategies and Generalization Performance in
  Deep Metric Learning", ICML 2020): the KL divergence ``KL(U || S)`` between the uniform
  distribution and the embedding matrix's singular values normalised to sum to 1 (their
  ``rho_spectrum@1``); 0 when every direction carries as much, larger as the spectrum decays.

On at most :data:`GEOMETRY_POINTS` embeddings, a seeded subset, so it costs little per epoch.
"""

from __future__ import annotations

import math

import torch

from experiments.eval.embedding_quality import alignment_uniformity, reference_triplet_statistics

GEOMETRY_POINTS = 2000
GEOMETRY_KEYS = (
    "alignment",
    "uniformity",
    "intra_class_distance",
    "inter_class_distance",
    "distance_ratio",
    "spectral_decay",
)


def spectral_decay(embeddings: torch.Tensor) -> float:
    """``KL(U || S)`` of the singular values ``S`` (normalised to sum to 1) of ``embeddings`` (n, d)."""
    s = torch.linalg.svdvals(embeddings.detach().to(torch.float64))
    if float(s.sum()) == 0:
        return math.nan
    p = s / s.sum()
    uniform = 1.0 / len(s)
    return float((uniform * torch.log(uniform / p.clamp_min(1e-300))).sum())


def embedding_geometry(
    embeddings: torch.Tensor, labels: torch.Tensor, points: int = GEOMETRY_POINTS, seed: int = 0
) -> dict[str, float]:
    """The :data:`GEOMETRY_KEYS` of a labelled set; empty when it has no positive and negative pair."""
    if embeddings.shape[0] > points:
        keep = torch.randperm(embeddings.shape[0], generator=torch.Generator().manual_seed(seed))[:points]
        keep = keep.to(embeddings.device)
        embeddings, labels = embeddings[keep], labels[keep]
    _, counts = torch.unique(labels, return_counts=True)
    if len(counts) < 2 or int(counts.max()) < 2:
        return {}
    alignment, uniformity = alignment_uniformity(embeddings, labels)
    distances = reference_triplet_statistics(embeddings, labels)
    intra, inter = distances["intra_class_distance"], distances["inter_class_distance"]
    return {
        "alignment": alignment,
        "uniformity": uniformity,
        "intra_class_distance": intra,
        "inter_class_distance": inter,
        "distance_ratio": intra / inter if inter > 0 else math.nan,
        "spectral_decay": spectral_decay(embeddings),
    }
