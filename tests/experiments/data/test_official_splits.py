"""``dataset.split=official`` on tiny trees written in each dataset's real layout (JPEG/PNG files,
a MATLAB .mat, gzipped IDX, Omniglot npz and zip), query/gallery retrieval against
pytorch-metric-learning's AccuracyCalculator, and one end-to-end run on an official split."""

from __future__ import annotations

import gzip
import io
import json
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from experiments.config import load_config
from experiments.data.registry import load_dataset
from experiments.data.splits import official_split
from experiments.eval.retrieval import retrieval_metrics
from experiments.eval.run_metrics import test_metrics as evaluate_test
from experiments.tracking.store import prepare_store
from experiments.train.run import run_experiment
from helpers.dataset_config import dataset_cfg


def cfg(**values):
    """A dataset config on the official split, images resized to 4x4."""
    return dataset_cfg(**{"split": "official", "image_size": 4, **values})


def colour(c: int) -> tuple[int, int, int]:
    """A solid colour telling class (or image) ``c`` apart after JPEG coding and resizing."""
    return (c % 250, 250 - c % 250, (c * 7) % 250)


def write_jpeg(path: Path, rgb: tuple[int, int, int], size=(7, 5), mode="RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size, rgb)
    (image.convert("L") if mode == "L" else image).save(path, format="JPEG", quality=95)


def assert_colours(split, expected) -> None:
    """Every image of ``split`` is the solid colour ``expected(label)`` (JPEG: within 3 levels)."""
    for image, label in zip(split.images, split.labels):
        mean = image.double().mean(dim=(1, 2))
        target = torch.tensor(expected(int(label)), dtype=torch.float64)
        assert torch.allclose(mean, target, atol=3), int(label)


def assert_class_disjoint_validation(splits, train_range, test_range, val_classes):
    train, val, test = (set(splits.info[f"{p}_classes"]) for p in ("train", "val", "test"))
    assert test == set(test_range)
    assert train | val == set(train_range) and not train & val and len(val) == val_classes
    assert splits.info["split"] == "official" and "official training classes" in splits.info["val_source"]


# ---------------------------------------------------------------- CUB-200-2011


def write_cub(parent: Path, per_class: int = 2) -> Path:
    root = parent / "CUB_200_2011"
    images, labels, split, classes = [], [], [], []
    image_id = 0
    for c in range(1, 201):
        folder = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {folder}")
        for j in range(per_class):
            image_id += 1
            relative = f"{folder}/Bird_{c}_{j}.jpg"
            grey = c == 7 and j == 0  # CUB holds a few grey photos: they become RGB
            write_jpeg(
                root / "images" / relative,
                (90, 90, 90) if grey else colour(c - 1),
                mode="L" if grey else "RGB",
            )
            images.append(f"{image_id} {relative}")
            labels.append(f"{image_id} {c}")
            split.append(f"{image_id} {j % 2}")  # the classification split: must be ignored
    for name, lines in (
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("classes.txt", classes),
        ("train_test_split.txt", split),
    ):
        (root / name).write_text("\n".join(lines) + "\n")
    (parent / "attributes.txt").write_text("1 has_bill_shape::curved\n")  # beside it in the archive
    return root


def test_cub_official_classes_1_to_100_train_101_to_200_test(tmp_path):
    root = write_cub(tmp_path)
    splits = load_dataset(cfg(name="cub200", path=str(tmp_path)), seed=0)  # the archive's parent folder
    assert_class_disjoint_validation(splits, range(100), range(100, 200), val_classes=20)
    assert splits.info["counts"] == {"train": 160, "val": 40, "test": 200} and splits.gallery is None
    assert splits.info["class_names"][0] == "001.Bird_1" and splits.info["class_names"][199] == "200.Bird_200"
    assert "classes 1-100 train, 101-200 test" in splits.info["test_source"]
    assert splits.train.images.shape[1:] == (3, 4, 4) and splits.train.hflip
    expected = lambda label: (90, 90, 90) if label == 6 else colour(label)  # noqa: E731
    for split in (splits.train, splits.val, splits.test):
        keep = split.labels != 6  # class 7 holds one grey and one colour image
        assert_colours(split.subset(torch.nonzero(keep).flatten()), expected)
    again = load_dataset(cfg(name="cub200", path=str(root)), seed=0)  # the folder itself
    assert torch.equal(again.test.images, splits.test.images)
    assert again.info["val_classes"] == splits.info["val_classes"]
    grey = torch.cat([s.images[s.labels == 6] for s in (splits.train, splits.val)])
    assert grey.shape[0] == 2 and any(bool((g[0] == g[1]).all() and (g[1] == g[2]).all()) for g in grey)


def test_cub_wrong_layout_names_the_expected_file(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"CUB_200_2011/images\.txt not found: dataset\.path must be the "
        r"extracted CUB_200_2011 folder",
    ):
        load_dataset(cfg(name="cub200", path=str(tmp_path)), seed=0)
    root = write_cub(tmp_path, per_class=1)
    (root / "image_class_labels.txt").unlink()
    with pytest.raises(ValueError, match=r"CUB_200_2011/image_class_labels\.txt not found"):
        load_dataset(cfg(name="cub200", path=str(root)), seed=0)
    write_cub(tmp_path, per_class=1)
    (root / "images" / "013.Bird_13" / "Bird_13_0.jpg").unlink()
    with pytest.raises(
        ValueError,
        match=r"013\.Bird_13/Bird_13_0\.jpg is listed in .*images\.txt but "
        r"not found",
    ):
        load_dataset(cfg(name="cub200", path=str(root)), seed=0)


# ---------------------------------------------------------------- Cars196


def write_cars(
    folder: Path,
    per_class: int = 2,
    fields=("relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"),
) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for c in range(1, 197):
        for _ in range(per_class):
            relative = f"car_ims/{len(rows) + 1:06d}.jpg"
            write_jpeg(folder / relative, colour(c - 1))
            record = {
                "relative_im_path": relative,
                "bbox_x1": np.uint8(1),
                "bbox_y1": np.uint8(1),
                "bbox_x2": np.uint16(6),
                "bbox_y2": np.uint16(4),
                "class": np.uint8(c),
                "test": np.uint8(rng.integers(0, 2)),
            }  # the classification split: must be ignored
            rows.append(tuple(record[f] for f in fields))
    annotations = np.zeros((1, len(rows)), dtype=[(f, "O") for f in fields])  # 1 x N struct array, as MATLAB
    for i, row in enumerate(rows):
        annotations[0, i] = row
    class_names = np.empty((1, 196), dtype=object)  # a 1 x 196 cell array of strings
    for c in range(196):
        class_names[0, c] = f"Maker Model {c + 1} 2012"
    scipy.io.savemat(folder / "cars_annos.mat", {"annotations": annotations, "class_names": class_names})


def test_cars_official_classes_1_to_98_train_99_to_196_test(tmp_path):
    write_cars(tmp_path)
    options = {"name": "cars196", "image_size": [3, 5], "val_fraction": 0.1}
    splits = load_dataset(cfg(path=str(tmp_path), **options), seed=1)
    assert_class_disjoint_validation(splits, range(98), range(98, 196), val_classes=10)
    assert splits.info["counts"] == {"train": 176, "val": 20, "test": 196}
    assert splits.info["class_names"][0] == "Maker Model 1 2012"
    assert splits.info["class_names"][195] == "Maker Model 196 2012"
    assert splits.test.images.shape[1:] == (3, 3, 5)
    for split in (splits.train, splits.val, splits.test):
        assert_colours(split, colour)
    from_file = load_dataset(cfg(path=str(tmp_path / "cars_annos.mat"), **options), seed=1)
    assert torch.equal(from_file.test.labels, splits.test.labels)


def test_cars_wrong_layout_names_the_expected_file(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"cars_annos\.mat not found: dataset\.path must be the folder "
        r"holding cars_annos\.mat and car_ims/",
    ):
        load_dataset(cfg(name="cars196", path=str(tmp_path)), seed=0)
    write_cars(tmp_path, per_class=1, fields=("relative_im_path", "bbox_x1", "test"))
    with pytest.raises(ValueError, match=r"'annotations' lacks the field\(s\) class"):
        load_dataset(cfg(name="cars196", path=str(tmp_path)), seed=0)
    (tmp_path / "cars_annos.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    with pytest.raises(ValueError, match=r"cars_annos\.mat: not a readable MATLAB file"):
        load_dataset(cfg(name="cars196", path=str(tmp_path)), seed=0)


# ---------------------------------------------------------------- Stanford Online Products

SOP_HEADER = "image_id class_id super_class_id path"


def write_sop(parent: Path, train_classes: int = 8, test_classes: int = 6) -> Path:
    root = parent / "Stanford_Online_Products"
    image_id = 0
    for name, classes in (
        ("Ebay_train.txt", range(1, train_classes + 1)),
        ("Ebay_test.txt", range(train_classes + 1, train_classes + test_classes + 1)),
    ):
        lines = [SOP_HEADER]
        for c in classes:
            super_class = 1 + c % 2
            for j in range(2 + c % 2):
                image_id += 1
                relative = f"{('bicycle', 'chair')[super_class - 1]}_final/{c}_{j}.JPG"
                write_jpeg(root / relative, colour(c - 1))
                lines.append(f"{image_id} {c} {super_class} {relative}")
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def test_sop_official_ebay_train_and_test_at_the_default_size(tmp_path):
    write_sop(tmp_path)
    splits = load_dataset(cfg(name="sop", path=str(tmp_path), image_size=0), seed=0)
    assert_class_disjoint_validation(splits, range(8), range(8, 14), val_classes=2)
    counts = splits.info["counts"]
    assert counts["test"] == 6 * 2 + 3 and counts["train"] + counts["val"] == 8 * 2 + 4
    assert splits.test.images.shape[1:] == (3, 256, 256)  # the Reality Check's resize before 227 crops
    assert_colours(splits.test, colour)
    assert "Ebay_test.txt tests" in splits.info["test_source"]


def test_sop_wrong_layout_names_the_expected_file(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"Stanford_Online_Products/Ebay_train\.txt not found: dataset\.path "
        r"must be the extracted Stanford_Online_Products folder",
    ):
        load_dataset(cfg(name="sop", path=str(tmp_path)), seed=0)
    root = write_sop(tmp_path)
    (root / "Ebay_test.txt").unlink()
    with pytest.raises(ValueError, match=r"Stanford_Online_Products/Ebay_test\.txt not found"):
        load_dataset(cfg(name="sop", path=str(root)), seed=0)
    write_sop(tmp_path)
    lines = (root / "Ebay_train.txt").read_text().splitlines()
    (root / "Ebay_train.txt").write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(ValueError, match=r"Ebay_train\.txt: expected the header line 'image_id class_id"):
        load_dataset(cfg(name="sop", path=str(root)), seed=0)


# ---------------------------------------------------------------- In-shop Clothes


def write_inshop(root: Path, official_tree: bool = False, train_items: int = 6, test_items: int = 4) -> dict:
    """Train items with 3 images; test items with 2 query and 2 gallery images; every image its own colour."""
    rows, colours = [], {}
    for item in range(1, train_items + test_items + 1):
        statuses = ["train"] * 3 if item <= train_items else ["query", "gallery", "query", "gallery"]
        for j, status in enumerate(statuses):
            name = f"img/{('WOMEN', 'MEN')[item % 2]}/Dresses/id_{item:08d}/{j + 1:02d}_1_front.jpg"
            rgb = (len(rows) * 6, 250 - len(rows) * 5, 128)
            write_jpeg((root / "Img" if official_tree else root) / name, rgb)
            colours[rgb] = (item - 1, status)
            rows.append(f"{name:<64} id_{item:08d} {status}")
    partition = (root / "Eval" if official_tree else root) / "list_eval_partition.txt"
    partition.parent.mkdir(parents=True, exist_ok=True)
    partition.write_text("\n".join([str(len(rows)), "image_name item_id evaluation_status", *rows]) + "\n")
    return colours


def image_keys(split, colours) -> list[tuple[int, str]]:
    """The (item, status) each image of ``split`` was written as, found by its colour."""
    keys = []
    for image in split.images:
        mean = image.double().mean(dim=(1, 2)).numpy()
        keys.append(next(v for c, v in colours.items() if np.abs(mean - np.array(c)).max() <= 2))
    return keys


@pytest.mark.parametrize("official_tree", [False, True])
def test_inshop_queries_against_a_disjoint_gallery(tmp_path, official_tree):
    colours = write_inshop(tmp_path, official_tree)
    splits = load_dataset(cfg(name="inshop", path=str(tmp_path)), seed=0)
    assert_class_disjoint_validation(splits, range(6), range(6, 10), val_classes=2)
    assert splits.info["gallery_classes"] == list(range(6, 10))
    assert splits.info["counts"] == {"train": 12, "val": 6, "test": 8, "gallery": 8}
    assert splits.info["class_names"][0] == "id_00000001"
    queries, gallery = image_keys(splits.test, colours), image_keys(splits.gallery, colours)
    assert {status for _, status in queries} == {"query"} and {status for _, status in gallery} == {"gallery"}
    assert [item for item, _ in queries] == splits.test.labels.tolist()
    assert [item for item, _ in gallery] == splits.gallery.labels.tolist()
    assert splits.gallery.mean == splits.train.mean and splits.gallery.hflip


def test_inshop_cap_keeps_queries_and_gallery_of_each_item(tmp_path):
    write_inshop(tmp_path)
    splits = load_dataset(cfg(name="inshop", path=str(tmp_path), max_per_class=1), seed=0)
    assert sorted(splits.test.labels.tolist()) == sorted(splits.gallery.labels.tolist()) == [6, 7, 8, 9]


def test_inshop_wrong_layout_names_the_expected_file(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"list_eval_partition\.txt not found \(nor .*Eval/"
        r"list_eval_partition\.txt\): dataset\.path must be the In-shop "
        r"folder",
    ):
        load_dataset(cfg(name="inshop", path=str(tmp_path)), seed=0)
    write_inshop(tmp_path)
    partition = tmp_path / "list_eval_partition.txt"
    lines = partition.read_text().splitlines()
    partition.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match="announces 34 images but 33 are listed"):
        load_dataset(cfg(name="inshop", path=str(tmp_path)), seed=0)
    partition.write_text("\n".join([*lines[:-1], lines[-1].replace("gallery", "probe")]) + "\n")
    with pytest.raises(
        ValueError, match="evaluation_status must be one of train, query, gallery, found 'probe'"
    ):
        load_dataset(cfg(name="inshop", path=str(tmp_path)), seed=0)


# ---------------------------------------------------------------- query/gallery metrics


def test_query_gallery_metrics_agree_with_pml_and_brute_force():
    g = torch.Generator().manual_seed(0)
    centres = 1.2 * torch.randn(7, 6, generator=g, dtype=torch.float64)
    query_labels = torch.randint(0, 7, (50,), generator=g)  # class 6 has no gallery item: left out
    gallery_labels = torch.randint(0, 6, (65,), generator=g)
    query = centres[query_labels] + torch.randn(50, 6, generator=g, dtype=torch.float64)
    gallery = centres[gallery_labels] + torch.randn(65, 6, generator=g, dtype=torch.float64)
    ours = evaluate_test(query, query_labels, False, gallery=(gallery, gallery_labels))
    calc = AccuracyCalculator(
        include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
        k="max_bin_count",
        device=torch.device("cpu"),
    )  # faiss k-NN, L2
    theirs = calc.get_accuracy(query, query_labels, gallery, gallery_labels, ref_includes_query=False)
    assert ours["precision_at_1"] == pytest.approx(theirs["precision_at_1"], abs=1e-6)
    assert ours["r_precision"] == pytest.approx(theirs["r_precision"], abs=1e-6)
    assert ours["map_at_r"] == pytest.approx(theirs["mean_average_precision_at_r"], abs=1e-6)
    # Recall@K: a query (of a class in the gallery) hits when a same-class item is among its K nearest
    order = torch.cdist(query, gallery).argsort(dim=1)
    answerable = torch.isin(query_labels, gallery_labels)
    for k in (1, 2, 4, 8):
        hits = [
            bool((gallery_labels[order[i, :k]] == query_labels[i]).any()) for i in range(50) if answerable[i]
        ]
        assert ours[f"recall_at_{k}"] == pytest.approx(sum(hits) / len(hits), abs=1e-9)
    within = evaluate_test(query, query_labels, False)  # queries among themselves: a different protocol
    assert within["map_at_r"] != pytest.approx(ours["map_at_r"], abs=1e-3)


# ---------------------------------------------------------------- Omniglot, Fashion-MNIST


def omniglot_npz(path: Path, characters: int, seed: int) -> None:
    background = np.random.default_rng(seed).random((characters, 2, 10, 10)) > 0.3  # True = white
    np.savez(path, images=background, labels=np.repeat(np.arange(characters)[:, None], 2, axis=1))


def omniglot_zip(path: Path, alphabets: tuple[str, ...]) -> None:
    rng = np.random.default_rng(len(alphabets))
    with zipfile.ZipFile(path, "w") as archive:
        for alphabet in alphabets:
            for character in (1, 2, 3):
                for drawer in (1, 2):
                    buffer = io.BytesIO()
                    Image.fromarray(rng.random((8, 8)) > 0.4).convert("1").save(buffer, format="PNG")
                    archive.writestr(
                        f"{path.stem}/{alphabet}/character{character:02d}/{drawer:02d}.png", buffer.getvalue()
                    )


def test_omniglot_official_trains_on_background_and_tests_on_evaluation(tmp_path):
    omniglot_npz(tmp_path / "images_background.npz", characters=8, seed=0)
    omniglot_npz(tmp_path / "images_evaluation.npz", characters=5, seed=1)
    splits = load_dataset(cfg(name="omniglot", path=str(tmp_path), image_size=5), seed=0)
    assert_class_disjoint_validation(splits, range(8), range(8, 13), val_classes=2)
    assert splits.info["counts"]["test"] == 10 and "images_evaluation tests" in splits.info["test_source"]
    evaluation = np.load(tmp_path / "images_evaluation.npz")["images"]
    ink = torch.from_numpy((~evaluation).astype(np.uint8) * 255).reshape(10, 1, 10, 10)
    expected = torch.nn.functional.interpolate(ink.float(), size=(5, 5), mode="area").round().to(torch.uint8)
    assert torch.equal(splits.test.images, expected)  # background first, then evaluation, in drawer order


def test_omniglot_official_from_the_zips(tmp_path):
    omniglot_zip(tmp_path / "images_background.zip", ("Alpha", "Beta"))
    omniglot_zip(tmp_path / "images_evaluation.zip", ("Gamma",))
    splits = load_dataset(cfg(name="omniglot", path=str(tmp_path), image_size=8, val_fraction=0.3), seed=2)
    assert_class_disjoint_validation(splits, range(6), range(6, 9), val_classes=2)
    names = splits.info["class_names"]
    assert all("images_evaluation/Gamma" in names[c] for c in splits.info["test_classes"])


def test_omniglot_official_needs_the_evaluation_set(tmp_path):
    omniglot_npz(tmp_path / "images_background.npz", characters=8, seed=0)
    for path in (tmp_path, tmp_path / "images_background.npz"):
        with pytest.raises(
            ValueError,
            match=r"official for omniglot needs the evaluation set.*tests on "
            r"images_evaluation.*class-disjoint works with the background "
            r"set alone",
        ):
            load_dataset(cfg(name="omniglot", path=str(path)), seed=0)
    splits = load_dataset(cfg(name="omniglot", path=str(tmp_path), split="class-disjoint"), seed=0)
    assert splits.info["test_classes"] == [4, 5, 6, 7]


def write_idx_gz(folder: Path, stem: str, array: np.ndarray) -> None:
    magic = 2051 if array.ndim == 3 else 2049  # images, labels
    header = struct.pack(">i", magic) + struct.pack(f">{array.ndim}i", *array.shape)
    (folder / f"{stem}.gz").write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_official_is_its_test_set_with_per_class_validation(tmp_path):
    rng = np.random.default_rng(0)
    test_images = rng.integers(0, 256, (20, 4, 4))
    write_idx_gz(tmp_path, "train-images-idx3-ubyte", rng.integers(0, 256, (50, 4, 4)))
    write_idx_gz(tmp_path, "train-labels-idx1-ubyte", np.arange(50) % 10)
    write_idx_gz(tmp_path, "t10k-images-idx3-ubyte", test_images)
    write_idx_gz(tmp_path, "t10k-labels-idx1-ubyte", np.arange(20) % 10)
    splits = load_dataset(cfg(name="fashion-mnist", path=str(tmp_path), image_size=0), seed=0)
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(test_images).to(torch.uint8))
    assert torch.equal(splits.test.labels, torch.arange(20) % 10)
    for part in ("train", "val", "test"):
        assert splits.info[f"{part}_classes"] == list(range(10))  # the same classes everywhere
    assert splits.info["counts"] == {"train": 40, "val": 10, "test": 20}  # one of each class's 5 validates
    assert "per-class" in splits.info["val_source"]


