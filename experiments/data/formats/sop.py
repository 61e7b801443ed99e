"""Stanford Online Products (Oh Song et al., "Deep Metric Learning via Lifted Structured Feature
Embedding", CVPR 2016): 120,053 eBay photos of 22,634 products in 12 super-classes.

The official split: ``Ebay_train.txt`` (11,318 products, 59,551 images) trains and
``Ebay_test.txt`` (11,316 products, 60,502 images) tests. Each file has the header line
``image_id class_id super_class_id path``, then one image per line, its path relative to the
extracted ``Stanford_Online_Products/`` folder. Class id = the official ``class_id`` minus one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from experiments.data.base import SourceImages
from experiments.data.formats.listed_images import (
    decode_rgb,
    existing_files,
    find_root,
    parse_int,
    read_table,
)

FOLDER = "Stanford_Online_Products"
PARTS = ("Ebay_train.txt", "Ebay_test.txt")
HEADER = ["image_id", "class_id", "super_class_id", "path"]
OFFICIAL = "Ebay_train.txt trains, Ebay_test.txt tests (Oh Song et al. 2016)"


def _read_part(file: Path) -> list[list[str]]:
    rows = read_table(file, len(HEADER))
    if not rows or rows[0] != HEADER:
        raise ValueError(f"{file}: expected the header line {' '.join(HEADER)!r}")
    return rows[1:]


def sop_index(path: Path) -> tuple[list[Path], torch.Tensor, torch.Tensor]:
    """The image files (train, then test), their class ids and the official test mask."""
    root = find_root(path, FOLDER, PARTS[0])
    if not (root / PARTS[1]).is_file():
        raise ValueError(f"{root / PARTS[1]} not found: dataset.path must be the extracted {FOLDER} folder")
    files, labels, is_test = [], [], []
    for part in PARTS:
        index = root / part
        rows = _read_part(index)
        files += existing_files(root, [image for _, _, _, image in rows], index)
        labels += [parse_int(class_id, index, "class_id") - 1 for _, class_id, _, _ in rows]
        is_test += [part == PARTS[1]] * len(rows)
    return files, torch.tensor(labels, dtype=torch.int64), torch.tensor(is_test, dtype=torch.bool)


def load_sop(path: Path, size: tuple[int, int]) -> SourceImages:
    """All images as RGB (N, 3, *size) uint8; ``official_test`` marks the Ebay_test.txt images."""
    files, labels, is_test = sop_index(path)
    return SourceImages(decode_rgb(files, size), labels, official_test=is_test)
