"""The search space of one loss: its declared hyperparameters plus the sweep's shared parameters.

Each loss declares a default search range per hyperparameter (``HyperParam.search``: ``(low, high)``
for numbers, sampled on a log scale when ``log``; a tuple of values for categoricals; ``None`` =
fixed at the default). A sweep config may narrow or fix any of them (``loss_overrides``) and add
shared training parameters (``search``), written as

- ``{low: 0.1, high: 0.5}`` (optionally ``log: true``, ``step: ...``): a numeric range,
- ``[hard-triplets, semi-hard-triplets]``: categorical choices,
- a plain value: fixed, not tuned.

Optuna parameters are named by their experiment config key (``loss.margin``, ``optimizer.lr``), so
a trial's parameters apply to the experiment config as they are.

A loss parameter declared with a condition (``HyperParam.when``, e.g. Multi-Similarity's ``epsilon``
only with ``miner=True``) is sampled only in trials where the condition holds on the values already
chosen (sampled, fixed or default); elsewhere it is absent from the trial and stays at its default.
A condition that the fixed values make false for every trial drops the parameter from the space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import optuna

from losses import HyperParam, loss_info


@dataclass(frozen=True)
class Dimension:
    """One tuned parameter: a numeric range (``kind`` ``float``/``int``) or categorical ``choices``,
    sampled only where each ``(key, allowed values)`` pair of ``when`` holds."""

    key: str
    kind: str  # "float" | "int" | "categorical"
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = None
    choices: tuple | None = None
    when: tuple[tuple[str, tuple], ...] = ()

    def applies(self, values: dict[str, Any]) -> bool:
        """Whether the condition holds on the config ``values`` chosen so far."""
        return all(values[key] in allowed for key, allowed in self.when)

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "categorical":
            return trial.suggest_categorical(self.key, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(
                self.key, int(self.low), int(self.high), log=self.log, step=int(self.step or 1)
            )
        return trial.suggest_float(self.key, self.low, self.high, log=self.log, step=self.step)

    def describe(self) -> str:
        if self.kind == "categorical":
            text = "{" + ", ".join(map(str, self.choices)) + "}"
        else:
            text = f"[{self.low:g}, {self.high:g}]{' log' if self.log else ''}"
        conditions = [
            f"{key}={allowed[0]}" if len(allowed) == 1 else f"{key} in {{{', '.join(map(str, allowed))}}}"
            for key, allowed in self.when
        ]
        return f"{text} when {' and '.join(conditions)}" if conditions else text


@dataclass(frozen=True)
class SearchSpace:
    """What a trial of one loss tunes (``dimensions``) and what it keeps fixed (``fixed``);
    ``defaults`` are the loss parameters' declared defaults, which conditions read when a parameter
    is neither tuned nor fixed."""

    loss: str
    dimensions: tuple[Dimension, ...]
    fixed: dict[str, Any]
    defaults: dict[str, Any] = field(default_factory=dict)

    def suggest(self, trial: optuna.Trial) -> dict[str, Any]:
        """Config values for ``trial``: ``loss.name``, the fixed values and one sample per dimension
        whose condition holds (dimensions come after the parameters their conditions name)."""
        values = {"loss.name": self.loss, **self.fixed}
        for d in self.dimensions:
            if d.applies({**self.defaults, **values}):
                values[d.key] = d.suggest(trial)
        return values

    def describe(self) -> dict[str, str]:
        out = {d.key: d.describe() for d in self.dimensions}
        out.update({k: f"fixed {v!r}" for k, v in self.fixed.items()})
        return out


def _number(value: Any, where: str) -> float:
    """A YAML number; strings like ``1e-4`` (which YAML 1.1 reads as text) are accepted too."""
    if isinstance(value, bool):
        raise ValueError(f"{where} must be a number, got {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} must be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{where} must be a finite number, got {value!r}")
    return number


def _range(key: str, spec: dict, kind: str, log: bool) -> Dimension:
    unknown = sorted(set(spec) - {"low", "high", "log", "step"})
    if unknown or "low" not in spec or "high" not in spec:
        raise ValueError(
            f"search range for {key!r} must be {{low: ..., high: ..., log: true|false, "
            f"step: ...}}, got {spec!r}"
        )
    low, high = _number(spec["low"], f"{key}.low"), _number(spec["high"], f"{key}.high")
    log = bool(spec.get("log", log))
    step = _number(spec["step"], f"{key}.step") if spec.get("step") is not None else None
    if not low < high:
        raise ValueError(
            f"search range for {key!r} needs low < high, got low={low:g}, high={high:g}; "
            "to fix the value, give it without a range"
        )
    if log and low <= 0:
        raise ValueError(f"search range for {key!r} is log-scaled, so low must be > 0, got {low:g}")
    if log and step is not None:
        raise ValueError(f"search range for {key!r}: Optuna cannot combine log: true with a step")
    if kind == "int":
        if low != int(low) or high != int(high):
            raise ValueError(f"{key!r} is an integer parameter; its range needs integer bounds, got {spec!r}")
        return Dimension(key, "int", int(low), int(high), log, int(step) if step else None)
    return Dimension(key, "float", low, high, log, step)


def _declared(param: HyperParam, key: str) -> Dimension | None:
    if param.search is None:
        return None
    if param.choices is not None or param.type in (bool, str):
        return Dimension(key, "categorical", choices=tuple(param.search))
    low, high = param.search
    return _range(key, {"low": low, "high": high}, "int" if param.type is int else "float", param.log)


def _loss_dimension(loss: str, param: HyperParam, spec: Any) -> tuple[Dimension | None, Any]:
    """(dimension, None) when tuned, (None, value) when fixed by the override ``spec``."""
    key = f"loss.{param.name}"
    numeric = param.type in (int, float) and param.choices is None
    if isinstance(spec, dict):
        if not numeric:
            raise ValueError(
                f"loss_overrides.{loss}.{param.name} is categorical: give a list of choices "
                f"from {param.valid_range()} or one fixed value, not a range"
            )
        dim = _range(key, spec, "int" if param.type is int else "float", param.log)
        param.validate(dim.low, loss), param.validate(dim.high, loss)
        return dim, None
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError(f"loss_overrides.{loss}.{param.name} lists no choices")
        choices = tuple(param.validate(v, loss) for v in spec)
        if len(choices) == 1:
            return None, choices[0]
        return Dimension(key, "categorical", choices=choices), None
    return None, param.validate(spec, loss)


def build_space(
    loss: str, search: dict[str, Any] | None = None, overrides: dict[str, Any] | None = None
) -> SearchSpace:
    """The search space of ``loss`` from its declaration, the shared ``search`` and its ``overrides``.

    ``overrides`` keys without a dot are the loss's own parameters; dotted keys (``optimizer.lr``)
    replace a shared ``search`` entry, or add one, for this loss only.
    Raises ``ValueError`` naming the parameter for an unknown name or a value outside its valid range.
    """
    info = loss_info(loss)
    search = {**(search or {}), **{k: v for k, v in (overrides or {}).items() if "." in k}}
    overrides = {k: v for k, v in (overrides or {}).items() if "." not in k}
    declared = {p.name: p for p in info.params}
    unknown = sorted(set(overrides) - set(declared))
    if unknown:
        valid = ", ".join(f"{p.name} {p.valid_range()}" for p in info.params) or "none"
        raise ValueError(
            f"loss_overrides.{loss} names unknown parameter(s) {', '.join(unknown)}; valid: {valid}"
        )
    dimensions: list[Dimension] = []
    fixed: dict[str, Any] = {}
    defaults = {f"loss.{p.name}": p.default for p in info.params}
    for param in info.params:
        if param.name in overrides:
            dim, value = _loss_dimension(loss, param, overrides[param.name])
            if dim is None:
                fixed[f"loss.{param.name}"] = value
                continue
        else:
            dim = _declared(param, f"loss.{param.name}")
        if dim is None:
            continue
        tuned = {d.key for d in dimensions}
        when = tuple((f"loss.{name}", allowed) for name, allowed in param.when)
        if all(key not in tuned for key, _ in when):  # decided by fixed and default values alone
            if not all({**defaults, **fixed}[key] in allowed for key, allowed in when):
                continue
            when = ()
        dimensions.append(replace(dim, when=when))
    for key, spec in search.items():
        if key == "loss" or key.startswith("loss."):
            raise ValueError(
                f"search key {key!r}: tune loss parameters under loss_overrides.<loss>.<param>, "
                "shared search keys are experiment keys such as optimizer.lr"
            )
        if isinstance(spec, dict):
            ints = all(
                isinstance(spec.get(b), int) and not isinstance(spec.get(b), bool) for b in ("low", "high")
            )
            dimensions.append(_range(key, spec, "int" if ints else "float", False))
        elif isinstance(spec, (list, tuple)) and len(spec) > 1:
            dimensions.append(Dimension(key, "categorical", choices=tuple(spec)))
        else:
            fixed[key] = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    return SearchSpace(loss, tuple(dimensions), fixed, defaults)
