"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) from its four IDX files, gzipped or not.

IDX layout (LeCun et al., the MNIST format): a big-endian int32 magic number (2051 for uint8
images with 3 dimensions, 2049 for uint8 labels with 1), the dimension sizes as big-endian int32,
then the raw uint8 values. 60,000 training and 10,000 test images, 28x28 grey, 10 classes.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch

from experiments.data.base import SourceImages

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)


def _read_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    if data[:2] == b"\x1f\x8b":
        try:
            return gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: not a readable gzip file ({exc}); re-download it") from exc
    return data


def _header(path: Path, data: bytes, magic: int, ndim: int) -> list[int]:
    header_size = 4 * (1 + ndim)
    if len(data) < header_size:
        raise ValueError(f"{path}: expected an IDX header of {header_size} bytes, found {len(data)} bytes")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ValueError(f"{path}: expected IDX magic number {magic}, found {found}")
    dims = [int.from_bytes(data[4 * i : 4 * i + 4], "big") for i in range(1, ndim + 1)]
    expected = header_size + int(np.prod(dims))
    if len(data) != expected:
        raise ValueError(
            f"{path}: header {dims} means {expected} bytes, found {len(data)} bytes "
            "(truncated or corrupt file)"
        )
    return dims


def read_idx_images(path: Path) -> torch.Tensor:
    """An IDX image file as uint8 (N, 1, rows, cols)."""
    data = _read_bytes(path)
    count, rows, cols = _header(path, data, IMAGES_MAGIC, 3)
    pixels = np.frombuffer(data, dtype=np.uint8, offset=16).reshape(count, 1, rows, cols)
    return torch.from_numpy(pixels.copy())


def read_idx_labels(path: Path) -> torch.Tensor:
    """An IDX label file as int64 (N,)."""
    data = _read_bytes(path)
    _header(path, data, LABELS_MAGIC, 1)
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=8).astype(np.int64))


def _find(directory: Path, stem: str) -> Path:
    for candidate in (directory / f"{stem}.gz", directory / stem):
        if candidate.is_file():
            return candidate
    raise ValueError(
        f"{directory}: missing {stem}.gz (or uncompressed {stem}); "
        "dataset.path must be the folder holding the four Fashion-MNIST IDX files"
    )


def load_fashion_mnist(path: Path) -> SourceImages:
    """The 70,000 images, with ``standard_test`` and ``official_test`` marking the official 10,000
    test images (the same 10 classes as the 60,000 training images)."""
    parts = []
    for split, (images_stem, labels_stem) in FILES.items():
        images_path, labels_path = _find(path, images_stem), _find(path, labels_stem)
        images, labels = read_idx_images(images_path), read_idx_labels(labels_path)
        if images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{images_path} holds {images.shape[0]} images but {labels_path} holds "
                f"{labels.shape[0]} labels; the two files must belong together"
            )
        parts.append((images, labels, torch.full((labels.shape[0],), split == "test")))
    if parts[0][0].shape[1:] != parts[1][0].shape[1:]:
        raise ValueError(
            f"{path}: training images are {tuple(parts[0][0].shape[2:])} but test images "
            f"are {tuple(parts[1][0].shape[2:])}"
        )
    images, labels, is_test = (torch.cat(columns) for columns in zip(*parts))
    names = {i: name for i, name in enumerate(CLASS_NAMES)} if int(labels.max()) < len(CLASS_NAMES) else None
    return SourceImages(images, labels, standard_test=is_test, class_names=names, official_test=is_test)
