"""Where a dataset's uint8 (N, C, H, W) images live, and gathering rows of them.

``TensorImages`` holds them in memory. ``CachedImages`` reads them on demand from a decoded-image
cache file (``.npy``, see ``decode_cache``) with positioned reads into the batch buffer, so a
process holds only the rows it asked for: the page cache keeps recently read rows warm, but they
are not part of the process's resident memory, as the pages of a memory map would be.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np
import torch

from experiments.data.imaging import channel_stats


class ImageStore(ABC):
    """uint8 images of ``shape`` (N, C, H, W); ``gather(rows)`` copies rows out as a CPU tensor."""

    shape: tuple[int, int, int, int]

    def __len__(self) -> int:
        return self.shape[0]

    def _empty(self, count: int, pin: bool, out: torch.Tensor | None) -> torch.Tensor:
        if out is None:
            return torch.empty((count, *self.shape[1:]), dtype=torch.uint8, pin_memory=pin)
        if out.shape != (count, *self.shape[1:]) or out.dtype != torch.uint8 or not out.is_contiguous():
            raise ValueError(
                f"out must be a contiguous uint8 tensor {(count, *self.shape[1:])}; "
                f"got {out.dtype} {tuple(out.shape)}"
            )
        return out

    @abstractmethod
    def gather(self, rows: torch.Tensor, pin: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        """The images at ``rows`` (int64), in that order, written into ``out`` when given, else into
        a new tensor (in pinned memory when ``pin``)."""

    @abstractmethod
    def channel_stats(self, rows: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel mean and standard deviation of the images at ``rows``, in [0, 1] units."""


class TensorImages(ImageStore):
    """Images held in a uint8 (N, C, H, W) tensor."""

    def __init__(self, images: torch.Tensor):
        if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8 or images.dim() != 4:
            got = (
                f"{images.dtype} with shape {tuple(images.shape)}"
                if isinstance(images, torch.Tensor)
                else type(images).__name__
            )
            raise ValueError(f"images must be a uint8 tensor (N, C, H, W); got {got}")
        self.tensor = images
        self.shape = tuple(images.shape)

    def gather(self, rows: torch.Tensor, pin: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        return torch.index_select(self.tensor, 0, rows.cpu(), out=self._empty(rows.numel(), pin, out))

    def channel_stats(self, rows: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return channel_stats(self.tensor[rows])


class CachedImages(ImageStore):
    """Images in a ``.npy`` file (C order, uint8, data at byte ``offset``), read row by row.

    ``sums`` is int64 (N, 2, C): each image's per-channel sum of pixel values and of their squares,
    from which ``channel_stats`` of any rows is exact and instant.
    """

    def __init__(self, path: Path, offset: int, shape: tuple[int, int, int, int], sums: np.ndarray):
        self.path, self.offset, self.shape, self.sums = Path(path), int(offset), tuple(shape), sums
        self.row_bytes = int(np.prod(self.shape[1:]))
        self._fd: int | None = None

    def __del__(self) -> None:
        if self._fd is not None:
            os.close(self._fd)

    def _read(self, buffer: memoryview, first_row: int) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY)
        offset = self.offset + first_row * self.row_bytes
        if hasattr(os, "preadv"):
            read = os.preadv(self._fd, [buffer], offset)
        else:
            data = os.pread(self._fd, len(buffer), offset)
            buffer[: len(data)] = data
            read = len(data)
        if read != len(buffer):
            raise ValueError(
                f"{self.path}: the decoded-image cache file ended early (changed after it was "
                "opened); delete it and run again to rebuild it"
            )

    def gather(self, rows: torch.Tensor, pin: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
        out = self._empty(rows.numel(), pin, out)
        if rows.numel() == 0:
            return out
        flat = memoryview(out.numpy()).cast("B")
        order = rows.cpu().numpy()
        if order.min() < 0 or order.max() >= len(self):
            raise IndexError(f"rows must be in [0, {len(self)}); got {int(order.min())}..{int(order.max())}")
        starts = np.flatnonzero(np.diff(order, prepend=order[0] - 2) != 1)  # runs of consecutive rows
        ends = np.append(starts[1:], order.size)
        for start, end in zip(starts.tolist(), ends.tolist()):
            self._read(flat[start * self.row_bytes : end * self.row_bytes], int(order[start]))
        return out

    def channel_stats(self, rows: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
        totals = self.sums[rows.cpu().numpy()].sum(axis=0, dtype=np.float64)  # (2, C)
        count = max(1, rows.numel() * self.shape[2] * self.shape[3])
        mean = totals[0] / 255.0 / count
        std = np.sqrt(np.clip(totals[1] / 255.0**2 / count - mean**2, 0, None)).clip(min=1e-3)
        return tuple(mean.tolist()), tuple(std.tolist())


def as_store(images: torch.Tensor | ImageStore) -> ImageStore:
    """``images`` as an ``ImageStore`` (a tensor is wrapped, not copied)."""
    return images if isinstance(images, ImageStore) else TensorImages(images)
