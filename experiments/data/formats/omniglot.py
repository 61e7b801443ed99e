"""Omniglot (Lake, Salakhutdinov & Tenenbaum 2015): 1,623 handwritten characters from 50
alphabets, 20 drawers each, 105x105 binary. Each character is a class.

Reads the numpy layout (``.npz`` with ``images`` bool (C, 20, 105, 105), True = background, and
``labels`` (C, 20)), or the official ``images_background.zip`` / ``images_evaluation.zip`` and their
extracted ``<alphabet>/<character>/*.png`` folders. Ink becomes 255 on a 0 background. Images are
resized once at load (default 28x28, area interpolation), as in most metric-learning uses.

The official split (Lake et al. 2015) trains on ``images_background`` (30 alphabets, 964
characters) and tests on ``images_evaluation`` (20 other alphabets, 659 characters): a source whose
name contains "evaluation" is marked as the official test part when a background source is given too.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from experiments.data.base import SourceImages
from experiments.data.imaging import resize_images

CHUNK = 1024
OFFICIAL = "images_background trains, images_evaluation tests (disjoint alphabets, Lake et al. 2015)"
OFFICIAL_MISSING = (
    "dataset.split=official for omniglot needs the evaluation set: it trains on images_background and "
    "tests on images_evaluation, so dataset.path must be the folder holding both (as .npz, .zip or "
    "extracted folders); dataset.split=class-disjoint works with the background set alone"
)


def _from_npz(path: Path, size) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
    try:
        with np.load(path) as archive:
            background, labels = archive["images"], archive["labels"]
    except KeyError as exc:
        raise ValueError(f"{path}: expected arrays 'images' and 'labels' in the npz, missing {exc}") from exc
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable npz file ({exc})") from exc
    if background.ndim != 4 or labels.shape != background.shape[:2]:
        raise ValueError(
            f"{path}: expected 'images' (classes, drawers, H, W) and 'labels' (classes, "
            f"drawers); found {background.shape} and {labels.shape}"
        )
    flat = background.reshape(-1, 1, *background.shape[2:])
    chunks = []
    for start in range(0, flat.shape[0], CHUNK):
        ink = ~flat[start : start + CHUNK].astype(bool)
        chunks.append(resize_images(torch.from_numpy(ink.astype(np.uint8) * 255), size))
    labels = torch.from_numpy(labels.reshape(-1).astype(np.int64))
    return torch.cat(chunks), labels, {}


def _png_to_ink(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return 255 - np.asarray(image.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{name}: not a readable image ({exc})") from exc


def _character_files(path: Path) -> list[tuple[str, str, bytes]]:
    """(``alphabet/character``, file name, bytes) for every PNG of a zip or folder."""
    found = []
    if path.is_file():
        try:
            with zipfile.ZipFile(path) as archive:
                for name in archive.namelist():
                    parts = PurePosixPath(name).parts
                    if name.lower().endswith(".png") and len(parts) >= 3:
                        found.append(("/".join(parts[-3:-1]), f"{path}:{name}", archive.read(name)))
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{path}: not a readable zip file ({exc})") from exc
    else:
        for file in path.rglob("*.png"):
            if len(file.relative_to(path).parts) >= 2:
                found.append(("/".join(file.parts[-3:-1]), str(file), file.read_bytes()))
    return found


def _from_pngs(path: Path, size) -> tuple[torch.Tensor, torch.Tensor, dict[int, str]]:
    files = sorted(_character_files(path))
    if not files:
        raise ValueError(f"{path}: no <alphabet>/<character>/*.png images found")
    characters = sorted({key for key, _, _ in files})
    index = {key: i for i, key in enumerate(characters)}
    arrays = [_png_to_ink(data, name) for _, name, data in files]
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{path}: characters have different sizes {sorted(shapes)}")
    images = resize_images(torch.from_numpy(np.stack(arrays)).unsqueeze(1), size)
    labels = torch.tensor([index[key] for key, _, _ in files], dtype=torch.int64)
    return images, labels, {i: key for key, i in index.items()}


def _sources(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    for pattern in ("*.npz", "images_*.zip"):
        found = sorted(path.glob(pattern), key=lambda p: ("evaluation" in p.name, p.name))
        if found:
            return found
    folders = sorted(path.glob("images_*/"), key=lambda p: ("evaluation" in p.name, p.name))
    return [p for p in folders if p.is_dir()] or [path]


def load_omniglot(path: Path, size) -> SourceImages:
    """All characters as (N, 1, *size) uint8; several sources (background, then evaluation) get
    consecutive class ids; ``official_test`` marks the evaluation images when both sets are given."""
    images, labels, evaluation, names, offset = [], [], [], {}, 0
    for source in _sources(path):
        reader = _from_npz if source.suffix == ".npz" else _from_pngs
        part_images, part_labels, part_names = reader(source, size)
        images.append(part_images)
        labels.append(part_labels + offset)
        evaluation.append(torch.full((part_labels.numel(),), "evaluation" in source.name))
        names.update({i + offset: f"{source.stem}/{name}" for i, name in part_names.items()})
        offset += int(part_labels.max()) + 1
    is_evaluation = torch.cat(evaluation)
    both_sets = bool(is_evaluation.any()) and not bool(is_evaluation.all())
    return SourceImages(
        torch.cat(images),
        torch.cat(labels),
        class_names=names or None,
        official_test=is_evaluation if both_sets else None,
    )
