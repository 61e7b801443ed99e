"""The containers every dataset loader and split produces."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from experiments.data.image_store import ImageStore, TensorImages, as_store


class LabeledImages:
    """Images with their class ids: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,).

    The images are rows ``rows`` of ``store`` (an ``ImageStore``, or a tensor; ``rows=None``: all
    of it, in order), so that splits of one dataset are index arrays into it rather than copies;
    ``images`` gathers a split's rows into a new tensor (a tensor store without ``rows`` is
    returned as is). ``hflip`` says whether a horizontal flip keeps an image's class (faces,
    clothes: yes; digits, characters: no); ``mean``/``std`` are per-channel statistics of the
    training split in [0, 1] units, set by ``load_dataset`` on every split so that all splits are
    normalised alike.
    """

    def __init__(
        self,
        store: torch.Tensor | ImageStore,
        labels: torch.Tensor,
        hflip: bool = False,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
        rows: torch.Tensor | None = None,
    ):
        self.store, self.rows = as_store(store), rows
        self.labels, self.hflip, self.mean, self.std = labels, hflip, mean, std
        if rows is not None and (
            not isinstance(rows, torch.Tensor) or rows.dtype != torch.int64 or rows.dim() != 1
        ):
            raise ValueError(f"rows must be an int64 tensor (N,) of store rows; got {rows!r:.80}")
        count = self.store.shape[0] if rows is None else rows.shape[0]
        if getattr(labels, "dtype", None) != torch.int64 or tuple(labels.shape) != (count,):
            raise ValueError(
                f"labels must be an int64 tensor of shape ({count},); got "
                f"{getattr(labels, 'dtype', type(labels).__name__)} with shape "
                f"{tuple(getattr(labels, 'shape', ()))}"
            )

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image."""
        return tuple(self.store.shape[1:])

    @property
    def nbytes(self) -> int:
        """The size of the split's images as uint8."""
        return len(self) * int(np.prod(self.image_shape))

    def store_rows(self) -> torch.Tensor:
        """The split's rows of ``store``, as an int64 tensor."""
        return torch.arange(self.store.shape[0]) if self.rows is None else self.rows

    def gather(
        self, indices: torch.Tensor | None = None, pin: bool = False, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The split's images at ``indices`` (default all), copied into ``out`` or a new CPU tensor
        (pinned if ``pin``)."""
        rows = self.store_rows()
        return self.store.gather(rows if indices is None else rows[indices.cpu()], pin=pin, out=out)

    @property
    def images(self) -> torch.Tensor:
        if self.rows is None and isinstance(self.store, TensorImages):
            return self.store.tensor
        return self.gather()

    def channel_stats(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and standard deviation of the split's images in [0, 1] units."""
        return self.store.channel_stats(self.store_rows())

    def classes(self) -> list[int]:
        """The sorted class ids present."""
        return torch.unique(self.labels).tolist()

    def subset(self, indices: torch.Tensor) -> "LabeledImages":
        """The images at ``indices`` (rows of the same store), keeping flags and statistics."""
        return LabeledImages(
            self.store, self.labels[indices], self.hflip, self.mean, self.std, rows=self.store_rows()[indices]
        )

    def with_labels(self, labels: torch.Tensor) -> "LabeledImages":
        """The same images with other class ids."""
        return LabeledImages(self.store, labels, self.hflip, self.mean, self.std, rows=self.rows)

    def joined(self, other: "LabeledImages") -> "LabeledImages":
        """These images followed by ``other``'s (rows of the same store when they share one), with
        this split's flags and statistics."""
        if other.store is self.store:
            return LabeledImages(
                self.store,
                torch.cat([self.labels, other.labels]),
                self.hflip,
                self.mean,
                self.std,
                rows=torch.cat([self.store_rows(), other.store_rows()]),
            )
        return LabeledImages(
            torch.cat([self.images, other.images]),
            torch.cat([self.labels, other.labels]),
            self.hflip,
            self.mean,
            self.std,
        )


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
    ``class_names`` maps class id to a readable name where the format has one. ``images`` is a
    uint8 (N, C, H, W) tensor or an ``ImageStore`` (a decoded-image cache).
    """

    images: torch.Tensor | ImageStore
    labels: torch.Tensor
    standard_test: torch.Tensor | None = None
    class_names: dict[int, str] | None = None
    official_test: torch.Tensor | None = None
    gallery: torch.Tensor | None = None
