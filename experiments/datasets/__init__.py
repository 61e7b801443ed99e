"""Datasets by name: ``load_dataset(dataset_cfg, seed) -> DatasetSplits``.

Built-ins: ``digits`` (bundled with scikit-learn), ``fashion-mnist``, ``orl-faces``, ``omniglot``
and ``image-folder`` (bring your own: one sub-folder per class). Nothing is downloaded: every
dataset but ``digits`` reads ``dataset.path`` or, when that is empty, the environment variable
``TRIPLETLAB_<NAME>_PATH`` (e.g. ``TRIPLETLAB_FASHION_MNIST_PATH``), or else a system-wide install
(Debian's ``dataset-fashion-mnist`` package puts Fashion-MNIST in /usr/share/datasets/fashion-mnist).
The most recently loaded dataset stays in memory, so the trials of a sweep read files once.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.datasets.base import DatasetSplits, LabeledImages, SourceImages
from experiments.datasets.digits import load_digits
from experiments.datasets.idx import load_fashion_mnist
from experiments.datasets.image_folder import load_image_folder
from experiments.datasets.imaging import channel_stats, parse_image_size, resize_images
from experiments.datasets.omniglot import load_omniglot
from experiments.datasets.orl import load_orl_faces
from experiments.splits import SPLITS, cap_per_class, split_indices

__all__ = ["DatasetSpec", "DatasetSplits", "LabeledImages", "SourceImages", "dataset_path", "env_var",
           "list_datasets", "load_dataset", "register_dataset"]


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one dataset.

    ``loader(path, size)`` returns ``SourceImages``; ``size`` is the resolved (height, width) or
    ``None`` to keep the native size; ``resizes`` says the loader applies ``size`` itself (else
    ``load_dataset`` resizes after loading). ``hflip`` says a horizontal flip keeps the class.
    ``system_path`` is used when neither ``dataset.path`` nor the environment variable is set.
    """

    loader: Callable[..., SourceImages]
    needs_path: bool = True
    hflip: bool = False
    default_size: tuple[int, int] | None = None
    resizes: bool = False
    system_path: str = ""


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, spec: DatasetSpec, overwrite: bool = False) -> None:
    """Add a dataset under ``name``; refuses to replace an existing one unless ``overwrite``."""
    if name in _DATASETS and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered; pass overwrite=True to replace it")
    _DATASETS[name] = spec


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


register_dataset("digits", DatasetSpec(lambda path, size: load_digits(), needs_path=False))
register_dataset("fashion-mnist", DatasetSpec(lambda path, size: load_fashion_mnist(path), hflip=True,
                                              system_path="/usr/share/datasets/fashion-mnist"))
register_dataset("orl-faces", DatasetSpec(lambda path, size: load_orl_faces(path), hflip=True))
register_dataset("omniglot", DatasetSpec(load_omniglot, default_size=(28, 28), resizes=True))
register_dataset("image-folder", DatasetSpec(load_image_folder, hflip=True, default_size=(64, 64), resizes=True))


def _option(cfg, key: str, default):
    value = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    return default if value is None else value


def env_var(name: str) -> str:
    """The environment variable read when ``dataset.path`` is empty."""
    return f"TRIPLETLAB_{name.replace('-', '_').upper()}_PATH"


def dataset_path(name: str, configured, system_path: str = "") -> Path:
    """``dataset.path``, else the dataset's environment variable, else ``system_path`` if it exists."""
    variable = env_var(name)
    raw = str(configured or "") or os.environ.get(variable, "")
    if not raw and system_path and Path(system_path).is_dir():
        raw = system_path
    if not raw:
        raise ValueError(f"dataset {name!r} needs a path: set dataset.path (e.g. dataset.path=/data/{name}) "
                         f"or the environment variable {variable}")
    path = Path(raw).expanduser()
    if not path.exists():
        source = "dataset.path" if configured else variable
        raise ValueError(f"{source} points to {path}, which does not exist")
    return path


_last_source: dict[tuple, SourceImages] = {}


def _fingerprint(path: Path | None) -> tuple[int, int, int]:
    """(files, total bytes, newest modification time) under ``path``: changes when the data does."""
    if path is None:
        return (0, 0, 0)
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [f.stat() for f in files]
    return (len(stats), sum(s.st_size for s in stats), max((s.st_mtime_ns for s in stats), default=0))


def _load_source(name: str, spec: DatasetSpec, path: Path | None, size) -> SourceImages:
    """``spec.loader(path, size)``, reusing the previous result when the same unchanged files are
    asked for again (the splits index into it and copy, so it is never modified)."""
    key = (name, str(path), size, _fingerprint(path))
    if key not in _last_source:
        source = spec.loader(path, size)
        _last_source.clear()
        _last_source[key] = source
    return _last_source[key]


def load_dataset(dataset_cfg, seed: int) -> DatasetSplits:
    """Load the dataset named by ``dataset_cfg.name`` and split it by ``dataset_cfg.split``.

    ``dataset_cfg`` is any object (or mapping) with ``name``, ``path``, ``split``
    (``class-disjoint`` | ``standard``, default class-disjoint), ``val_fraction`` (default 0.2),
    ``image_size`` (0 = the dataset's default) and ``max_per_class`` (0 = all). Labels keep the
    dataset's own class ids; ``info`` records the source, the split's classes, counts and seed,
    and the normalisation statistics of the training split (also set on every split).
    """
    name = _option(dataset_cfg, "name", "digits")
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset.name {name!r}; choose one of {', '.join(list_datasets())}")
    spec = _DATASETS[name]
    split = _option(dataset_cfg, "split", "class-disjoint")
    if split not in SPLITS:
        raise ValueError(f"dataset.split must be one of {', '.join(SPLITS)}; got {split!r}")
    val_fraction = _option(dataset_cfg, "val_fraction", 0.2)
    max_per_class = _option(dataset_cfg, "max_per_class", 0)
    size = parse_image_size(_option(dataset_cfg, "image_size", 0), spec.default_size)
    path = dataset_path(name, _option(dataset_cfg, "path", ""), spec.system_path) if spec.needs_path else None

    source = _load_source(name, spec, path, size)
    images = source.images if spec.resizes else resize_images(source.images, size)
    labels, standard_test = source.labels, source.standard_test

    # Cap each class, and each class within the dataset's own train/test parts when those are kept.
    cap_groups = labels * 2 + standard_test.long() if standard_test is not None and split == "standard" else labels
    kept = cap_per_class(cap_groups, max_per_class, seed)
    if kept.numel() < labels.numel():
        images, labels = images[kept], labels[kept]
        standard_test = standard_test[kept] if standard_test is not None else None

    parts = split_indices(split, labels, standard_test, val_fraction, seed)
    train_images = images[parts.train]
    mean, std = channel_stats(train_images)

    def make(part_images: torch.Tensor, indices: torch.Tensor) -> LabeledImages:
        return LabeledImages(part_images, labels[indices], spec.hflip, mean, std)

    info = {
        "dataset": name,
        "source": str(path) if path is not None else "scikit-learn load_digits",
        "image_shape": list(images.shape[1:]),
        "max_per_class": max_per_class,
        "hflip": spec.hflip,
        "mean": list(mean),
        "std": list(std),
        **parts.info,
    }
    if source.class_names:
        info["class_names"] = {int(k): v for k, v in sorted(source.class_names.items())}
    return DatasetSplits(
        train=make(train_images, parts.train),
        val=make(images[parts.val], parts.val),
        test=make(images[parts.test], parts.test),
        info=info,
    )