def test_official_split_errors_name_the_problem():
    labels = torch.arange(10).repeat_interleave(2)
    with pytest.raises(ValueError, match="needs at least 4 official training classes.*this dataset has 3"):
        official_split(labels, labels >= 3, None, 0.2, seed=0)
    with pytest.raises(ValueError, match="official training part is empty"):
        official_split(labels, labels >= 0, None, 0.2, seed=0)
    with pytest.raises(ValueError, match="official test part is empty"):
        official_split(labels, labels < 0, None, 0.2, seed=0)
    with pytest.raises(ValueError, match=r"dataset\.val_fraction must be a number strictly between 0 and 1"):
        official_split(labels, labels >= 5, None, 0.0, seed=0)


def test_official_on_a_dataset_without_one_is_a_clear_error():
    with pytest.raises(
        ValueError,
        match=r"dataset 'digits' has no official split; use "
        r"dataset\.split=standard",
    ):
        load_dataset(cfg(name="digits"), seed=0)


# ---------------------------------------------------------------- end to end


def test_run_on_the_official_inshop_split_logs_gallery_test_metrics(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRIPLETLAB_PROGRESS", "0")
    write_inshop(tmp_path / "inshop")
    uri = prepare_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    config = load_config(
        None,
        [
            "dataset.name=inshop",
            f"dataset.path={tmp_path / 'inshop'}",
            "dataset.split=official",
            "dataset.image_size=8",
            "epochs=1",
            "batch.p=4",
            "batch.k=2",
            "model.embedding_dim=8",
            "device=cpu",
        ],
    )
    result = run_experiment(config, tracking_uri=uri, experiment_name="official")
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["tripletlab.split"] == "official"
    assert set(result.test_metrics) >= {"precision_at_1", "map_at_r", "recall_at_1", "alignment"}
    assert run.data.metrics["test/map_at_r"] == pytest.approx(result.test_metrics["map_at_r"])
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    split = json.loads((artifacts / "split.json").read_text())
    assert split["counts"]["gallery"] == 8 and split["split"] == "official"
    saved = np.load(artifacts / "embeddings" / "test.npz")
    assert saved["embeddings"].shape == (8, 8) and saved["ref_embeddings"].shape == (8, 8)
    again = retrieval_metrics(
        *(torch.from_numpy(saved[key]) for key in ("embeddings", "labels", "ref_embeddings", "ref_labels"))
    )
    assert result.test_metrics["map_at_r"] == pytest.approx(again["map_at_r"], abs=1e-6)
