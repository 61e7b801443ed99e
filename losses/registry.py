"""The loss registry: ``register_loss``, ``build_loss``, ``list_losses``, ``loss_info``, and plugin
discovery (``load_plugins``).

Modelled on timm's model registry (wildcard listing, helpful unknown-name errors) but a
duplicate name is refused unless ``overwrite=True``. This module imports no loss: the built-in losses
register themselves when the ``losses`` package imports them, and name prefixes such as ``pml:`` are
resolved by the function registered for them with :func:`register_resolver`.

Plugins add losses through the same decorator, from three places: the ``tripletlab.losses``
entry-point group of installed distributions (loaded on the first listing or look-up), and modules or
``.py`` files named by ``--plugin`` or ``TRIPLETLAB_PLUGINS`` (:func:`load_plugins`). A plugin that
fails to load is reported on stderr, naming it and its error, and issued as a :class:`PluginWarning`
for code that records or escalates warnings (the stderr line is the report, so warning filters such
as ``PYTHONWARNINGS=ignore`` cannot hide it); every other loss keeps working (as MLflow's plugin
loader does).
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import importlib.util
import inspect
import os
import re
import sys
import warnings
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, Callable, Iterator

from torch import nn

from .base import MetricLoss
from .params import HyperParam, from_init

ENTRY_POINT_GROUP = "tripletlab.losses"
ENV_VAR = "TRIPLETLAB_PLUGINS"


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
_RESOLVERS: dict[str, tuple[Callable[[str], LossInfo], str]] = {}
_source = ["tripletlab"]  # who is registering now: the innermost registering_as()


@contextlib.contextmanager
def registering_as(source: str) -> Iterator[None]:
    """Losses registered inside this block are recorded as coming from ``source`` (a plugin)."""
    _source.append(source)
    try:
        yield
    finally:
        _source.pop()


def register_resolver(prefix: str, resolve: Callable[[str], LossInfo], description: str) -> None:
    """Names starting with ``prefix`` (e.g. ``"pml:"``) are looked up as ``resolve(rest_of_name)``;
    ``description`` completes the unknown-name error's "or '<prefix><ClassName>' for ..."."""
    _RESOLVERS[prefix] = (resolve, description)


def declared_params(name: str, cls: type) -> tuple[HyperParam, ...]:
    """``cls.hyperparams`` with each default taken from ``cls.__init__``'s signature, checked.

    Raises ``ValueError`` for a parameter ``__init__`` does not take, one without a default in
    either place, a declared default that differs from the signature's, or a ``when`` condition
    naming a parameter not declared before it or a value that parameter cannot take.
    """
    signature = inspect.signature(cls.__init__).parameters
    open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.values())
    params: list[HyperParam] = []
    for p in cls.hyperparams:
        arg = signature.get(p.name)
        if arg is None and not open_ended:
            raise ValueError(
                f"loss {name!r} declares hyperparameter {p.name!r} but {cls.__name__}.__init__ "
                f"does not take it"
            )
        init_default = inspect.Parameter.empty if arg is None else arg.default
        if from_init(p.default):
            if init_default is inspect.Parameter.empty:
                raise ValueError(f"loss {name!r}: give {p.name!r} a default in {cls.__name__}.__init__")
            p = replace(p, default=init_default)
        elif init_default is not inspect.Parameter.empty and p.default != init_default:
            raise ValueError(
                f"loss {name!r}: hyperparameter {p.name!r} declares default {p.default!r} but "
                f"{cls.__name__}.__init__ has {init_default!r}; declare it once, in __init__"
            )
        earlier = {q.name: q for q in params}
        for other, allowed in p.when:
            if other not in earlier:
                raise ValueError(
                    f"loss {name!r}: {p.name!r} is conditioned on {other!r}, which must be a "
                    f"hyperparameter declared before it"
                )
            for value in allowed:
                earlier[other].validate(value, name)
        params.append(p)
    names = [p.name for p in params]
    if len(set(names)) != len(names):
        raise ValueError(f"loss {name!r} declares a hyperparameter twice: {names}")
    return tuple(params)


