"""Any dataset stored as one sub-folder per class of image files (CUB-200, Cars196, SOP, ...).

Images are read with Pillow, converted to grey ("L") when every image is grey and to RGB
otherwise, and resized to ``dataset.image_size`` (default 64x64, Pillow's antialiased bilinear
filter), decoding in a few threads once into the decoded-image cache (``decode_cache``), which
later loads read. The class id is the index of the class folder in natural
name order (``s2`` before ``s10``; ``001.Albatross`` before ``002.Auklet``).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from experiments.data.base import SourceImages
from experiments.data.decode_cache import decoded_images

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".ppm", ".pbm", ".tif", ".tiff", ".webp"}


def natural_key(name: str) -> list:
    """Sort key putting ``s2`` before ``s10``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", name)]


def _class_files(path: Path) -> dict[str, list[Path]]:
    if not path.is_dir():
        raise ValueError(
            f"{path}: not a folder; dataset.path for image-folder must be a folder "
            "with one sub-folder of images per class"
        )
    classes = {}
    folders = (p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    for folder in sorted(folders, key=lambda p: natural_key(p.name)):
        files = sorted(f for f in folder.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if files:
            classes[folder.name] = files
    if not classes:
        raise ValueError(
            f"{path}: no images found; image-folder expects <class>/<image> files "
            f"(suffixes {', '.join(sorted(IMAGE_SUFFIXES))})"
        )
    lonely = [name for name, files in classes.items() if len(files) < 2]
    if lonely:
        raise ValueError(
            f"{path}: class {lonely[0]!r} has a single image"
            f"{f' (and {len(lonely) - 1} more classes)' if len(lonely) > 1 else ''}; "
            "a class needs >= 2 images to form a positive pair: add images or remove it"
        )
    return classes


def load_image_folder(path: Path, size: tuple[int, int]) -> SourceImages:
    """Every image as (N, 1 or 3, *size) uint8 (in the decoded-image cache); ``class_names`` maps
    ids back to folder names."""
    classes = _class_files(path)
    files = [(label, file) for label, name in enumerate(classes) for file in classes[name]]
    images = decoded_images([file for _, file in files], size, "auto")
    labels = torch.tensor([label for label, _ in files], dtype=torch.int64)
    return SourceImages(images, labels, class_names=dict(enumerate(classes)))
