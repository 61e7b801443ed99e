"""Hyperparameter declarations shared by the registry, the CLI, config validation and sweeps.

A loss declares each hyperparameter once, as a :class:`HyperParam` in its class attribute
``hyperparams``; its default value lives in one place, the loss's ``__init__`` signature, and
:func:`losses.registry.register_loss` copies it into the declaration (a declaration that states a
default must state the same one). Everything else (``build_loss`` validation, ``tripletlab losses``,
the config checker and the Optuna search space) reads that declaration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping


class _FromInit:
    """The default of a :class:`HyperParam` that takes its value from the loss's ``__init__``."""

    def __repr__(self) -> str:
        return "FROM_INIT"


FROM_INIT: Any = _FromInit()


def from_init(default: Any) -> bool:
    """Whether a declared default is :data:`FROM_INIT` (to be taken from the loss's ``__init__``)."""
    return isinstance(default, _FromInit)


def _format(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class HyperParam:
    """One declared hyperparameter.

    ``default`` is filled in from the loss's ``__init__`` at registration (leave it out).
    ``low``/``high`` bound the *valid* range (inclusive unless ``low_open``/``high_open``);
    ``choices`` enumerates the valid values of a categorical. ``search`` is the default range a
    sweep explores: a ``(low, high)`` pair for numbers, a tuple of values for categoricals, or
    ``None`` to keep the parameter fixed at its default. ``log`` samples a numeric search range on
    a log scale.

    ``when`` makes the parameter conditional on other parameters of the same loss, declared before
    it: ``{"miner": True}`` or ``{"distance": ("euclidean", "squared_euclidean")}`` (one value or a
    tuple of the values allowed). Where the condition is false the parameter has no effect: a sweep
    does not sample it and it stays at its default. Stored as a tuple of ``(name, values)`` pairs.
    """

    name: str
    type: type
    default: Any = FROM_INIT
    doc: str = ""
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple | None = None
    search: tuple | None = None
    log: bool = False
    when: Any = ()

    def __post_init__(self) -> None:
        when = self.when.items() if isinstance(self.when, Mapping) else self.when
        normalised = tuple((name, tuple(v) if isinstance(v, (tuple, list)) else (v,)) for name, v in when)
        object.__setattr__(self, "when", normalised)

    def applies(self, values: Mapping[str, Any]) -> bool:
        """Whether the parameter has an effect given the loss's other parameter ``values``."""
        return all(values[name] in allowed for name, allowed in self.when)

    def condition(self) -> str:
        """``when`` in words (empty when unconditional), for the CLI table and sweep descriptions."""
        parts = [
            f"{name}={_format(allowed[0])}"
            if len(allowed) == 1
            else f"{name} in {{{', '.join(map(_format, allowed))}}}"
            for name, allowed in self.when
        ]
        return " and ".join(parts)

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
        opening = "(" if self.low_open or self.low is None else "["
        closing = ")" if self.high_open or self.high is None else "]"
        return f"{opening}{lo}, {hi}{closing}"

    def search_range(self) -> str:
        """The default search range in words, with the condition under which it is sampled."""
        if self.search is None:
            return f"fixed (has an effect when {self.condition()})" if self.when else "fixed"
        if self.type in (int, float) and self.choices is None:
            searched = f"[{self.search[0]:g}, {self.search[1]:g}]{' log' if self.log else ''}"
        else:
            searched = "{" + ", ".join(map(str, self.search)) + "}"
        return f"{searched} when {self.condition()}" if self.when else searched

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


def distance_params(search: bool = True) -> tuple[HyperParam, ...]:
    """The distance and L2-normalisation options every distance-based loss shares; ``normalize``
    matters only for the euclidean distances (cosine always normalises)."""
    return (
        HyperParam(
            "distance", str, doc="pairwise distance", choices=DISTANCES, search=DISTANCES if search else None
        ),
        HyperParam(
            "normalize",
            bool,
            doc="L2-normalise embeddings first (cosine always does)",
            search=(True, False) if search else None,
            when={"distance": ("euclidean", "squared_euclidean")},
        ),
    )


def margin_param(search: tuple[float, float] = (0.01, 1.0), high: float = 10.0) -> HyperParam:
    return HyperParam("margin", float, doc="triplet margin m", low=0.0, high=high, search=search)
