"""Images kept on the training device as uint8; batches are gathered, augmented and normalised
there, with no DataLoader workers and no per-sample Python (the airbench approach).

Augmentation is the light one common to small-image metric learning: a random crop of the
original size from the image zero-padded by ``pad`` pixels (default max(1, min(H, W) // 8), 4 for
32x32 as in CIFAR training, 3 for 28x28, 1 for 8x8), plus a horizontal flip with probability 0.5
when the dataset allows it (``LabeledImages.hflip``). Randomness comes from a seeded generator on
the device, so augmented batches are reproducible.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F

from experiments.datasets.base import LabeledImages
from experiments.datasets.imaging import channel_stats


def _channel_tensor(values: Sequence[float], channels: int, key: str, device: torch.device) -> torch.Tensor:
    values = tuple(float(v) for v in values)
    if len(values) != channels:
        raise ValueError(f"{key} needs one value per channel ({channels}); got {len(values)}: {values}")
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, channels, 1, 1)


class DeviceImages:
    """A split resident on ``device``: ``batch(indices) -> (float32 images, int64 labels)``.

    Images are normalised with ``mean``/``std`` if given, else the split's own recorded training
    statistics (``LabeledImages.mean``/``std``, set by ``load_dataset``), else statistics of this
    split. ``augment`` turns on the random crop (and flip where ``split.hflip``).
    """

    def __init__(self, split: LabeledImages, device: str | torch.device, augment: bool = False,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 seed: int = 0, pad: int | None = None):
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.augment = bool(augment)
        self.hflip = bool(split.hflip)
        channels, height, width = self.images.shape[1:]
        if mean is None or std is None:
            own_mean, own_std = (split.mean, split.std) if split.mean is not None and split.std is not None \
                else channel_stats(split.images)
            mean = own_mean if mean is None else mean
            std = own_std if std is None else std
        self.mean = _channel_tensor(mean, channels, "mean", self.device)
        self.std = _channel_tensor(std, channels, "std", self.device)
        if bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive per channel; got {tuple(self.std.flatten().tolist())}")
        self.pad = max(1, min(height, width) // 8) if pad is None else int(pad)
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0 pixels; got {pad}")
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self._rows = torch.arange(height, device=self.device)
        self._cols = torch.arange(width, device=self.device)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _crop_and_flip(self, images: torch.Tensor) -> torch.Tensor:
        """Random crops of the zero-padded images, flipped where drawn; one gather on the device."""
        n, channels = images.shape[:2]
        padded = F.pad(images, (self.pad,) * 4)
        shift = torch.randint(0, 2 * self.pad + 1, (2, n), generator=self.generator, device=self.device)
        cols = self._cols.expand(n, -1)
        if self.hflip:
            flip = torch.rand(n, generator=self.generator, device=self.device) < 0.5
            cols = torch.where(flip.unsqueeze(1), cols.flip(1), cols)
        rows = shift[0].unsqueeze(1) + self._rows
        cols = shift[1].unsqueeze(1) + cols
        # One flat gather per image (several times faster than 4-d advanced indexing on CPU).
        flat = (rows.unsqueeze(2) * padded.shape[-1] + cols.unsqueeze(1)).view(n, 1, -1).expand(n, channels, -1)
        return padded.flatten(2).gather(2, flat).view(n, channels, *images.shape[2:])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images -> float32 ``(x / 255 - mean) / std``."""
        return (images.float().div_(255.0) - self.mean) / self.std

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels at ``indices`` (any device), augmented if ``augment``."""
        indices = torch.as_tensor(indices, dtype=torch.int64).to(self.device, non_blocking=True)
        images = self.images[indices]
        if self.augment and images.shape[0] > 0:
            images = self._crop_and_flip(images)
        return self.normalise(images), self.labels[indices]

    def iterate(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every image once, in order, in chunks of ``batch_size``, never augmented (evaluation)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        for start in range(0, len(self), batch_size):
            yield self.normalise(self.images[start:start + batch_size]), self.labels[start:start + batch_size]
