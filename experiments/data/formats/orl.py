"""The AT&T (ORL) face database (Samaria & Harter 1994): 40 subjects x 10 images, 92x112 grey.

Reads ``att_faces.zip`` (``att_faces/s<N>/<k>.pgm``) or the extracted ``s<N>/<k>.pgm`` folders.
Images are binary PGM (P5), decoded with Pillow. The class id is the subject number minus one.
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from experiments.data.base import SourceImages

FACE_FILE = re.compile(r"(?:^|/)s(\d+)/(\d+)\.pgm$", re.IGNORECASE)


def _decode_pgm(data: bytes, name: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as image:
            return np.asarray(image.convert("L"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"{name}: not a readable PGM image ({exc})") from exc


def _faces_from_zip(path: Path) -> list[tuple[int, int, str, bytes]]:
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as exc:
        raise ValueError(f"{path}: not a readable zip file ({exc})") from exc
    with archive:
        found = []
        for name in archive.namelist():
            match = FACE_FILE.search(name)
            if match:
                found.append((int(match[1]), int(match[2]), f"{path}:{name}", archive.read(name)))
        return found


def _faces_from_folder(path: Path) -> list[tuple[int, int, str, bytes]]:
    found = []
    for file in path.rglob("*"):
        match = FACE_FILE.search(file.as_posix())
        if match and file.is_file():
            found.append((int(match[1]), int(match[2]), str(file), file.read_bytes()))
    return found


def load_orl_faces(path: Path) -> SourceImages:
    """All faces as (N, 1, 112, 92) uint8; labels = subject - 1, in subject then image order."""
    if path.is_file():
        faces = _faces_from_zip(path)
    else:
        faces = _faces_from_folder(path)
        if not faces and (path / "att_faces.zip").is_file():
            faces = _faces_from_zip(path / "att_faces.zip")
    if not faces:
        raise ValueError(
            f"{path}: no s<N>/<k>.pgm faces found; dataset.path must be att_faces.zip "
            "or the folder holding the s1..s40 subject folders"
        )
    faces.sort(key=lambda face: (face[0], face[1]))
    arrays = [_decode_pgm(data, name) for _, _, name, data in faces]
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{path}: faces have different sizes {sorted(shapes)}; all must share one size")
    images = torch.from_numpy(np.stack(arrays)).unsqueeze(1)
    labels = torch.tensor([subject - 1 for subject, _, _, _ in faces], dtype=torch.int64)
    names = {subject - 1: f"s{subject}" for subject, _, _, _ in faces}
    return SourceImages(images, labels, class_names=names)
