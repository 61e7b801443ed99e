"""The containers every dataset loader and split produces."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class LabeledImages:
    """Images with their class ids: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,).

    ``hflip`` says whether a horizontal flip keeps an image's class (faces, clothes: yes;
    digits, characters: no); ``mean``/``std`` are per-channel statistics of the training split
    in [0, 1] units, set by ``load_dataset`` on every split so that all splits are normalised alike.
    """

    images: torch.Tensor
    labels: torch.Tensor
    hflip: bool = False
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(
                f"images must be a uint8 tensor (N, C, H, W); got {self.images.dtype} "
                f"with shape {tuple(self.images.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(
                f"labels must be an int64 tensor of shape ({self.images.shape[0]},); got "
                f"{self.labels.dtype} with shape {tuple(self.labels.shape)}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def classes(self) -> list[int]:
        """The sorted class ids present."""
        return torch.unique(self.labels).tolist()

    def subset(self, indices: torch.Tensor) -> "LabeledImages":
        """The images at ``indices``, keeping flags and statistics."""
        return LabeledImages(self.images[indices], self.labels[indices], self.hflip, self.mean, self.std)


@dataclass
class DatasetSplits:
    """Train, validation and test images plus ``info``, the record of the split kept with the run.

    With a ``gallery`` (In-shop's official split), ``test`` holds the queries and test retrieval
    ranks the gallery for each query; else each test image queries the rest of ``test``.
    """

    train: LabeledImages
    val: LabeledImages
    test: LabeledImages
    info: dict[str, Any] = field(default_factory=dict)
    gallery: LabeledImages | None = None


@dataclass
class SourceImages:
    """What a format loader returns: all images of a dataset with original class ids.

    ``standard_test`` marks the dataset's own test images of the training classes (``None`` when it
    has no such split); ``official_test`` marks the test images of the official split (its queries
    when there is a gallery) and ``gallery`` its gallery images (bool masks, ``None`` = none);
    ``class_names`` maps class id to a readable name where the format has one.
    """

    images: torch.Tensor
    labels: torch.Tensor
    standard_test: torch.Tensor | None = None
    class_names: dict[int, str] | None = None
    official_test: torch.Tensor | None = None
    gallery: torch.Tensor | None = None
