"""CUB-200-2011 (Wah et al. 2011, Caltech-UCSD Birds): 11,788 photos of 200 bird species.

The metric-learning split (Oh Song et al., CVPR 2016; Musgrave et al., ECCV 2020): classes 1-100
train and 101-200 test, every image of each class; the classification split in
``train_test_split.txt`` is not used. Reads the extracted ``CUB_200_2011/`` folder:
``images.txt`` (``<image_id> <path>``), ``image_class_labels.txt`` (``<image_id> <class_id>``),
``classes.txt`` (``<class_id> <name>``) and ``images/<class>/<file>.jpg``. Class id = the
official id minus one.
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

FOLDER = "CUB_200_2011"
TRAIN_CLASSES = 100  # official ids 1-100 train, 101-200 test
OFFICIAL = "classes 1-100 train, 101-200 test (Oh Song et al. 2016)"


def cub_index(path: Path) -> tuple[list[Path], torch.Tensor, dict[int, str]]:
    """The image files in ``images.txt`` order, their class ids and the class names."""
    root = find_root(path, FOLDER, "images.txt")
    for name in ("image_class_labels.txt", "classes.txt"):
        if not (root / name).is_file():
            raise ValueError(f"{root / name} not found: dataset.path must be the extracted {FOLDER} folder")
    images_txt, labels_txt = root / "images.txt", root / "image_class_labels.txt"
    paths = {parse_int(i, images_txt, "image_id"): p for i, p in read_table(images_txt, 2)}
    classes = {
        parse_int(i, labels_txt, "image_id"): parse_int(c, labels_txt, "class_id")
        for i, c in read_table(labels_txt, 2)
    }
    unlabelled = sorted(paths.keys() - classes.keys())
    if unlabelled:
        raise ValueError(
            f"{labels_txt}: no class for image_id {unlabelled[0]} of {images_txt} "
            f"({len(unlabelled)} image(s) without a class)"
        )
    names = {
        parse_int(c, root / "classes.txt", "class_id") - 1: name
        for c, name in read_table(root / "classes.txt", 2)
    }
    ids = sorted(paths)
    files = existing_files(root / "images", [paths[i] for i in ids], images_txt)
    labels = torch.tensor([classes[i] - 1 for i in ids], dtype=torch.int64)
    return files, labels, names


def load_cub(path: Path, size: tuple[int, int]) -> SourceImages:
    """All images as RGB (N, 3, *size) uint8; ``official_test`` marks classes 101-200."""
    files, labels, names = cub_index(path)
    return SourceImages(
        decode_rgb(files, size), labels, class_names=names, official_test=labels >= TRAIN_CLASSES
    )
