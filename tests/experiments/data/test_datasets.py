"""Dataset loaders on tiny files written in each real format, and the class splits."""

from __future__ import annotations

import gzip
import io
import struct
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.config import ExperimentConfig
from experiments.data.paired import PairedSplits
from experiments.data.registry import dataset_path, env_var, is_paired, list_datasets, load_dataset
from experiments.data.splits import cap_per_class, class_disjoint_split, standard_split
from helpers.dataset_config import dataset_cfg

# ---------------------------------------------------------------- fashion-mnist (IDX)


def idx_images(images: np.ndarray, magic: int = 2051) -> bytes:
    n, rows, cols = images.shape
    return struct.pack(">iiii", magic, n, rows, cols) + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, magic: int = 2049) -> bytes:
    return struct.pack(">ii", magic, len(labels)) + labels.astype(np.uint8).tobytes()


def write_fashion(folder: Path, compress: bool = True, n_train: int = 40, n_test: int = 20) -> dict:
    rng = np.random.default_rng(0)
    data = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 5, 4)),
        "train-labels-idx1-ubyte": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 5, 4)),
        "t10k-labels-idx1-ubyte": np.arange(n_test) % 10,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for stem, array in data.items():
        raw = idx_images(array) if "images" in stem else idx_labels(array)
        if compress:
            (folder / f"{stem}.gz").write_bytes(gzip.compress(raw))
        else:
            (folder / stem).write_bytes(raw)
    return data


@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_standard_split_keeps_the_official_test_set(tmp_path, compress):
    data = write_fashion(tmp_path, compress)
    splits = load_dataset(dataset_cfg(name="fashion-mnist", path=str(tmp_path), split="standard"), seed=0)
    assert splits.test.images.shape == (20, 1, 5, 4)
    assert torch.equal(
        splits.test.images[:, 0], torch.from_numpy(data["t10k-images-idx3-ubyte"]).to(torch.uint8)
    )
    assert torch.equal(splits.test.labels, torch.from_numpy(data["t10k-labels-idx1-ubyte"]).long())
    assert len(splits.train) + len(splits.val) == 40
    assert splits.info["counts"] == {"train": len(splits.train), "val": len(splits.val), "test": 20}
    assert splits.train.hflip and splits.info["test_source"] == "the dataset's own test set"
    # every training image is one of the written training images, with its label
    written = {
        bytes(img.astype(np.uint8).tobytes()): int(lab)
        for img, lab in zip(data["train-images-idx3-ubyte"], data["train-labels-idx1-ubyte"])
    }
    for image, label in zip(splits.val.images, splits.val.labels):
        assert written[image[0].numpy().tobytes()] == int(label)


def test_fashion_mnist_class_disjoint_pools_train_and_test(tmp_path):
    write_fashion(tmp_path)
    splits = load_dataset(dataset_cfg(name="fashion-mnist", path=str(tmp_path)), seed=0)
    assert splits.info["test_classes"] == [5, 6, 7, 8, 9]
    assert len(splits.train) + len(splits.val) + len(splits.test) == 60
    assert splits.test.labels.dtype == torch.int64


@pytest.mark.parametrize(
    "stem, magic, expected",
    [
        ("train-images-idx3-ubyte", 2049, "2051"),
        ("t10k-labels-idx1-ubyte", 2051, "2049"),
    ],
)
def test_idx_wrong_magic_names_the_file(tmp_path, stem, magic, expected):
    data = write_fashion(tmp_path)
    raw = idx_images(data[stem], magic) if "images" in stem else idx_labels(data[stem], magic)
    (tmp_path / f"{stem}.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(ValueError, match=rf"{stem}\.gz: expected IDX magic number {expected}, found {magic}"):
        load_dataset(dataset_cfg(name="fashion-mnist", path=str(tmp_path)), seed=0)


def test_idx_truncated_file_is_reported(tmp_path):
    data = write_fashion(tmp_path)
    raw = idx_images(data["train-images-idx3-ubyte"])[:-7]
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw))
    with pytest.raises(
        ValueError, match=r"train-images-idx3-ubyte\.gz: header \[40, 5, 4\] means 816 bytes, found 809 bytes"
    ):
        load_dataset(dataset_cfg(name="fashion-mnist", path=str(tmp_path)), seed=0)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(
        gzip.compress(idx_images(data["train-images-idx3-ubyte"]))[:-9]
    )
    with pytest.raises(ValueError, match="not a readable gzip file"):
        load_dataset(dataset_cfg(name="fashion-mnist", path=str(tmp_path)), seed=0)


