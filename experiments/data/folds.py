"""k-fold class-disjoint cross-validation, as in "A Metric Learning Reality Check" (Musgrave et al.,
ECCV 2020; 4 folds there).

The training classes (every class of the training and validation splits, never a test class) are
dealt into ``folds`` class-disjoint folds: a permutation seeded by ``seed``, cut into contiguous
chunks whose class counts differ by at most one. Model ``i`` trains on the other folds and is
validated on fold ``i``; all of it is decided before any training, so every trial of a sweep sees
the same folds.
"""

from __future__ import annotations

import torch

from experiments.data.registry import DatasetSplits, LabeledImages

MIN_FOLD_CLASSES = 2  # retrieval among the images of a single class is trivially perfect


def class_folds(classes: list[int], folds: int, seed: int) -> list[list[int]]:
    """``classes`` dealt into ``folds`` disjoint, balanced folds (each sorted), seeded by ``seed``."""
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an integer >= 2 for cross-validation (e.g. folds=4), got {folds!r}")
    classes = sorted(set(int(c) for c in classes))
    if len(classes) < MIN_FOLD_CLASSES * folds:
        raise ValueError(
            f"folds={folds} needs at least {MIN_FOLD_CLASSES * folds} training classes "
            f"({MIN_FOLD_CLASSES} per fold); the training and validation splits hold "
            f"{len(classes)}: lower folds or use a dataset with more classes"
        )
    order = torch.randperm(len(classes), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [classes[i] for i in order]
    bounds = [round(i * len(classes) / folds) for i in range(folds + 1)]
    return [sorted(shuffled[bounds[i] : bounds[i + 1]]) for i in range(folds)]


def training_pool(splits: DatasetSplits) -> LabeledImages:
    """The training and validation images together (what the folds divide), checked to share no
    class with the test split (nor its gallery, where the test queries rank one)."""
    train, val = splits.train, splits.val
    pool = train.joined(val)
    tested = set(splits.test.classes()) | set(splits.gallery.classes() if splits.gallery is not None else [])
    shared = sorted(set(pool.classes()) & tested)
    if shared:
        raise ValueError(
            f"folds are class-disjoint, but {len(shared)} test class(es) are also training "
            f"classes (e.g. {shared[:3]}); use dataset.split=class-disjoint"
        )
    return pool


def fold_parts(
    pool: LabeledImages, fold_classes: list[list[int]], index: int
) -> tuple[LabeledImages, LabeledImages]:
    """``(train, val)`` of fold ``index``: the images of the other folds' classes, and its own."""
    if not 0 <= index < len(fold_classes):
        raise ValueError(f"fold index {index} is outside 0..{len(fold_classes) - 1}")
    held_out = torch.isin(pool.labels, torch.tensor(fold_classes[index], dtype=torch.int64))
    return pool.subset(torch.nonzero(~held_out).flatten()), pool.subset(torch.nonzero(held_out).flatten())
