"""In-shop Clothes Retrieval (Liu et al., "DeepFashion", CVPR 2016): 52,712 photos of 7,982
clothing items.

The official split, ``list_eval_partition.txt``: 3,997 items (25,882 images) train; the other
3,985 items are tested by retrieving each of their 14,218 query images among the 12,612 gallery
images (a query is never in the gallery). The file (DeepFashion's list format) holds a count
line, the header ``image_name item_id evaluation_status``, then one image per line with status
``train``, ``query`` or ``gallery``. Reads it from the In-shop folder, with the images under
``img/`` beside it, or from the benchmark's own tree (``Eval/list_eval_partition.txt`` and
``Img/img/``). Class ids number the item ids (``id_00000001`` ...) in sorted order.
"""

from __future__ import annotations

from pathlib import Path

import torch

from experiments.data.base import SourceImages
from experiments.data.formats.listed_images import decode_rgb, existing_files, parse_int, read_table

FOLDER = "In-shop Clothes Retrieval Benchmark"
PARTITION = "list_eval_partition.txt"
HEADER = ["image_name", "item_id", "evaluation_status"]
STATUSES = ("train", "query", "gallery")
OFFICIAL = "list_eval_partition.txt: train items train; query images against gallery images (Liu et al. 2016)"


def _partition_file(path: Path) -> Path:
    for root in (path, path / FOLDER):
        for file in (root / PARTITION, root / "Eval" / PARTITION):
            if file.is_file():
                return file
    raise ValueError(
        f"{path / PARTITION} not found (nor {path / 'Eval' / PARTITION}): dataset.path must "
        f"be the In-shop folder holding {PARTITION} and img/ (or the {FOLDER} folder)"
    )


def _read_partition(file: Path) -> list[list[str]]:
    rows = read_table(file, len(HEADER), skip=2)
    lines = file.read_text(encoding="utf-8").splitlines()
    count = parse_int(lines[0].strip() if lines else "", file, "the first line (the image count)")
    if len(lines) < 2 or lines[1].split() != HEADER:
        raise ValueError(f"{file} line 2: expected the header {' '.join(HEADER)!r}")
    if len(rows) != count:
        raise ValueError(
            f"{file}: the first line announces {count} images but {len(rows)} are listed "
            "(truncated or edited file)"
        )
    unknown = [status for _, _, status in rows if status not in STATUSES]
    if unknown:
        raise ValueError(
            f"{file}: evaluation_status must be one of {', '.join(STATUSES)}, found {unknown[0]!r}"
        )
    return rows


def inshop_index(path: Path) -> tuple[list[Path], torch.Tensor, dict[int, str], list[str]]:
    """The image files in list order, their class ids, the item ids by class id and each status."""
    partition = _partition_file(path)
    rows = _read_partition(partition)
    root = partition.parent.parent / "Img" if partition.parent.name == "Eval" else partition.parent
    items = sorted({item for _, item, _ in rows})
    class_of = {item: i for i, item in enumerate(items)}
    files = existing_files(root, [image for image, _, _ in rows], partition)
    labels = torch.tensor([class_of[item] for _, item, _ in rows], dtype=torch.int64)
    return files, labels, dict(enumerate(items)), [status for _, _, status in rows]


def load_inshop(path: Path, size: tuple[int, int]) -> SourceImages:
    """All images as RGB (N, 3, *size) uint8; ``official_test`` marks the queries, ``gallery`` the gallery."""
    files, labels, names, statuses = inshop_index(path)
    return SourceImages(
        decode_rgb(files, size),
        labels,
        class_names=names,
        official_test=torch.tensor([s == "query" for s in statuses], dtype=torch.bool),
        gallery=torch.tensor([s == "gallery" for s in statuses], dtype=torch.bool),
    )
