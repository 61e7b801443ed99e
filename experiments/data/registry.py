"""Datasets by name: ``load_dataset(dataset_cfg, seed) -> DatasetSplits`` (``PairedSplits`` for pairs).

Built-ins: ``digits`` (bundled with scikit-learn), ``fashion-mnist``, ``orl-faces``, ``omniglot``,
the natural-image benchmarks ``cub200`` (CUB-200-2011), ``cars196``, ``sop`` (Stanford Online
Products) and ``inshop`` (In-shop Clothes), and ``image-folder`` (bring your own: one sub-folder
per class), and the paired (image, caption) datasets ``digits-captions`` and ``paired-file`` (a CSV
or JSONL of ``image_path, caption, label``) for cross-modal retrieval.
``dataset.split=official`` uses each dataset's published split. Nothing is downloaded: every
dataset but ``digits`` reads ``dataset.path`` or, when that is empty, the environment variable
``TRIPLETLAB_<NAME>_PATH`` (e.g. ``TRIPLETLAB_FASHION_MNIST_PATH``), or else a system-wide install
(Debian's ``dataset-fashion-mnist`` package puts Fashion-MNIST in /usr/share/datasets/fashion-mnist).
The most recently loaded dataset stays in memory, so the trials of a sweep read files once; the
image folders (``image-folder`` and the natural-image benchmarks) are decoded once into the
decoded-image cache on disk (``decode_cache``), shared by every process, and read from there.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.data.base import DatasetSplits, LabeledImages, SourceImages
from experiments.data.captions import load_digits_paired, load_paired_file
from experiments.data.formats import cars, cub, inshop, omniglot, sop
from experiments.data.formats.digits import load_digits
from experiments.data.formats.idx import load_fashion_mnist
from experiments.data.formats.image_folder import load_image_folder
from experiments.data.formats.listed_images import DEFAULT_SIZE as NATURAL_SIZE
from experiments.data.formats.orl import load_orl_faces
from experiments.data.image_store import as_store
from experiments.data.imaging import parse_image_size, resize_images
from experiments.data.paired import PairedSplits, split_pairs
from experiments.data.splits import DEFAULT_SPLIT, SPLITS, cap_per_class, split_indices

PAIRED_IMAGE_SIZE = 32

__all__ = [
    "DatasetSpec",
    "DatasetSplits",
    "LabeledImages",
    "SourceImages",
    "dataset_path",
    "env_var",
    "is_paired",
    "list_datasets",
    "load_dataset",
    "register_dataset",
]


@dataclass(frozen=True)
class DatasetSpec:
    """How to load one dataset.

    ``loader(path, size)`` returns ``SourceImages``; ``size`` is the resolved (height, width) or
    ``None`` to keep the native size; ``resizes`` says the loader applies ``size`` itself (else
    ``load_dataset`` resizes after loading). ``hflip`` says a horizontal flip keeps the class.
    ``system_path`` is used when neither ``dataset.path`` nor the environment variable is set.
    ``official`` describes the dataset's official split (empty: it has none); ``official_missing``
    is the error when the given files lack its official test part. A ``paired`` dataset's
    ``loader(path, image_size, seed)`` returns (image, caption, label) triples, a ``PairedSplit``.
    """

    loader: Callable[..., SourceImages]
    needs_path: bool = True
    hflip: bool = False
    default_size: tuple[int, int] | None = None
    resizes: bool = False
    system_path: str = ""
    official: str = ""
    official_missing: str = ""
    paired: bool = False


_DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(name: str, spec: DatasetSpec, overwrite: bool = False) -> None:
    """Add a dataset under ``name``; refuses to replace an existing one unless ``overwrite``."""
    if name in _DATASETS and not overwrite:
        raise ValueError(f"dataset {name!r} is already registered; pass overwrite=True to replace it")
    _DATASETS[name] = spec


def list_datasets() -> list[str]:
    return sorted(_DATASETS)


def is_paired(name: str) -> bool:
    """Whether ``name`` is a registered dataset of (image, caption, label) pairs."""
    return name in _DATASETS and _DATASETS[name].paired


def _natural_images(loader: Callable[..., SourceImages], official: str) -> DatasetSpec:
    """A natural-image benchmark: RGB photos resized at load (default 256x256); a flip keeps the class."""
    return DatasetSpec(loader, hflip=True, default_size=NATURAL_SIZE, resizes=True, official=official)


register_dataset("digits", DatasetSpec(lambda path, size: load_digits(), needs_path=False))
register_dataset(
    "fashion-mnist",
    DatasetSpec(
        lambda path, size: load_fashion_mnist(path),
        hflip=True,
        system_path="/usr/share/datasets/fashion-mnist",
        official="the official 10,000 test images (same classes)",
    ),
)
register_dataset("orl-faces", DatasetSpec(lambda path, size: load_orl_faces(path), hflip=True))
register_dataset(
    "omniglot",
    DatasetSpec(
        omniglot.load_omniglot,
        default_size=(28, 28),
        resizes=True,
        official=omniglot.OFFICIAL,
        official_missing=omniglot.OFFICIAL_MISSING,
    ),
)
register_dataset("cub200", _natural_images(cub.load_cub, cub.OFFICIAL))
register_dataset("cars196", _natural_images(cars.load_cars, cars.OFFICIAL))
register_dataset("sop", _natural_images(sop.load_sop, sop.OFFICIAL))
register_dataset("inshop", _natural_images(inshop.load_inshop, inshop.OFFICIAL))
register_dataset(
    "image-folder", DatasetSpec(load_image_folder, hflip=True, default_size=(64, 64), resizes=True)
)
register_dataset(
    "digits-captions",
    DatasetSpec(lambda path, size, seed: load_digits_paired(seed), needs_path=False, paired=True),
)
register_dataset(
    "paired-file", DatasetSpec(lambda path, size, seed: load_paired_file(path, size), paired=True)
)


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
        raise ValueError(
            f"dataset {name!r} needs a path: set dataset.path (e.g. dataset.path=/data/{name}) "
            f"or the environment variable {variable}"
        )
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
    asked for again (splits are rows of it, and ``LabeledImages.images`` copies them out)."""
    key = (name, str(path), size, _fingerprint(path))
    if key not in _last_source:
        source = spec.loader(path, size)
        _last_source.clear()
        _last_source[key] = source
    return _last_source[key]


