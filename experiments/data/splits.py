"""Train / validation / test splits of a labelled dataset, as index tensors.

``class-disjoint`` follows "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020): the
first half of the classes (sorted class ids) is for training and the second half for testing, so
test classes are never seen. Validation classes are a seeded sample of ``val_fraction`` of the
training-half classes (at least 2, since retrieval among one class is trivially perfect, and
leaving at least 2 to train on); a dataset therefore needs at least 8 classes.

``standard`` keeps the same classes everywhere: the dataset's own test set where it has one
(Fashion-MNIST), else a seeded per-class sample of ``STANDARD_TEST_FRACTION`` of each class's
images; validation is a seeded per-class sample of ``val_fraction`` of the remaining images.

``official`` is the split papers report on, as the dataset defines it: Fashion-MNIST's own test
set, Omniglot's evaluation alphabets, the second half of the classes of CUB-200-2011 and Cars196
(Oh Song et al., CVPR 2016), Stanford Online Products' Ebay_test.txt, In-shop's query images
retrieved among its gallery images. Validation comes from the official training part: a seeded
``val_fraction`` of its classes when the test classes are unseen (as for ``class-disjoint``),
else a seeded per-class sample (Fashion-MNIST).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

SPLITS = ("class-disjoint", "standard", "official")
DEFAULT_SPLIT = "standard"
STANDARD_TEST_FRACTION = 0.5
MIN_VAL_CLASSES = 2
MIN_TRAIN_CLASSES = 2


@dataclass
class SplitIndices:
    """Indices into the dataset for each split, and ``info``: classes, counts and seed.

    ``gallery`` is set when test retrieval is query against gallery (``test`` holds the queries).
    """

    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)
    gallery: torch.Tensor | None = None


def _check_fraction(value: float, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise ValueError(f"{key} must be a number strictly between 0 and 1 (e.g. 0.2); got {value!r}")
    return float(value)


def random_rank_within_class(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """For each sample, its position 0..n_c-1 in a random permutation of its class (vectorised)."""
    order = torch.randperm(labels.numel(), generator=generator)
    order = order[torch.sort(labels[order], stable=True).indices]  # grouped by class, random within
    _, counts = torch.unique_consecutive(labels[order], return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(labels.numel()) - starts
    return ranks


def per_class_sample(labels: torch.Tensor, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """A mask choosing round(fraction * n_c) images of each class, at least 1 and at most n_c - 1
    (a class with a single image is never chosen)."""
    classes, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    quota = torch.round(counts.double() * fraction).long().clamp(min=1).minimum(counts - 1)
    return random_rank_within_class(labels, generator) < quota[inverse]


def cap_per_class(labels: torch.Tensor, max_per_class: int, seed: int) -> torch.Tensor:
    """Indices keeping a seeded random ``max_per_class`` images of each class (0 keeps all)."""
    if isinstance(max_per_class, bool) or not isinstance(max_per_class, int) or max_per_class < 0:
        raise ValueError(f"dataset.max_per_class must be a non-negative int (0 = all); got {max_per_class!r}")
    if max_per_class == 0:
        return torch.arange(labels.numel())
    generator = torch.Generator().manual_seed(seed)
    return torch.nonzero(random_rank_within_class(labels, generator) < max_per_class).flatten()


def _info(name: str, seed: int, labels: torch.Tensor, parts: dict[str, torch.Tensor], **extra) -> dict:
    info: dict[str, Any] = {"split": name, "seed": seed, **extra}
    for part, indices in parts.items():
        info[f"{part}_classes"] = torch.unique(labels[indices]).tolist()
    info["counts"] = {part: int(indices.numel()) for part, indices in parts.items()}
    return info


def _sample_val_classes(
    train_classes: torch.Tensor, val_fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """A seeded ``val_fraction`` of ``train_classes``: at least 2, leaving at least 2 to train."""
    n = train_classes.numel()
    n_val = min(max(round(val_fraction * n), MIN_VAL_CLASSES), n - MIN_TRAIN_CLASSES)
    return train_classes[torch.randperm(n, generator=generator)[:n_val]]


def class_disjoint_split(labels: torch.Tensor, val_fraction: float, seed: int) -> SplitIndices:
    """First half of the sorted classes trains (minus seeded validation classes), second half tests."""
    val_fraction = _check_fraction(val_fraction, "dataset.val_fraction")
    classes = torch.unique(labels)
    n_half = classes.numel() // 2
    if n_half < MIN_VAL_CLASSES + MIN_TRAIN_CLASSES:
        raise ValueError(
            f"split=class-disjoint needs at least {2 * (MIN_VAL_CLASSES + MIN_TRAIN_CLASSES)} classes "
            f"(half test, and of the training half >= {MIN_VAL_CLASSES} for validation and >= "
            f"{MIN_TRAIN_CLASSES} to train); this dataset has {classes.numel()}: use dataset.split=standard"
        )
    train_half, test_classes = classes[:n_half], classes[n_half:]
    val_classes = _sample_val_classes(train_half, val_fraction, torch.Generator().manual_seed(seed))
    is_val = torch.isin(labels, val_classes)
    is_test = torch.isin(labels, test_classes)
    parts = {
        "train": torch.nonzero(~is_val & ~is_test).flatten(),
        "val": torch.nonzero(is_val).flatten(),
        "test": torch.nonzero(is_test).flatten(),
    }
    info = _info("class-disjoint", seed, labels, parts, val_fraction=val_fraction)
    return SplitIndices(**parts, info=info)


def standard_split(
    labels: torch.Tensor, standard_test: torch.Tensor | None, val_fraction: float, seed: int
) -> SplitIndices:
    """The dataset's own test set (or a seeded half of each class), validation from the rest."""
    val_fraction = _check_fraction(val_fraction, "dataset.val_fraction")
    generator = torch.Generator().manual_seed(seed)
    if standard_test is None:
        is_test = per_class_sample(labels, STANDARD_TEST_FRACTION, generator)
        test_source = f"seeded per-class sample ({STANDARD_TEST_FRACTION:g} of each class)"
    else:
        is_test = standard_test
        test_source = "the dataset's own test set"
    rest = torch.nonzero(~is_test).flatten()
    is_val = per_class_sample(labels[rest], val_fraction, generator)
    parts = {"train": rest[~is_val], "val": rest[is_val], "test": torch.nonzero(is_test).flatten()}
    info = _info("standard", seed, labels, parts, val_fraction=val_fraction, test_source=test_source)
    return SplitIndices(**parts, info=info)


