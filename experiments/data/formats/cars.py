"""Cars196 (Krause et al., "3D Object Representations for Fine-Grained Categorization", 2013):
16,185 photos of 196 car models.

The metric-learning split (Oh Song et al., CVPR 2016; Musgrave et al., ECCV 2020): classes 1-98
train and 99-196 test, every image of each class, whole images (no bounding-box crop); the
annotations' ``test`` flag is the classification split and is not used. Reads ``cars_annos.mat``
(MATLAB: ``annotations``, a struct array with ``relative_im_path``, ``bbox_x1`` .. ``bbox_y2``,
``class`` and ``test``; ``class_names``, a cell array) and the images under ``car_ims/`` beside
it. Class id = the official id minus one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.io
import torch

from experiments.data.base import SourceImages
from experiments.data.formats.listed_images import decode_rgb, existing_files

ANNOTATIONS = "cars_annos.mat"
TRAIN_CLASSES = 98  # official ids 1-98 train, 99-196 test
OFFICIAL = "classes 1-98 train, 99-196 test (Oh Song et al. 2016)"
FIELDS = ("relative_im_path", "class")


def _annotations_file(path: Path) -> Path:
    file = path if path.is_file() else path / ANNOTATIONS
    if not file.is_file():
        raise ValueError(
            f"{file} not found: dataset.path must be the folder holding {ANNOTATIONS} "
            "and car_ims/ (or the .mat file itself)"
        )
    return file


def cars_index(path: Path) -> tuple[list[Path], torch.Tensor, dict[int, str]]:
    """The image files in annotation order, their class ids and the class names."""
    file = _annotations_file(path)
    try:
        mat = scipy.io.loadmat(file, squeeze_me=True)
    except (
        scipy.io.matlab.MatReadError,
        ValueError,
        OSError,
        NotImplementedError,
        TypeError,
        IndexError,
    ) as exc:  # scipy raises IndexError on a short file
        raise ValueError(f"{file}: not a readable MATLAB file ({exc})") from exc
    if "annotations" not in mat:
        raise ValueError(f"{file}: no 'annotations' struct array; expected the official {ANNOTATIONS}")
    annotations = np.atleast_1d(mat["annotations"])
    missing = [f for f in FIELDS if f not in (annotations.dtype.names or ())]
    if missing:
        raise ValueError(
            f"{file}: 'annotations' lacks the field(s) {', '.join(missing)}; expected the "
            f"official {ANNOTATIONS} (relative_im_path, bbox_x1..bbox_y2, class, test)"
        )
    try:
        classes = annotations["class"].astype(np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{file}: annotations.class must hold integer class ids ({exc})") from exc
    names = {i: str(name) for i, name in enumerate(np.atleast_1d(mat.get("class_names", [])))}
    files = existing_files(file.parent, [str(p) for p in annotations["relative_im_path"]], file)
    return files, torch.from_numpy(classes - 1), names


def load_cars(path: Path, size: tuple[int, int]) -> SourceImages:
    """All images as RGB (N, 3, *size) uint8; ``official_test`` marks classes 99-196."""
    files, labels, names = cars_index(path)
    return SourceImages(
        decode_rgb(files, size), labels, class_names=names or None, official_test=labels >= TRAIN_CLASSES
    )