def test_idx_missing_file_and_count_mismatch(tmp_path):
    data = write_fashion(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ValueError, match="missing t10k-labels-idx1-ubyte.gz"):
        load_dataset(dataset_cfg(name="fashion-mnist", path=str(tmp_path)), seed=0)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(
        gzip.compress(idx_labels(data["t10k-labels-idx1-ubyte"][:5]))
    )
    with pytest.raises(ValueError, match="holds 20 images but .* holds 5 labels"):
        load_dataset(dataset_cfg(name="fashion-mnist", path=str(tmp_path)), seed=0)


def test_path_from_environment_variable_and_clear_error_without(tmp_path, monkeypatch):
    write_fashion(tmp_path)
    monkeypatch.delenv("TRIPLETLAB_FASHION_MNIST_PATH", raising=False)
    with pytest.raises(ValueError, match=r"dataset\.path.*TRIPLETLAB_FASHION_MNIST_PATH"):
        load_dataset(dataset_cfg(name="fashion-mnist"), seed=0)
    monkeypatch.setenv("TRIPLETLAB_FASHION_MNIST_PATH", str(tmp_path))
    assert len(load_dataset(dataset_cfg(name="fashion-mnist"), seed=0).test) > 0
    assert env_var("orl-faces") == "TRIPLETLAB_ORL_FACES_PATH"
    with pytest.raises(ValueError, match="does not exist"):
        load_dataset(dataset_cfg(name="fashion-mnist", path=str(tmp_path / "nowhere")), seed=0)


# ---------------------------------------------------------------- ORL faces (zip of P5 PGMs)


def pgm(pixels: np.ndarray) -> bytes:
    height, width = pixels.shape
    return f"P5\n{width} {height}\n255\n".encode() + pixels.astype(np.uint8).tobytes()


def orl_faces(subjects: int = 10, per_subject: int = 3) -> dict[tuple[int, int], np.ndarray]:
    rng = np.random.default_rng(1)
    return {
        (s, k): rng.integers(0, 256, (7, 6))
        for s in range(1, subjects + 1)
        for k in range(1, per_subject + 1)
    }


def test_orl_faces_from_zip(tmp_path):
    faces = orl_faces()
    archive = tmp_path / "att_faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("att_faces/README", "The ORL Database of Faces")
        for (s, k), pixels in faces.items():
            zf.writestr(f"att_faces/s{s}/{k}.pgm", pgm(pixels))
    splits = load_dataset(dataset_cfg(name="orl-faces", path=str(archive), val_fraction=0.4), seed=3)
    # subjects s1..s5 (ids 0..4) train or validate, s6..s10 test; numeric, not string, order
    assert splits.info["test_classes"] == [5, 6, 7, 8, 9]
    assert sorted(splits.info["train_classes"] + splits.info["val_classes"]) == [0, 1, 2, 3, 4]
    assert splits.info["class_names"][9] == "s10"
    assert splits.test.images.shape == (15, 1, 7, 6)
    for image, label in zip(splits.test.images, splits.test.labels):
        subject = int(label) + 1
        assert any(np.array_equal(image[0].numpy(), faces[(subject, k)]) for k in range(1, 4))