def official_split(
    labels: torch.Tensor,
    official_test: torch.Tensor,
    gallery: torch.Tensor | None,
    val_fraction: float,
    seed: int,
    test_source: str = "the dataset's official test set",
) -> SplitIndices:
    """The official test images (the queries, when ``gallery`` marks a gallery); the rest trains,
    minus validation classes (test classes unseen) or a per-class validation sample (same classes)."""
    val_fraction = _check_fraction(val_fraction, "dataset.val_fraction")
    is_gallery = torch.zeros_like(official_test) if gallery is None else gallery
    rest = torch.nonzero(~official_test & ~is_gallery).flatten()
    test = torch.nonzero(official_test).flatten()
    if rest.numel() == 0 or test.numel() == 0:
        empty = "training" if rest.numel() == 0 else "test"
        raise ValueError(
            f"split=official: the dataset's official {empty} part is empty; dataset.path must "
            "hold the complete dataset (or use dataset.split=standard)"
        )
    train_classes = torch.unique(labels[rest])
    generator = torch.Generator().manual_seed(seed)
    if bool(torch.isin(labels[test], train_classes).any()):
        is_val = per_class_sample(labels[rest], val_fraction, generator)
        val_source = f"seeded per-class sample ({val_fraction:g} of each training class)"
    else:
        if train_classes.numel() < MIN_VAL_CLASSES + MIN_TRAIN_CLASSES:
            raise ValueError(
                f"split=official needs at least {MIN_VAL_CLASSES + MIN_TRAIN_CLASSES} official "
                f"training classes (>= {MIN_VAL_CLASSES} validate, >= {MIN_TRAIN_CLASSES} "
                f"train); this dataset has {train_classes.numel()}"
            )
        is_val = torch.isin(labels[rest], _sample_val_classes(train_classes, val_fraction, generator))
        val_source = f"seeded {val_fraction:g} of the official training classes"
    parts = {"train": rest[~is_val], "val": rest[is_val], "test": test}
    if gallery is not None:
        parts["gallery"] = torch.nonzero(gallery).flatten()
    info = _info(
        "official",
        seed,
        labels,
        parts,
        val_fraction=val_fraction,
        test_source=test_source,
        val_source=val_source,
    )
    return SplitIndices(parts["train"], parts["val"], parts["test"], info, parts.get("gallery"))


def split_indices(
    split: str,
    labels: torch.Tensor,
    standard_test: torch.Tensor | None,
    val_fraction: float,
    seed: int,
    *,
    official_test: torch.Tensor | None = None,
    gallery: torch.Tensor | None = None,
    test_source: str = "the dataset's official test set",
) -> SplitIndices:
    """Dispatch on ``dataset.split``; ``official`` needs ``official_test`` (and ``gallery`` if any)."""
    if split == "class-disjoint":
        return class_disjoint_split(labels, val_fraction, seed)
    if split == "standard":
        return standard_split(labels, standard_test, val_fraction, seed)
    if split == "official":
        if official_test is None:
            raise ValueError(
                "dataset.split=official needs a dataset with an official test set "
                "(fashion-mnist, omniglot, cub200, cars196, sop, inshop); use "
                "dataset.split=standard or class-disjoint"
            )
        return official_split(labels, official_test, gallery, val_fraction, seed, test_source)
    raise ValueError(f"dataset.split must be one of {', '.join(SPLITS)}; got {split!r}")
