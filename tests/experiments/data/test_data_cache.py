"""The decoded-image cache and streamed splits: batches read from the cache are the bytes a fresh
decode gives; changed files and damaged entries are rebuilt; concurrent processes decode once; a
split over the resident budget trains through the streaming path as it would in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from experiments.config import ExperimentConfig
from experiments.data.base import LabeledImages
from experiments.data.decode_cache import CACHE_ENV, decoded_images
from experiments.data.device_data import DeviceImages
from experiments.data.formats.image_folder import load_image_folder
from experiments.data.image_decoding import read_resized
from experiments.data.registry import load_dataset
from experiments.data.sampler import PKSampler
from experiments.models.image import build_model
from experiments.train.loop import train
from losses import build_loss

SIZE = (12, 10)


def image_tree(root: Path, classes: int = 4, per_class: int = 3, side: int = 24) -> list[Path]:
    """JPEG and PNG photos of noise in ``classes`` folders; the files in class, then name order."""
    generator = np.random.default_rng(0)
    files = []
    for label in range(classes):
        folder = root / f"c{label}"
        folder.mkdir(parents=True)
        for j in range(per_class):
            array = generator.integers(0, 256, (side + j, side + 2 * j, 3), dtype=np.uint8)
            file = folder / f"{j}.{'jpg' if (label + j) % 2 else 'png'}"
            Image.fromarray(array).save(file)
            files.append(file)
    return files


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder


def fresh(files: list[Path]) -> torch.Tensor:
    return torch.from_numpy(np.stack([read_resized(file, "RGB", SIZE) for file in files]))


def entry(cache: Path, suffix: str) -> Path:
    (path,) = (p for p in cache.glob("*-*") if "." + p.name.split(".", 1)[1] == suffix)
    return path


def test_batches_from_the_cache_are_the_bytes_of_a_fresh_decode(tmp_path, cache):
    files = image_tree(tmp_path / "data")
    first = load_image_folder(tmp_path / "data", SIZE)  # decodes
    again = load_image_folder(tmp_path / "data", SIZE)  # reads the cache
    rows = torch.tensor([5, 0, 11, 3, 4])
    assert torch.equal(first.images.gather(rows), fresh(files)[rows])
    assert torch.equal(again.images.gather(torch.arange(len(files))), fresh(files))
    assert json.loads(entry(cache, ".json").read_text())["mode"] == "RGB"
    streamed = DeviceImages(
        LabeledImages(again.images, again.labels, rows=torch.arange(len(files))),
        "cpu",
        mean=(0.5,) * 3,
        std=(0.25,) * 3,
        resident_mb=0.001,
    )
    in_memory = DeviceImages(
        LabeledImages(fresh(files), first.labels), "cpu", mean=(0.5,) * 3, std=(0.25,) * 3
    )
    assert streamed.streams and not in_memory.streams
    assert torch.equal(streamed.batch(rows)[0], in_memory.batch(rows)[0])
    assert all(torch.equal(a[0], b[0]) for a, b in zip(streamed.iterate(5), in_memory.iterate(5)))
    exact = LabeledImages(fresh(files)[:6], first.labels[:6]).channel_stats()  # from the pixels
    assert sum(first.images.channel_stats(torch.arange(6)), ()) == pytest.approx(sum(exact, ()), rel=1e-9)


def test_a_changed_file_rebuilds_the_cache(tmp_path, cache):
    files = image_tree(tmp_path / "data")
    load_image_folder(tmp_path / "data", SIZE)
    old_entry = entry(cache, ".npy")
    Image.fromarray(np.full((30, 30, 3), 200, dtype=np.uint8)).save(files[2], format="PNG")
    os.utime(files[2], ns=(time.time_ns(), time.time_ns() + 10**9))
    source = load_image_folder(tmp_path / "data", SIZE)
    assert int(source.images.gather(torch.tensor([2])).min()) == 200
    assert torch.equal(source.images.gather(torch.arange(len(files))), fresh(files))
    assert not old_entry.exists() and entry(cache, ".npy") != old_entry  # the stale entry is gone


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "index"])
def test_a_damaged_cache_entry_is_rebuilt(tmp_path, cache, damage):
    files = image_tree(tmp_path / "data")
    load_image_folder(tmp_path / "data", SIZE)
    npy = entry(cache, ".npy")
    if damage == "truncate":
        os.truncate(npy, npy.stat().st_size - 100)
    elif damage == "flip a byte":  # in the first row, which the digest samples
        with open(npy, "r+b") as file:
            file.seek(200)
            byte = file.read(1)
            file.seek(200)
            file.write(bytes([byte[0] ^ 0xFF]))
    else:
        entry(cache, ".json").write_text("{")
    source = load_image_folder(tmp_path / "data", SIZE)
    assert torch.equal(source.images.gather(torch.arange(len(files))), fresh(files))
    assert json.loads(entry(cache, ".json").read_text())["count"] == len(files)


def test_two_processes_loading_at_once_decode_once(tmp_path, cache):
    image_tree(tmp_path / "data")
    log, go = tmp_path / "builds.log", tmp_path / "go"
    script = f"""