def test_orl_faces_from_extracted_folders(tmp_path):
    faces = orl_faces(subjects=8, per_subject=2)
    for (s, k), pixels in faces.items():
        (tmp_path / f"s{s}").mkdir(exist_ok=True)
        (tmp_path / f"s{s}" / f"{k}.pgm").write_bytes(pgm(pixels))
    splits = load_dataset(dataset_cfg(name="orl-faces", path=str(tmp_path), split="standard"), seed=0)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 16
    assert splits.info["test_classes"] == list(range(8))  # standard: every subject in the test set
    again = load_dataset(dataset_cfg(name="orl-faces", path=str(tmp_path), split="standard"), seed=0)
    assert torch.equal(again.test.images, splits.test.images)  # same seed, same split


def test_orl_faces_unreadable_pgm_names_the_file(tmp_path):
    for s in range(1, 9):
        (tmp_path / f"s{s}").mkdir()
        for k in (1, 2):
            (tmp_path / f"s{s}" / f"{k}.pgm").write_bytes(pgm(np.zeros((4, 3))))
    (tmp_path / "s4" / "2.pgm").write_bytes(b"P5\nnot a header")
    with pytest.raises(ValueError, match=r"s4/2\.pgm: not a readable PGM image"):
        load_dataset(dataset_cfg(name="orl-faces", path=str(tmp_path)), seed=0)


# ---------------------------------------------------------------- omniglot


def omniglot_npz(path: Path, characters: int = 10, drawers: int = 3, size: int = 12) -> np.ndarray:
    rng = np.random.default_rng(2)
    background = rng.random((characters, drawers, size, size)) > 0.3  # True = white background
    labels = np.repeat(np.arange(characters)[:, None], drawers, axis=1)
    np.savez(path, images=background, labels=labels)
    return background


def test_omniglot_npz_inverts_and_resizes_by_area(tmp_path):
    background = omniglot_npz(tmp_path / "images_background.npz")
    splits = load_dataset(
        dataset_cfg(name="omniglot", path=str(tmp_path), image_size=6, split="standard"), seed=0
    )
    assert splits.train.images.shape[1:] == (1, 6, 6) and not splits.train.hflip
    # oracle: ink = 255 where not background, then the mean of each 2x2 block
    ink = (~background).astype(np.float64) * 255
    pooled = np.round(ink.reshape(10, 3, 6, 2, 6, 2).mean(axis=(3, 5))).astype(np.uint8)
    expected = {pooled[c, d].tobytes(): c for c in range(10) for d in range(3)}
    for split in (splits.train, splits.val, splits.test):
        for image, label in zip(split.images, split.labels):
            assert expected[image[0].numpy().tobytes()] == int(label)


def test_omniglot_default_size_is_28(tmp_path):
    omniglot_npz(tmp_path / "chars.npz", size=14)
    splits = load_dataset(dataset_cfg(name="omniglot", path=str(tmp_path / "chars.npz")), seed=0)
    assert splits.train.images.shape[1:] == (1, 28, 28)
    assert splits.info["image_shape"] == [1, 28, 28]