def register_loss(name: str, overwrite: bool = False) -> Callable[[type], type]:
    """Class decorator adding a :class:`~losses.base.MetricLoss` subclass to the registry.

    The declared hyperparameters get their defaults from the class's ``__init__`` (see
    :func:`declared_params`); the filled-in declaration replaces ``cls.hyperparams``.
    """

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, MetricLoss)):
            raise TypeError(f"register_loss({name!r}) decorates MetricLoss subclasses, got {cls!r}")
        if not name or any(c.isspace() for c in name) or any(name.startswith(p) for p in _RESOLVERS):
            raise ValueError(
                f"invalid loss name {name!r}: use a non-empty name without spaces or a "
                f"reserved prefix ({', '.join(map(repr, _RESOLVERS))})"
            )
        if name in _REGISTRY and not overwrite:
            raise ValueError(
                f"loss {name!r} is already registered (by {_REGISTRY[name].source}); "
                f"pick another name or pass register_loss({name!r}, overwrite=True)"
            )
        cls.hyperparams = declared_params(name, cls)
        doc = inspect.getdoc(cls) or ""
        _REGISTRY[name] = LossInfo(
            name, cls, cls.hyperparams, cls.paper, doc.split("\n")[0], cls.cross_modal, _source[-1]
        )
        return cls

    return decorator


def list_losses(pattern: str = "*") -> list[str]:
    """Registered loss names matching a shell-style wildcard, sorted."""
    load_entry_points()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatchcase(n, pattern))


def _unknown(name: str) -> ValueError:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    prefixes = "".join(f"; or '{prefix}<ClassName>' for {what}" for prefix, (_, what) in _RESOLVERS.items())
    return ValueError(f"unknown loss {name!r}.{hint} Available: {', '.join(sorted(_REGISTRY))}{prefixes}.")


def loss_info(name: str) -> LossInfo:
    """The declaration of a registered loss (or of a prefixed name such as ``pml:<ClassName>``)."""
    load_entry_points()
    for prefix, (resolve, _) in _RESOLVERS.items():
        if name.startswith(prefix):
            return resolve(name[len(prefix) :])
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


# ---------------------------------------------------------------------------------------- plugins

_loaded: set[str] = set()
_entry_points_loaded = False


class PluginWarning(UserWarning):
    """A plugin could not be loaded; the other losses are unaffected."""


# The stderr line of _report is what users see; shown as well, the warning would repeat it. Appended,
# so any filter a user or test sets (PYTHONWARNINGS=error, pytest.warns) still takes precedence.
warnings.filterwarnings("ignore", category=PluginWarning, append=True)


def _report(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)
    warnings.warn(message, PluginWarning, stacklevel=4)


def _import_as(source: str, load: Callable[[], object]) -> bool:
    with registering_as(source):
        try:
            load()
            return True
        except Exception as exc:  # a broken plugin must not take down the others
            _report(
                f"tripletlab plugin {source!r} failed to load and was skipped: {type(exc).__name__}: {exc}"
            )
            return False


def load_entry_points() -> None:
    """Load every installed distribution's ``tripletlab.losses`` entry point, once."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.value not in _loaded:
            _loaded.add(ep.value)
            _import_as(f"entry point {ep.name} ({ep.value})", ep.load)


def _import_file(path: Path) -> None:
    module_name = "tripletlab_plugin_" + re.sub(r"\W", "_", str(path.resolve()))
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise


def load_plugin(spec: str) -> bool:
    """Load one plugin: a ``.py`` file path or an importable module name. Returns success."""
    spec = spec.strip()
    if not spec or spec in _loaded:
        return bool(spec)
    _loaded.add(spec)
    path = Path(spec)
    if spec.endswith(".py"):
        if not path.is_file():
            _report(f"tripletlab plugin {spec!r} failed to load and was skipped: no such file")
            return False
        return _import_as(spec, lambda: _import_file(path))
    return _import_as(spec, lambda: importlib.import_module(spec))


def load_plugins(specs=()) -> None:
    """Load the installed entry points, then the plugins in ``TRIPLETLAB_PLUGINS`` (``:`` or ``,``
    separated) and those named in ``specs``."""
    load_entry_points()
    from_env = [
        s for s in re.split(r"[,%s]" % re.escape(os.pathsep), os.environ.get(ENV_VAR, "")) if s.strip()
    ]
    for spec in [*from_env, *specs]:
        load_plugin(spec)
