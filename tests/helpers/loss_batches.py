"""Seeded test batches for the loss tests: random PK batches and clustered PK batches.

Both return ``(embeddings, labels)``: ``p`` classes with ``k`` samples each, rows in a seeded
random order (so no loss may rely on labels being sorted), int64 labels.
"""

from __future__ import annotations

import torch


def _pk_labels(p: int, k: int, generator: torch.Generator) -> torch.Tensor:
    labels = torch.arange(p, dtype=torch.int64).repeat_interleave(k)
    return labels[torch.randperm(p * k, generator=generator)]


def pk_batch(
    p: int,
    k: int,
    d: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``p * k`` standard-normal embeddings of dimension ``d`` with ``p`` classes of ``k`` each."""
    generator = torch.Generator().manual_seed(seed)
    labels = _pk_labels(p, k, generator)
    embeddings = torch.randn(p * k, d, generator=generator, dtype=torch.float64)
    return embeddings.to(device=device, dtype=dtype), labels.to(device)


def clustered_batch(
    p: int,
    k: int,
    d: int,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    spread: float = 0.5,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``p`` unit-norm class centres plus Gaussian noise of standard deviation ``spread / sqrt(d)``.

    Small ``spread`` gives mostly easy triplets, ``spread`` near 1 a mix of easy, semi-hard and hard.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = _pk_labels(p, k, generator)
    directions = torch.randn(p, d, generator=generator, dtype=torch.float64)
    centres = torch.nn.functional.normalize(directions, dim=1)
    noise = torch.randn(p * k, d, generator=generator, dtype=torch.float64) * (spread / d**0.5)
    embeddings = centres[labels] + noise
    return embeddings.to(device=device, dtype=dtype), labels.to(device)
