"""Hyperparameter declarations shared by the registry, the CLI, config validation and sweeps.

A loss declares each hyperparameter once, as a :class:`HyperParam` in its class attribute
``hyperparams``. Everything else (``build_loss`` validation, ``tripletlab losses``, the config
checker and the Optuna search space) reads that declaration.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class HyperParam:
    """One declared hyperparameter.

    ``low``/``high`` bound the *valid* range (inclusive unless ``low_open``/``high_open``);
    ``choices`` enumerates the valid values of a categorical. ``search`` is the default range a
    sweep explores: a ``(low, high)`` pair for numbers, a tuple of values for categoricals, or
    ``None`` to keep the parameter fixed at its default. ``log`` samples a numeric search range on
    a log scale.
    """

    name: str
    type: type
    default: Any
    doc: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    search: tuple | None = None
    log: bool = False

    def valid_range(self) -> str:
        """The valid range in words, for error messages and the CLI table."""
        if self.choices is not None:
            return "{" + ", ".join(map(str, self.choices)) + "}"
        if self.type is bool:
            return "{True, False}"
        if self.low is None and self.high is None:
            return "any"
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        return f"{'(' if self.low_open or self.low is None else '['}{lo}, {hi}{')' if self.high_open or self.high is None else ']'}"

    def search_range(self) -> str:
        if self.search is None:
            return "fixed"
        if self.type in (int, float) and self.choices is None:
            return f"[{self.search[0]:g}, {self.search[1]:g}]{' log' if self.log else ''}"
        return "{" + ", ".join(map(str, self.search)) + "}"

    def validate(self, value: Any, loss_name: str = "") -> Any:
        """Return ``value`` coerced to the declared type, or raise ``ValueError`` naming the fix."""
        where = f"{loss_name}.{self.name}" if loss_name else self.name
        if self.type is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false"):
                return value.lower() == "true"
            raise ValueError(f"{where} must be a bool (true/false), got {value!r}")
        if self.type is int:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError(f"{where} must be an int in {self.valid_range()}, got {value!r}")
            try:
                value = int(value)
            except ValueError:
                raise ValueError(f"{where} must be an int in {self.valid_range()}, got {value!r}") from None
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError(f"{where} must be a number in {self.valid_range()}, got {value!r}")
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{where} must be a number in {self.valid_range()}, got {value!r}") from None
            if math.isnan(value):
                raise ValueError(f"{where} must be a number in {self.valid_range()}, got nan")
        elif self.type is str and not isinstance(value, str):
            raise ValueError(f"{where} must be one of {self.valid_range()}, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"{where} must be one of {self.valid_range()}, got {value!r}")
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise ValueError(f"{where} must be in {self.valid_range()}, got {value!r}")
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise ValueError(f"{where} must be in {self.valid_range()}, got {value!r}")
        return value


DISTANCES = ("euclidean", "squared_euclidean", "cosine")


def distance_params(default: str = "euclidean", normalize: bool = True, search: bool = True) -> tuple[HyperParam, ...]:
    """The distance and L2-normalisation options every distance-based loss shares."""
    return (
        HyperParam("distance", str, default, "pairwise distance", choices=DISTANCES,
                   search=DISTANCES if search else None),
        HyperParam("normalize", bool, normalize, "L2-normalise embeddings first",
                   search=(True, False) if search else None),
    )


def margin_param(default: float, search: tuple[float, float] = (0.01, 1.0), high: float = 10.0) -> HyperParam:
    return HyperParam("margin", float, default, "triplet margin m", low=0.0, high=high, search=search)
