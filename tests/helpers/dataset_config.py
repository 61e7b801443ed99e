"""A dataset config as the trainer passes it to the loaders: an object with attributes."""

from __future__ import annotations

from types import SimpleNamespace

DEFAULTS = {
    "name": "digits",
    "path": "",
    "split": "class-disjoint",
    "val_fraction": 0.2,
    "image_size": 0,
    "max_per_class": 0,
}


def dataset_cfg(**values) -> SimpleNamespace:
    """``DEFAULTS`` with ``values`` on top."""
    return SimpleNamespace(**{**DEFAULTS, **values})
