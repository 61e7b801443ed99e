"""Sweep configuration: which losses to compare, with what budget, on which shared settings.

A sweep config is YAML (see ``sweeps/configs/``)::

    name: digits                  # MLflow experiment, Optuna study prefix, runs/<name>/
    losses: [triplet, circle]     # default: every built-in loss that is not cross-modal
    trials: 12                    # Optuna trials per loss (the same budget for every loss)
    seeds: 3                      # final retrains of each loss's best configuration
    folds: 1                      # > 1: class-disjoint cross-validation, one model per fold (4 in the paper)
    pruner: {name: median}        # median | hyperband | threshold | wilcoxon | none (+ the pruner's options)
    search:                       # shared parameters tuned for every loss
      optimizer.lr: {low: 1.0e-4, high: 1.0e-2, log: true}
    loss_overrides:               # narrow or fix one loss's space; dotted keys set its training
      triplet: {margin: {low: 0.1, high: 0.5}, mining: [hard-triplets, semi-hard-triplets],
                optimizer.lr: 1.0e-3}
    experiment:                   # the shared training settings (an experiment config)
      dataset: {name: digits}
      epochs: 4

``key=value`` overrides (YAML-typed) change any of it: ``trials=4 seeds=2 losses=[triplet,circle]``;
keys that are not sweep keys are experiment keys (``epochs=1``, ``batch.p=8``).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments.config import SECTIONS as EXPERIMENT_SECTIONS
from experiments.config import from_dict as experiment_from_dict
from experiments.config import parse_override, read_yaml_mapping, resolve_config_path

from .space import build_space

CONFIG_DIR = Path(__file__).parent / "configs"
PRUNERS = ("median", "hyperband", "threshold", "wilcoxon", "none")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


def default_losses() -> tuple[str, ...]:
    """Every built-in loss that trains on one modality (the Reality Check comparison set)."""
    from losses import list_losses, loss_info

    return tuple(
        n for n in list_losses() if loss_info(n).source == "tripletlab" and not loss_info(n).cross_modal
    )


@dataclass
class SweepConfig:
    """A resolved sweep: see the module docstring for the meaning of each field."""

    name: str
    losses: tuple[str, ...] = ()
    trials: int = 20
    seeds: int = 3
    seed: int = 0  # seeds the sampler and every tuning run; final seeds are seed+1 .. seed+seeds
    folds: int = 1  # class-disjoint cross-validation folds of the training classes (dealt by seed); 1 = none
    pruner: dict[str, Any] = field(default_factory=lambda: {"name": "median"})
    sampler: dict[str, Any] = field(default_factory=dict)  # TPESampler options, e.g. n_startup_trials
    search: dict[str, Any] = field(default_factory=dict)
    loss_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    experiment: dict[str, Any] = field(default_factory=dict)
    plugins: tuple[str, ...] = ()
    trials_per_gpu: int = 2
    heartbeat_interval: int = 60  # seconds between heartbeats of a running trial
    grace_period: int = 600  # a running trial silent this long is stale: failed and retried

    @property
    def final_seeds(self) -> list[int]:
        return [self.seed + 1 + i for i in range(self.seeds)]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["losses"] = list(self.losses)
        out["plugins"] = list(self.plugins)
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SWEEP_KEYS = tuple(f.name for f in dataclasses.fields(SweepConfig))


def _set_nested(tree: dict, dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for part in parents:
        child = tree.setdefault(part, {})
        if not isinstance(child, dict):
            raise ValueError(f"cannot set {dotted!r}: {part!r} holds {child!r}, not a section")
        tree = child
    tree[leaf] = value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """The raw sweep dict with ``key=value`` overrides applied.

    ``search.<config key>`` sets one shared search range, ``loss_overrides.<loss>.<key>`` one loss
    parameter (or, for a dotted key, a training setting of that loss), ``pruner.<option>``,
    ``sampler.<option>`` or ``experiment.<key>`` a nested option; any other non-sweep key is an
    experiment key (``epochs=1`` means ``experiment.epochs=1``).
    """
    out = copy.deepcopy(values)
    for item in overrides:
        key, value = parse_override(item, "trials=4 or losses=[triplet,circle]")
        head, _, rest = key.partition(".")
        if not rest and head in SWEEP_KEYS:
            out[head] = value
        elif head == "search" and rest:
            out["search"] = {**(out.get("search") or {}), rest: value}
        elif head == "loss_overrides" and "." in rest:
            loss, _, param = rest.partition(".")
            out["loss_overrides"] = overrides = dict(out.get("loss_overrides") or {})
            overrides[loss] = {**(overrides.get(loss) or {}), param: value}
        elif head in ("pruner", "sampler", "experiment") and rest:
            section = out.get(head)
            if head == "pruner" and isinstance(section, str):
                section = {"name": section}
            out[head] = section = dict(section or {})
            _set_nested(section, rest, value)
        elif head in SWEEP_KEYS:
            raise ValueError(
                f"override {item!r}: {head!r} takes a whole value, e.g. {head}=..., not {key}=..."
            )
        elif head not in EXPERIMENT_SECTIONS:
            close = difflib.get_close_matches(head, [*SWEEP_KEYS, *EXPERIMENT_SECTIONS], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(
                f"override {item!r}: {head!r} is neither a sweep key nor an experiment "
                f"key{hint}. Sweep keys: {', '.join(SWEEP_KEYS)}; experiment keys start with "
                f"{', '.join(EXPERIMENT_SECTIONS)}"
            )
        else:
            _set_nested(out.setdefault("experiment", {}), key, value)
    return out


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _as_int(values: dict, key: str, default: int, minimum: int) -> int:
    value = values.get(key, default)
    _check(
        isinstance(value, int) and not isinstance(value, bool) and value >= minimum,
        f"sweep key {key!r} must be an integer >= {minimum}, got {value!r}",
    )
    return value


def _pruner(value: Any) -> dict[str, Any]:
    pruner = {"name": value} if isinstance(value, str) or value is None else value
    _check(
        isinstance(pruner, dict), f"sweep key 'pruner' must be a name or a mapping with 'name', got {value!r}"
    )
    pruner = dict(pruner)
    pruner["name"] = str(pruner.get("name") or "none").lower()
    _check(pruner["name"] in PRUNERS, f"pruner must be one of {', '.join(PRUNERS)}, got {pruner['name']!r}")
    return pruner


def sweep_from_dict(values: dict[str, Any], default_name: str = "") -> SweepConfig:
    """A validated :class:`SweepConfig` from the raw (YAML) dict; loss names checked in the registry."""
    from losses import loss_info

    _check(isinstance(values, dict), f"a sweep config must be a mapping of keys, got {type(values).__name__}")
    unknown = sorted(set(values) - set(SWEEP_KEYS))
    if unknown:
        close = {k: difflib.get_close_matches(k, SWEEP_KEYS, n=1) for k in unknown}
        hints = "; ".join(f"{k!r} (did you mean {c[0]!r}?)" if c else repr(k) for k, c in close.items())
        raise ValueError(f"unknown sweep key(s) {hints}. Valid keys: {', '.join(SWEEP_KEYS)}")
    name = str(values.get("name") or default_name)
    _check(
        bool(_NAME_PATTERN.match(name)),
        f"sweep name {name!r} must be letters, digits, '_', '-' or '.' "
        "(it names runs/<name>/ and the MLflow experiment)",
    )
    plugins = values.get("plugins") or []
    _check(
        isinstance(plugins, list) and all(isinstance(p, str) for p in plugins),
        f"sweep key 'plugins' must be a list of module names or .py files, got {plugins!r}",
    )
    if plugins:
        from losses import load_plugins

        load_plugins(plugins)
    losses = values.get("losses") or list(default_losses())
    if isinstance(losses, str):
        losses = [s.strip() for s in losses.split(",") if s.strip()]
    _check(
        isinstance(losses, list) and all(isinstance(n, str) for n in losses),
        f"sweep key 'losses' must be a list of loss names, got {losses!r}",
    )
    _check(len(set(losses)) == len(losses), f"sweep key 'losses' names a loss twice: {losses}")
    for loss in losses:
        loss_info(loss)  # unknown names raise a ValueError listing the registered losses
    search = values.get("search") or {}
    _check(isinstance(search, dict), f"sweep key 'search' must map config keys to ranges, got {search!r}")
    overrides = values.get("loss_overrides") or {}
    _check(
        isinstance(overrides, dict) and all(isinstance(v, dict) for v in overrides.values()),
        "sweep key 'loss_overrides' must map loss names to {param: range, choices or value}",
    )
    stray = sorted(set(overrides) - set(losses))
    _check(
        not stray, f"loss_overrides names loss(es) {stray} that the sweep does not compare; losses: {losses}"
    )
    experiment = values.get("experiment") or {}
    _check(
        isinstance(experiment, dict),
        f"sweep key 'experiment' must be an experiment config mapping, got {experiment!r}",
    )
    _check(
        "loss" not in experiment,
        "the sweep's experiment settings must not set 'loss': the sweep picks the loss; "
        "fix or narrow loss parameters under loss_overrides: {<loss>: {<param>: ...}}",
    )
    experiment_from_dict(experiment)  # unknown or invalid experiment keys fail here, naming the key
    sampler = values.get("sampler") or {}
    _check(
        isinstance(sampler, dict),
        f"sweep key 'sampler' must map TPESampler options to values, got {sampler!r}",
    )
    cfg = SweepConfig(
        name=name,
        losses=tuple(losses),
        trials=_as_int(values, "trials", 20, 1),
        seeds=_as_int(values, "seeds", 3, 1),
        seed=_as_int(values, "seed", 0, 0),
        folds=_as_int(values, "folds", 1, 1),
        pruner=_pruner(values.get("pruner", "median")),
        sampler=dict(sampler),
        search=dict(search),
        loss_overrides={k: dict(v) for k, v in overrides.items()},
        experiment=copy.deepcopy(experiment),
        plugins=tuple(plugins),
        trials_per_gpu=_as_int(values, "trials_per_gpu", 2, 1),
        heartbeat_interval=_as_int(values, "heartbeat_interval", 60, 1),
        grace_period=_as_int(values, "grace_period", 600, 1),
    )
    _check(
        cfg.pruner["name"] != "wilcoxon" or cfg.folds > 1,
        "pruner wilcoxon compares a trial with the best one fold by fold, so it needs folds >= 2 "
        "(e.g. folds=4); with folds=1 choose median, hyperband, threshold or none",
    )
    _check(
        cfg.grace_period > cfg.heartbeat_interval,
        f"grace_period ({cfg.grace_period}s) must exceed heartbeat_interval ({cfg.heartbeat_interval}s)",
    )
    for loss in cfg.losses:
        build_space(loss, cfg.search, cfg.loss_overrides.get(loss))  # bad ranges fail here, before any run
    return cfg


def load_sweep_config(path: str | None, overrides: list[str] | None = None) -> SweepConfig:
    """The sweep config from a YAML file (or only overrides) with ``key=value`` overrides applied."""
    values: dict[str, Any] = {}
    default_name = ""
    if path is not None:
        resolved = resolve_config_path(path, CONFIG_DIR, "sweep config")
        default_name = resolved.stem
        values = read_yaml_mapping(resolved, "sweep config")
    return sweep_from_dict(apply_overrides(values, overrides or []), default_name)
