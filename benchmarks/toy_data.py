"""Tiny Fashion-MNIST (IDX) and Omniglot (npz) files in the real formats, for toy-size benchmark runs.

The classes differ in brightness (Fashion-MNIST) or in where the ink is (Omniglot), so a
short training run has something to learn.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], values: np.ndarray) -> None:
    header = struct.pack(">" + "i" * (1 + len(dims)), magic, *dims)
    path.write_bytes(gzip.compress(header + values.astype(np.uint8).tobytes()))


def write_fashion_mnist(folder: Path, rng: np.random.Generator, train: int = 160, test: int = 80) -> Path:
    """The four IDX .gz files of a 10-class, 28x28 set in ``folder``; returns ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19  # class-dependent brightness
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, (n, 28, 28), images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, (n,), labels)
    return folder


def write_omniglot(path: Path, rng: np.random.Generator, classes: int = 16, drawers: int = 4) -> Path:
    """An ``images_background.npz``-layout file (105x105 booleans, True = background); returns ``path``."""
    images = np.ones((classes, drawers, 105, 105), dtype=bool)
    for c in range(classes):
        row, col = divmod(c % 16, 4)
        block = rng.random((drawers, 20, 20)) > 0.7
        images[c, :, row * 26 : row * 26 + 20, col * 26 : col * 26 + 20] = block
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, labels=np.arange(classes * drawers).reshape(classes, drawers) // drawers)
    return path