import sys, time
from pathlib import Path
import numpy as np, torch
import experiments.data.decode_cache as cache
build = cache._build
def counted(*args):
    with open({str(log)!r}, "a") as out:
        out.write("built\\n")
    time.sleep(1.0)  # the other process reaches the lock meanwhile
    build(*args)
cache._build = counted
while not Path({str(go)!r}).exists():
    time.sleep(0.01)
from experiments.data.formats.image_folder import load_image_folder
source = load_image_folder(Path({str(tmp_path / "data")!r}), {SIZE!r})
sys.stdout.write(source.images.gather(torch.arange(len(source.labels))).numpy().tobytes().hex())
"""
    env = {**os.environ, CACHE_ENV: str(cache), "OMP_NUM_THREADS": "1"}
    runs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            cwd=Path(__file__).parents[3],
        )
        for _ in range(2)
    ]
    time.sleep(0.5)
    go.touch()
    outputs = [run.communicate(timeout=120) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], [err for _, err in outputs]
    assert log.read_text().count("built") == 1
    assert outputs[0][0] == outputs[1][0] != ""


def test_a_split_over_the_resident_budget_trains_streamed_as_in_memory(tmp_path, cache):
    image_tree(tmp_path / "data", classes=8, per_class=12, side=40)
    options = {"name": "image-folder", "path": str(tmp_path / "data"), "split": "standard", "image_size": 64}
    splits = load_dataset(options, seed=0)
    cfg = ExperimentConfig()
    cfg.epochs, cfg.batch.p, cfg.batch.k = 1, 4, 2
    histories = []
    for resident_mb in (0, 0.5):
        data = LabeledImages(
            splits.train.store,
            splits.train.labels.repeat(2),
            True,
            splits.train.mean,
            splits.train.std,
            rows=splits.train.rows.repeat(2),
        )  # > 0.5 MiB
        device_data = DeviceImages(data, "cpu", augment=True, seed=0, resident_mb=resident_mb)
        assert device_data.streams == bool(resident_mb) and (device_data.images is None) == bool(resident_mb)
        model = build_model("cnn", 3, (64, 64), 16, True, 0)
        sampler = PKSampler(data.labels, 4, 2, 0)
        outcome = train(model, build_loss("batch_hard"), device_data, sampler, None, cfg, torch.device("cpu"))
        histories.append(outcome.history[0]["train/loss"])
    assert histories[0] == histories[1]


def test_an_unusable_cache_folder_is_a_clear_error(tmp_path, monkeypatch):
    files = image_tree(tmp_path / "data", classes=1, per_class=2)
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "not-a-folder"))
    with pytest.raises(ValueError, match=f"cannot create the image cache folder.*{CACHE_ENV}"):
        decoded_images(files, SIZE)
