"""PK batches: P classes x K images of each (Hermans, Beyer & Leibe 2017, "In Defense of the
Triplet Loss for Person Re-Identification"; they use P=18, K=4 on Market-1501).

Every batch holds P distinct classes, drawn uniformly at random, with K images of each, so every
anchor has K-1 positives and (P-1)K negatives. Within an epoch each class walks through its own
random permutation, K images per visit, wrapping round when visited more often than it has
images; a class with fewer than K images is sampled with replacement. Index generation is
tensorised (sort by class then random key; no per-sample Python), deterministic in
(seed, epoch), and reshuffled every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

AUTO_P = 32  # p=0: min(AUTO_P, classes), as Hermans et al.'s P=32, K=4 batches


def _positive_int(value, key: str, minimum: int, why: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{key} must be an int >= {minimum} ({why}); got {value!r}")
    return int(value)


class PKSampler:
    """Yields int64 index tensors of P*K items (class by class); ``len()`` is the number of
    batches per epoch, ``max(1, N // (P*K))``, i.e. about one pass over the training set.

    ``classes_with_replacement`` lists the class ids with fewer than K images (sampled with
    replacement); its ``len()`` is how many there are. Iterating starts epoch ``self.epoch`` and then
    advances it; ``set_epoch(e)`` jumps to an epoch, so a resumed run sees the same batches. ``p=0``
    takes ``min(AUTO_P, classes)``.
    """

    def __init__(self, labels: torch.Tensor, p: int, k: int, seed: int = 0):
        if isinstance(p, bool) or p != 0:
            p = _positive_int(p, "batch.p", 2, "a batch needs at least 2 classes for negatives; 0 = auto")
        self.k = _positive_int(k, "batch.k", 2, "each class needs at least 2 images for positives")
        self.seed = _positive_int(seed, "seed", 0, "a non-negative random seed")
        labels = torch.as_tensor(labels).detach().to("cpu", torch.int64).flatten()
        if labels.numel() == 0:
            raise ValueError("PKSampler needs a non-empty training split")
        classes, self._class_of, self._counts = torch.unique(labels, return_inverse=True, return_counts=True)
        self.num_classes = int(self._counts.numel())
        self.p = min(AUTO_P, self.num_classes) if p == 0 else p
        if self.p > self.num_classes:
            raise ValueError(
                f"batch.p={self.p} exceeds the {self.num_classes} classes of the training split; "
                f"set batch.p to at most {self.num_classes} (or use a dataset with more classes)"
            )
        self._starts = torch.cumsum(self._counts, 0) - self._counts
        self.classes_with_replacement: list[int] = classes[self._counts < self.k].tolist()
        self.num_samples = int(labels.numel())
        self.epoch = 0

    def __len__(self) -> int:
        return max(1, self.num_samples // (self.p * self.k))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _positive_int(epoch, "epoch", 0, "epochs count from 0")

    def _generator(self, epoch: int) -> torch.Generator:
        state = np.random.SeedSequence([self.seed, epoch]).generate_state(1, np.uint64)[0]
        return torch.Generator().manual_seed(int(state))

    def epoch_batches(self, epoch: int) -> torch.Tensor:
        """All batches of ``epoch`` as an int64 tensor (len(self), P*K)."""
        generator = self._generator(epoch)
        n_batches, p, k = len(self), self.p, self.k
        # Sample indices grouped by class, in a fresh random order within each class.
        order = torch.randperm(self.num_samples, generator=generator)
        order = order[torch.sort(self._class_of[order], stable=True).indices]
        # P distinct classes per batch: the P smallest of uniform random keys.
        keys = torch.rand(n_batches, self.num_classes, generator=generator)
        chosen = keys.topk(p, dim=1, largest=False).indices.flatten()
        # How many times each chosen class was already visited earlier in the epoch.
        by_class = torch.sort(chosen, stable=True)
        _, visits = torch.unique_consecutive(by_class.values, return_counts=True)
        first = torch.repeat_interleave(torch.cumsum(visits, 0) - visits, visits)
        visit = torch.empty_like(chosen)
        visit[by_class.indices] = torch.arange(chosen.numel()) - first
        # K consecutive positions of the class's permutation per visit (wrapping round), or
        # K positions with replacement when the class is smaller than K.
        counts = self._counts[chosen].unsqueeze(1)
        walk = (visit.unsqueeze(1) * k + torch.arange(k)) % counts
        drawn = (torch.rand(chosen.numel(), k, generator=generator) * counts).long().clamp_(max=counts - 1)
        position = torch.where(counts < k, drawn, walk)
        return order[self._starts[chosen].unsqueeze(1) + position].reshape(n_batches, p * k)

    def __iter__(self) -> Iterator[torch.Tensor]:
        batches = self.epoch_batches(self.epoch)
        self.epoch += 1
        return iter(batches.unbind(0))
