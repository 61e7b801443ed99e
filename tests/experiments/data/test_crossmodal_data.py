"""Paired data: measured digit captions, the CSV/JSONL loader on real PNG files, the vocabulary."""

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.data.captions import (
    Vocabulary,
    digit_captions,
    load_digits_paired,
    load_paired_file,
    measure_digits,
)


def test_digits_captions_name_the_digit_and_vary_per_image():
    data = load_digits_paired(seed=0)
    words = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    assert len(data.captions) == len(data.labels) == data.images.shape[0] == 1797
    assert all(re.search(rf"\b{words[int(y)]}\b", c) for c, y in zip(data.captions, data.labels))
    # instance-specific: far more distinct captions than classes
    assert len(set(data.captions)) > 500
    assert data.captions == load_digits_paired(seed=0).captions
    assert data.captions != load_digits_paired(seed=1).captions


def test_measured_properties_follow_the_image():
    img = np.zeros((3, 8, 8))
    img[0, 1:3, 0:3] = 16  # small blob, top left
    img[1, 5:8, 5:8] = 16  # blob, bottom right
    img[2, 0:8, 0:8] = 16  # fills the frame
    words = measure_digits(img)
    assert words["position"][0] == "near the top left"
    assert words["position"][1] == "near the bottom right"
    assert words["size"][2] == "large" and words["size"][0] == "small"
    caption = digit_captions(img, np.array([1, 2, 3]))[2]
    assert "three" in caption and "large" in caption


def _write_pngs(root, n_per_class=3):
    rows = []
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        for i in range(n_per_class):
            name = f"img/{label}{i}.png"
            (root / "img").mkdir(exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (12, 10), dtype=np.uint8)).save(root / name)
            rows.append({"image_path": name, "caption": f"a photo of a {label} number {i}", "label": label})
    return rows


def test_csv_loader_reads_real_pngs(tmp_path):
    rows = _write_pngs(tmp_path)
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(
        "image_path,caption,label\n"
        + "".join(f"{r['image_path']},{r['caption']},{r['label']}\n" for r in rows)
    )
    data = load_paired_file(csv_path, image_size=16)
    assert data.images.shape == (6, 1, 16, 16) and data.images.dtype == torch.uint8
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert data.captions[4] == "a photo of a dog number 1"


def test_jsonl_loader_and_missing_files(tmp_path):
    rows = _write_pngs(tmp_path, 2)
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_paired_file(path).labels.tolist() == [0, 0, 1, 1]
    rows.append({"image_path": "img/missing.png", "caption": "gone", "label": "cat"})
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_paired_file(path)


def test_csv_loader_names_missing_columns(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("path,text\nx.png,hello\n")
    with pytest.raises(ValueError, match="image_path"):
        load_paired_file(path)


def test_vocabulary_pads_and_marks_unknown_words():
    vocab = Vocabulary(["a thin one", "a thick two"])
    ids = vocab.encode(["a thin seven"], max_length=5)
    assert ids.shape == (1, 5)
    assert ids[0, 2].item() == 1  # "seven" is unknown
    assert ids[0, 3:].tolist() == [0, 0]
    assert vocab.tokens[ids[0, 0]] == "a"