def test_omniglot_official_png_zip(tmp_path):
    rng = np.random.default_rng(3)
    drawn = {}
    with zipfile.ZipFile(tmp_path / "images_background.zip", "w") as zf:
        for alphabet in ("Alpha", "Beta"):
            for character in range(1, 5):
                for drawer in range(1, 3):
                    bits = rng.random((9, 9)) > 0.4
                    buffer = io.BytesIO()
                    Image.fromarray(bits).convert("1").save(buffer, format="PNG")
                    folder = f"images_background/{alphabet}/character{character:02d}"
                    name = f"{folder}/{character:02d}{drawer:02d}.png"
                    zf.writestr(name, buffer.getvalue())
                    drawn[(alphabet, character, drawer)] = (~bits).astype(np.uint8) * 255
    splits = load_dataset(
        dataset_cfg(name="omniglot", path=str(tmp_path), image_size=9, split="standard", val_fraction=0.5),
        seed=0,
    )
    names = splits.info["class_names"]
    assert (
        len(names) == 8 and names[0].endswith("Alpha/character01") and names[7].endswith("Beta/character04")
    )
    for split in (splits.train, splits.val, splits.test):
        for image, label in zip(split.images, split.labels):
            alphabet, character = ("Alpha", "Beta")[int(label) // 4], int(label) % 4 + 1
            assert any(np.array_equal(image[0].numpy(), drawn[(alphabet, character, d)]) for d in (1, 2))


# ---------------------------------------------------------------- image folders


def write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def test_image_folder_rgb_resized_with_class_names(tmp_path):
    rng = np.random.default_rng(4)
    for c, name in enumerate(f"{i:03d}.bird{i}" for i in range(8)):
        for j in range(3):
            shape = (10 + j, 12, 3) if c != 2 else (10, 12)  # one grey class: all become RGB
            write_png(tmp_path / name / f"{j}.png", rng.integers(0, 256, shape))
    (tmp_path / "000.bird0" / "notes.txt").write_text("not an image")
    splits = load_dataset(dataset_cfg(name="image-folder", path=str(tmp_path), image_size=[6, 5]), seed=0)
    assert splits.train.images.shape[1:] == (3, 6, 5)
    assert splits.info["class_names"][7] == "007.bird7"
    assert splits.info["test_classes"] == [4, 5, 6, 7] and splits.train.hflip


def test_image_folder_all_grey_stays_one_channel_and_matches_pillow(tmp_path):
    rng = np.random.default_rng(5)
    arrays = {}
    for c in range(8):
        for j in range(2):
            arrays[(c, j)] = rng.integers(0, 256, (8, 8))
            write_png(tmp_path / f"class{c}" / f"{j}.png", arrays[(c, j)])
    splits = load_dataset(
        dataset_cfg(name="image-folder", path=str(tmp_path), image_size=4, split="standard"), seed=0
    )
    assert splits.test.images.shape[1:] == (1, 4, 4)
    for image, label in zip(splits.test.images, splits.test.labels):
        options = [
            np.asarray(
                Image.fromarray(arrays[(int(label), j)].astype(np.uint8)).resize((4, 4), Image.BILINEAR)
            )
            for j in range(2)
        ]
        assert any(np.array_equal(image[0].numpy(), o) for o in options)


def test_image_folder_classes_in_natural_order(tmp_path):
    for c in (10, 2, 1, 3, 4, 5, 6, 7):
        for j in range(2):
            write_png(tmp_path / f"s{c}" / f"{j}.png", np.full((4, 4), c))
    splits = load_dataset(dataset_cfg(name="image-folder", path=str(tmp_path), image_size=4), seed=0)
    assert list(splits.info["class_names"].values()) == ["s1", "s2", "s3", "s4", "s5", "s6", "s7", "s10"]
    for image, label in zip(splits.test.images, splits.test.labels):
        assert int(image.max()) == int(splits.info["class_names"][int(label)][1:])


def test_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="no images found"):
        load_dataset(dataset_cfg(name="image-folder", path=str(tmp_path)), seed=0)
    for c in ("cats", "dogs"):
        for j in range(2):
            write_png(tmp_path / c / f"{j}.png", np.zeros((4, 4)))
    write_png(tmp_path / "lonely" / "0.png", np.zeros((4, 4)))
    with pytest.raises(ValueError, match=r"class 'lonely' has a single image.*>= 2 images"):
        load_dataset(dataset_cfg(name="image-folder", path=str(tmp_path)), seed=0)
    write_png(tmp_path / "lonely" / "1.png", np.zeros((4, 4)))
    (tmp_path / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    with pytest.raises(ValueError, match=r"dogs/broken\.jpg: not a readable image"):
        load_dataset(dataset_cfg(name="image-folder", path=str(tmp_path)), seed=0)


# ---------------------------------------------------------------- digits, options, registry


def test_digits_pixels_scaled_from_sixteen_grey_levels():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    splits = load_dataset({"name": "digits", "split": "standard"}, seed=0)  # a plain mapping works too
    everything = torch.cat([splits.train.images, splits.val.images, splits.test.images])
    assert everything.shape == (1797, 1, 8, 8) and everything.dtype == torch.uint8
    assert int(everything.max()) == 255 and int(everything.min()) == 0
    expected = {np.round(img * 255 / 16).astype(np.uint8).tobytes() for img in bunch.images}
    assert {img[0].numpy().tobytes() for img in everything} <= expected
    assert sorted(splits.info["test_classes"]) == list(range(10))


def test_normalisation_statistics_come_from_the_training_split():
    splits = load_dataset(dataset_cfg(), seed=0)
    train = splits.train.images.double() / 255
    assert splits.train.mean == pytest.approx((train.mean().item(),), abs=1e-9)
    assert splits.train.std == pytest.approx((train.std(unbiased=False).item(),), abs=1e-9)
    assert splits.test.mean == splits.train.mean and splits.val.std == splits.train.std


def test_max_per_class_caps_each_class_reproducibly():
    a = load_dataset(dataset_cfg(max_per_class=6), seed=1)
    b = load_dataset(dataset_cfg(max_per_class=6), seed=1)
    counts = torch.unique(torch.cat([a.train.labels, a.val.labels, a.test.labels]), return_counts=True)[1]
    assert counts.tolist() == [6] * 10
    assert torch.equal(a.train.images, b.train.images)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"name": "mnist"}, r"unknown dataset\.name 'mnist'; choose one of .*fashion-mnist"),
        ({"split": "random"}, r"dataset\.split must be one of class-disjoint, standard"),
        ({"val_fraction": 1.5}, r"dataset\.val_fraction must be a number strictly between 0 and 1"),
        ({"max_per_class": -1}, r"dataset\.max_per_class must be a non-negative int"),
        ({"image_size": "big"}, r"dataset\.image_size must be an int or \[height, width\]"),
    ],
)
def test_bad_options_raise_clear_errors(values, message):
    with pytest.raises(ValueError, match=message):
        load_dataset(dataset_cfg(**values), seed=0)


