"""Paired (image, caption, label) data for cross-modal retrieval.

Two sources: scikit-learn's bundled digits, each image paired with a caption generated from
properties measured on that image (so pairs are instance-specific, not only class-level), and a
user CSV or JSONL of ``image_path, caption, label`` (the shape COCO / Flickr captions are
usually converted to).
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a {thickness} {size} {digit} {slant}, {position}",
    "handwritten {digit}: {thickness} strokes, {slant}, {size}, {position}",
    "the digit {digit}, {size} and {thickness}, {slant}, {position}",
    "{position}, a {slant} {digit} drawn with {thickness} strokes, {size}",
)
TOKEN = re.compile(r"[a-z0-9]+")


@dataclass
class PairedSplit:
    """Aligned rows: ``images`` uint8 (N, C, H, W), ``captions`` list of N strings, ``labels`` int64 (N,)."""

    images: torch.Tensor
    captions: list[str]
    labels: torch.Tensor

    def subset(self, index: torch.Tensor) -> "PairedSplit":
        index = index.cpu()
        return PairedSplit(self.images[index], [self.captions[i] for i in index.tolist()], self.labels[index])


def _bucket(values: np.ndarray, words: tuple[str, str, str]) -> list[str]:
    lo, hi = np.quantile(values, [1 / 3, 2 / 3])
    return [words[0] if v < lo else words[2] if v > hi else words[1] for v in values]


def measure_digits(images: np.ndarray) -> dict[str, list[str]]:
    """Words for stroke thickness, slant, size and position measured on each (N, H, W) image.

    Thickness is the mean intensity of inked pixels; slant is the sign and size of the second
    central moment ratio mu11 / mu02; size is the bounding-box area; position is the ink centroid.
    Thresholds are the tertiles over the given images.
    """
    x = images.astype(np.float64)
    n, h, w = x.shape
    ink = x > x.max() * 0.25
    mass = x.sum((1, 2)) + 1e-9
    rows, cols = np.mgrid[0:h, 0:w]
    cy = (x * rows).sum((1, 2)) / mass
    cx = (x * cols).sum((1, 2)) / mass
    dy, dx = rows[None] - cy[:, None, None], cols[None] - cx[:, None, None]
    slant = -(x * dx * dy).sum((1, 2)) / ((x * dy * dy).sum((1, 2)) + 1e-9)
    thickness = x.sum((1, 2), where=ink) / np.maximum(ink.sum((1, 2)), 1)
    any_r, any_c = ink.any(2), ink.any(1)
    height = h - any_r[:, ::-1].argmax(1) - any_r.argmax(1)
    width = w - any_c[:, ::-1].argmax(1) - any_c.argmax(1)
    horizontal = _bucket(cx, ("left", "centre", "right"))
    vertical = _bucket(cy, ("top", "middle", "bottom"))
    return {
        "thickness": _bucket(thickness, ("thin", "medium", "thick")),
        "slant": _bucket(slant, ("leaning left", "upright", "leaning right")),
        "size": _bucket(height * width, ("small", "mid-sized", "large")),
        "position": [
            f"near the {v} {hz}" if v != "middle" or hz != "centre" else "in the centre"
            for v, hz in zip(vertical, horizontal)
        ],
    }


def digit_captions(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> list[str]:
    """One caption per image from fixed templates, the template chosen per image by ``seed``."""
    words = measure_digits(images)
    choice = np.random.default_rng(seed).integers(len(TEMPLATES), size=len(labels))
    return [
        TEMPLATES[c].format(digit=DIGIT_WORDS[int(y)], **{k: v[i] for k, v in words.items()})
        for i, (c, y) in enumerate(zip(choice, labels))
    ]


def load_digits_paired(seed: int = 0) -> PairedSplit:
    """scikit-learn digits (no download), each image paired with its measured caption."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    return PairedSplit(
        torch.from_numpy(images).unsqueeze(1),
        digit_captions(digits.images, digits.target, seed),
        torch.as_tensor(digits.target, dtype=torch.int64),
    )


def _read_rows(path: Path) -> list[dict]:
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(
                        f"{path}:{number} is not valid JSON ({exc.msg}); write one object per line"
                    ) from None
        return rows
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def load_paired_file(path: str | Path, image_size: int = 32) -> PairedSplit:
    """Read a CSV or JSONL of ``image_path, caption, label``; image paths are relative to the file.

    Images are read with Pillow as grey-scale and resized to ``image_size``; labels may be any
    strings or integers and are mapped to ids in sorted order.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"paired data file {path} does not exist; set dataset.path to a CSV or JSONL file"
        )
    rows = _read_rows(path)
    missing_cols = {"image_path", "caption", "label"} - set(rows[0] if rows else ())
    if not rows or missing_cols:
        raise ValueError(
            f"{path} needs columns image_path, caption, label; missing {sorted(missing_cols) or 'all rows'}"
        )
    missing = [r["image_path"] for r in rows if not (path.parent / r["image_path"]).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} image(s) listed in {path} do not exist, e.g. {missing[:3]}; "
            f"paths are read relative to {path.parent}"
        )
    images = []
    for r in rows:
        try:
            with Image.open(path.parent / r["image_path"]) as im:
                images.append(np.asarray(im.convert("L").resize((image_size, image_size), Image.BILINEAR)))
        except (UnidentifiedImageError, OSError) as exc:
            raise ValueError(f"cannot read image {path.parent / r['image_path']}: {exc}") from None
    names = sorted({str(r["label"]) for r in rows})
    ids = {name: i for i, name in enumerate(names)}
    return PairedSplit(
        torch.from_numpy(np.stack(images)).unsqueeze(1),
        [str(r["caption"]) for r in rows],
        torch.tensor([ids[str(r["label"])] for r in rows], dtype=torch.int64),
    )


class Vocabulary:
    """Lower-case word tokens to ids; 0 pads, 1 is unknown. Built on the training captions only."""

    def __init__(self, captions: list[str], min_count: int = 1):
        counts: dict[str, int] = {}
        for caption in captions:
            for token in TOKEN.findall(caption.lower()):
                counts[token] = counts.get(token, 0) + 1
        self.tokens = ["<pad>", "<unk>"] + sorted(t for t, c in counts.items() if c >= min_count)
        self.index = {t: i for i, t in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, captions: list[str], max_length: int = 32) -> torch.Tensor:
        """An int64 (N, max_length) tensor of token ids, right-padded with 0."""
        out = torch.zeros(len(captions), max_length, dtype=torch.int64)
        for row, caption in enumerate(captions):
            ids = [self.index.get(t, 1) for t in TOKEN.findall(caption.lower())][:max_length]
            out[row, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
        return out
