"""What the natural-image benchmarks (CUB-200-2011, Cars196, Stanford Online Products, In-shop)
share: finding the extracted folder, reading their whitespace-separated index files, and decoding
the listed images to RGB.

Images are decoded with Pillow in a few threads, once, into the decoded-image cache
(``decode_cache``), converted to RGB (the datasets hold a few grey photos) and resized to
``dataset.image_size``, by default 256x256: the resize "A Metric Learning
Reality Check" (Musgrave et al., ECCV 2020) applies before its 227x227 crops.
"""

from __future__ import annotations

from pathlib import Path

from experiments.data.decode_cache import decoded_images
from experiments.data.image_store import ImageStore

DEFAULT_SIZE = (256, 256)


def find_root(path: Path, folder: str, marker: str) -> Path:
    """``path`` when it holds ``marker``, else ``path/folder`` (the folder the official archive
    extracts to) when that does; a ``ValueError`` naming the expected file otherwise."""
    for root in (path, path / folder):
        if (root / marker).is_file():
            return root
    expected = path / marker if path.name == folder else path / folder / marker
    raise ValueError(
        f"{expected} not found: dataset.path must be the extracted {folder} folder (or the folder holding it)"
    )


def read_table(file: Path, columns: int, skip: int = 0) -> list[list[str]]:
    """The non-empty lines of ``file`` after ``skip`` lines, each split on whitespace into exactly
    ``columns`` fields; a ``ValueError`` naming the file and line otherwise."""
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"{file}: not a readable text file ({exc})") from exc
    rows = []
    for number, line in enumerate(lines[skip:], start=skip + 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != columns:
            raise ValueError(
                f"{file} line {number}: expected {columns} whitespace-separated fields, "
                f"found {len(fields)}: {line.strip()!r}"
            )
        rows.append(fields)
    return rows


def parse_int(value: str, file: Path, what: str) -> int:
    """``value`` as an int, or a ``ValueError`` naming the file and the field."""
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{file}: {what} must be an integer, found {value!r}") from None


def existing_files(root: Path, relative_paths: list[str], index: Path) -> list[Path]:
    """``root / p`` for each listed path; a ``ValueError`` naming the first missing one."""
    files = [root / p for p in relative_paths]
    missing = [f for f in files if not f.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(
            f"{missing[0]} is listed in {index} but not found{more}: extract every image "
            f"of the dataset under {root}"
        )
    return files


def decode_rgb(files: list[Path], size: tuple[int, int]) -> ImageStore:
    """Every file as RGB, resized to ``size`` (height, width): uint8 (N, 3, *size), from the cache."""
    return decoded_images(files, size, "RGB")