def test_split_default_is_the_configs_everywhere():
    default = ExperimentConfig().dataset.split
    assert default == "standard"
    for unset in ({"name": "digits"}, {"name": "digits", "split": None}, SimpleNamespace(name="digits")):
        assert load_dataset(unset, seed=0).info["split"] == default
    splits = load_dataset({"name": "digits"}, seed=0)
    assert splits.info["train_classes"] == splits.info["test_classes"] == list(range(10))


def test_registry_lists_the_builtins():
    assert list_datasets() == [
        "cars196",
        "cub200",
        "digits",
        "digits-captions",
        "fashion-mnist",
        "image-folder",
        "inshop",
        "omniglot",
        "orl-faces",
        "paired-file",
        "sop",
    ]


def test_paired_datasets_are_in_the_registry_and_named_by_an_unknown_name():
    with pytest.raises(
        ValueError, match=r"unknown dataset\.name 'captions'; choose one of .*digits-captions.*paired-file"
    ):
        load_dataset({"name": "captions"}, seed=0)
    assert is_paired("digits-captions") and is_paired("paired-file") and not is_paired("digits")
    pairs = load_dataset({"name": "digits-captions", "split": "class-disjoint"}, seed=0)
    assert isinstance(pairs, PairedSplits) and len(pairs.train.captions) == len(pairs.train.labels)
    assert set(pairs.train.labels.tolist()).isdisjoint(pairs.test.labels.tolist())
    with pytest.raises(ValueError, match="'digits-captions' has no official split"):
        load_dataset({"name": "digits-captions", "split": "official"}, seed=0)


# ---------------------------------------------------------------- splits