def _part_codes(split: str, masks: dict[str, torch.Tensor | None]) -> torch.Tensor | None:
    """Per image, 0 train / 1 test / 2 gallery of the dataset's own parts the split keeps, or ``None``."""
    if split == "standard" and masks["standard_test"] is not None:
        return masks["standard_test"].long()
    if split == "official":
        gallery = masks["gallery"]
        return masks["official_test"].long() + (2 * gallery.long() if gallery is not None else 0)
    return None


def _load_pairs(name: str, spec: DatasetSpec, dataset_cfg, split: str, seed: int) -> PairedSplits:
    """A paired dataset's splits; images are ``image_size`` square (default 32)."""
    path = dataset_path(name, _option(dataset_cfg, "path", ""), spec.system_path) if spec.needs_path else None
    size = _option(dataset_cfg, "image_size", 0)
    data = spec.loader(path, size if isinstance(size, int) and size > 0 else PAIRED_IMAGE_SIZE, seed)
    return split_pairs(data, split, _option(dataset_cfg, "val_fraction", 0.2), seed, name)


def load_dataset(dataset_cfg, seed: int) -> DatasetSplits | PairedSplits:
    """Load the dataset named by ``dataset_cfg.name`` and split it by ``dataset_cfg.split``.

    ``dataset_cfg`` is any object (or mapping) with ``name``, ``path``, ``split``
    (``standard`` | ``class-disjoint`` | ``official``, default ``splits.DEFAULT_SPLIT``, the
    config's default), ``val_fraction`` (default 0.2),
    ``image_size`` (0 = the dataset's default) and ``max_per_class`` (0 = all). Labels keep the
    dataset's own class ids; ``info`` records the source, the split's classes, counts and seed,
    and the normalisation statistics of the training split (also set on every split). A paired
    dataset gives :class:`~experiments.data.paired.PairedSplits`.
    """
    name = _option(dataset_cfg, "name", "digits")
    if name not in _DATASETS:
        raise ValueError(f"unknown dataset.name {name!r}; choose one of {', '.join(list_datasets())}")
    spec = _DATASETS[name]
    split = _option(dataset_cfg, "split", DEFAULT_SPLIT)
    if split not in SPLITS:
        raise ValueError(f"dataset.split must be one of {', '.join(SPLITS)}; got {split!r}")
    if split == "official" and not spec.official:
        raise ValueError(
            f"dataset {name!r} has no official split; use dataset.split=standard or class-disjoint"
        )
    if spec.paired:
        return _load_pairs(name, spec, dataset_cfg, split, seed)
    val_fraction = _option(dataset_cfg, "val_fraction", 0.2)
    max_per_class = _option(dataset_cfg, "max_per_class", 0)
    size = parse_image_size(_option(dataset_cfg, "image_size", 0), spec.default_size)
    path = dataset_path(name, _option(dataset_cfg, "path", ""), spec.system_path) if spec.needs_path else None

    source = _load_source(name, spec, path, size)
    if split == "official" and source.official_test is None:
        raise ValueError(
            spec.official_missing
            or f"dataset {name!r} at {path}: no official test images "
            "found; use dataset.split=standard or class-disjoint"
        )
    store = as_store(source.images if spec.resizes else resize_images(source.images, size))
    labels = source.labels
    masks = {
        "standard_test": source.standard_test,
        "official_test": source.official_test,
        "gallery": source.gallery,
    }

    # Cap each class, and each class within the dataset's own parts (train / test / gallery) when kept.
    part = _part_codes(split, masks)
    rows = cap_per_class(labels if part is None else labels * 3 + part, max_per_class, seed)
    if rows.numel() < labels.numel():
        labels = labels[rows]
        masks = {key: mask[rows] if mask is not None else None for key, mask in masks.items()}

    parts = split_indices(
        split,
        labels,
        masks["standard_test"],
        val_fraction,
        seed,
        official_test=masks["official_test"],
        gallery=masks["gallery"],
        test_source=spec.official,
    )
    mean, std = store.channel_stats(rows[parts.train])

    def make(indices: torch.Tensor) -> LabeledImages:
        """The split at ``indices``: rows of the dataset's store, not a copy."""
        return LabeledImages(store, labels[indices], spec.hflip, mean, std, rows=rows[indices])

    info = {
        "dataset": name,
        "source": str(path) if path is not None else "scikit-learn load_digits",
        "image_shape": list(store.shape[1:]),
        "max_per_class": max_per_class,
        "hflip": spec.hflip,
        "mean": list(mean),
        "std": list(std),
        **parts.info,
    }
    if source.class_names:
        info["class_names"] = {int(k): v for k, v in sorted(source.class_names.items())}
    return DatasetSplits(
        train=make(parts.train),
        val=make(parts.val),
        test=make(parts.test),
        info=info,
        gallery=make(parts.gallery) if parts.gallery is not None else None,
    )
