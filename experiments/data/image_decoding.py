"""Reading one image file: its colour mode, and its pixels converted and resized.

Images are read with Pillow, converted to ``mode`` ("L" grey or "RGB") and resized to (height,
width) with Pillow's antialiased bilinear filter; a file Pillow cannot read is a ``ValueError``
naming it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

GREY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


def _unreadable(file: Path, exc: Exception) -> ValueError:
    return ValueError(f"{file}: not a readable image ({exc}); fix or remove it")


def image_mode(file: Path) -> str:
    """The Pillow mode of ``file`` (read from its header, without decoding the pixels)."""
    try:
        with Image.open(file) as image:
            return image.mode
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise _unreadable(file, exc) from exc


def common_mode(files: list[Path]) -> str:
    """``"L"`` when every file is grey, else ``"RGB"``."""
    return "L" if all(image_mode(file) in GREY_MODES for file in files) else "RGB"


def read_resized(file: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    """``file`` as uint8 (1 or 3, *size): converted to ``mode`` and resized to ``size`` (height, width)."""
    try:
        with Image.open(file) as image:
            image = image.convert(mode).resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise _unreadable(file, exc) from exc
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