def labels_for(classes: int, per_class: int = 4) -> torch.Tensor:
    return (torch.arange(classes) * 3 + 7).repeat_interleave(per_class)  # non-contiguous class ids


def test_class_disjoint_halves_are_disjoint_and_val_comes_from_the_train_half():
    labels = labels_for(40)
    parts = class_disjoint_split(labels, 0.25, seed=5)
    classes = sorted(set((torch.arange(40) * 3 + 7).tolist()))
    train, val, test = (set(parts.info[f"{p}_classes"]) for p in ("train", "val", "test"))
    assert test == set(classes[20:])
    assert train | val == set(classes[:20]) and not train & val
    assert len(val) == 5
    assert sorted(torch.cat([parts.train, parts.val, parts.test]).tolist()) == list(range(160))
    assert set(labels[parts.val].tolist()) == val


def test_class_disjoint_seed_controls_only_the_validation_classes():
    labels = labels_for(40)
    same = [class_disjoint_split(labels, 0.2, seed=s).info for s in (11, 11)]
    assert same[0] == same[1]
    vals = {tuple(class_disjoint_split(labels, 0.2, seed=s).info["val_classes"]) for s in range(6)}
    assert len(vals) > 1
    tests = {tuple(class_disjoint_split(labels, 0.2, seed=s).info["test_classes"]) for s in range(6)}
    assert len(tests) == 1


def test_class_disjoint_small_datasets_keep_two_val_and_two_train_classes():
    parts = class_disjoint_split(labels_for(10), 0.2, seed=0)  # 5 training-half classes
    assert len(parts.info["val_classes"]) == 2 and len(parts.info["train_classes"]) == 3
    with pytest.raises(ValueError, match="needs at least 8 classes.*has 6.*dataset.split=standard"):
        class_disjoint_split(labels_for(6), 0.2, seed=0)


def test_standard_split_samples_every_class_by_seed():
    labels = labels_for(6, per_class=10)
    parts = standard_split(labels, None, 0.2, seed=0)
    for part, per_class in (
        (parts.test, 5),
        (parts.val, 1),
        (parts.train, 4),
    ):  # half tests, 0.2 of 5 validate
        assert torch.unique(labels[part], return_counts=True)[1].tolist() == [per_class] * 6
    again = standard_split(labels, None, 0.2, seed=0)
    other = standard_split(labels, None, 0.2, seed=1)
    assert torch.equal(parts.test, again.test) and not torch.equal(parts.test, other.test)


def test_cap_per_class_keeps_classes_smaller_than_the_cap():
    labels = torch.tensor([0] * 5 + [1] * 2 + [2] * 9)
    kept = cap_per_class(labels, 3, seed=0)
    assert torch.bincount(labels[kept]).tolist() == [3, 2, 3]


def test_reloading_unchanged_files_reuses_them_and_changed_files_are_read_again(tmp_path):
    write_fashion(tmp_path)
    options = dataset_cfg(name="fashion-mnist", path=str(tmp_path), split="standard")
    first = load_dataset(options, seed=0)
    again = load_dataset(options, seed=0)
    assert torch.equal(first.test.images, again.test.images)
    again.test.images.zero_()  # a caller modifying its split must not touch later loads
    assert torch.equal(load_dataset(options, seed=0).test.images, first.test.images)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_images(np.full((20, 5, 4), 9))))
    assert int(load_dataset(options, seed=0).test.images.max()) == 9


def test_system_wide_install_is_the_last_resort(tmp_path, monkeypatch):
    monkeypatch.delenv("TRIPLETLAB_FASHION_MNIST_PATH", raising=False)
    assert dataset_path("fashion-mnist", "", str(tmp_path)) == tmp_path
    assert dataset_path("fashion-mnist", str(tmp_path), "/nonexistent") == tmp_path
    with pytest.raises(ValueError, match="TRIPLETLAB_FASHION_MNIST_PATH"):
        dataset_path("fashion-mnist", "", str(tmp_path / "missing"))
