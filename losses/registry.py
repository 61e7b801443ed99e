"""The loss registry: ``register_loss``, ``build_loss``, ``list_losses``, ``loss_info``.

Modelled on timm's model registry (wildcard listing, helpful unknown-name errors) but a
duplicate name is refused unless ``overwrite=True``.
"""
from __future__ import annotations

import difflib
import fnmatch
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from .base import MetricLoss
from .params import HyperParam

PML_PREFIX = "pml:"


@dataclass(frozen=True)
class LossInfo:
    """What the registry knows of one loss: its class, declared hyperparameters and paper."""

    name: str
    cls: type
    params: tuple[HyperParam, ...]
    paper: str
    summary: str
    cross_modal: bool
    source: str

    def param(self, name: str) -> HyperParam:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def defaults(self) -> dict[str, Any]:
        return {p.name: p.default for p in self.params}


_REGISTRY: dict[str, LossInfo] = {}
_current_source = "tripletlab"


def register_loss(name: str, overwrite: bool = False) -> Callable[[type], type]:
    """Class decorator adding a :class:`~losses.base.MetricLoss` subclass to the registry."""

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, MetricLoss)):
            raise TypeError(f"register_loss({name!r}) decorates MetricLoss subclasses, got {cls!r}")
        if name.startswith(PML_PREFIX) or not name or any(c.isspace() for c in name):
            raise ValueError(f"invalid loss name {name!r}: use a non-empty name without spaces or the 'pml:' prefix")
        if name in _REGISTRY and not overwrite:
            raise ValueError(
                f"loss {name!r} is already registered (by {_REGISTRY[name].source}); "
                f"pick another name or pass register_loss({name!r}, overwrite=True)"
            )
        names = [p.name for p in cls.hyperparams]
        if len(set(names)) != len(names):
            raise ValueError(f"loss {name!r} declares a hyperparameter twice: {names}")
        doc = inspect.getdoc(cls) or ""
        _REGISTRY[name] = LossInfo(name, cls, tuple(cls.hyperparams), cls.paper, doc.split("\n")[0],
                                   cls.cross_modal, _current_source)
        return cls

    return decorator


def _ensure_loaded() -> None:
    from . import plugins  # noqa: F401  (built-ins and entry points register on import)

    plugins.load_entry_points()


def list_losses(pattern: str = "*") -> list[str]:
    """Registered loss names matching a shell-style wildcard, sorted."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    return ValueError(
        f"unknown loss {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}; "
        f"or 'pml:<ClassName>' for any pytorch-metric-learning loss."
    )


def loss_info(name: str) -> LossInfo:
    """The declaration of a registered loss (or of ``pml:<ClassName>``)."""
    _ensure_loaded()
    if name.startswith(PML_PREFIX):
        from .pml_adapter import pml_info

        return pml_info(name[len(PML_PREFIX):])
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name]


def validate_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Check ``params`` against the declaration; return the full, typed parameter dict."""
    info = loss_info(name)
    declared = {p.name: p for p in info.params}
    unknown = sorted(set(params) - set(declared))
    if unknown:
        valid = ", ".join(f"{p.name} {p.valid_range()}" for p in info.params) or "none"
        raise ValueError(f"unknown parameter(s) {', '.join(unknown)} for loss {name!r}; valid: {valid}")
    return {p.name: p.validate(params[p.name], name) if p.name in params else p.default for p in info.params}


def build_loss(name: str, **params: Any) -> nn.Module:
    """Build the loss ``name`` with validated hyperparameters (defaults for those not given)."""
    info = loss_info(name)
    return info.cls(**validate_params(name, params))
