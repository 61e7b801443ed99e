"""Plugin discovery: built-in losses, the ``tripletlab.losses`` entry-point group, and modules or
``.py`` files named by ``--plugin`` or ``TRIPLETLAB_PLUGINS``.

A plugin that fails to import is reported on stderr, naming it and its error, and issued as a
:class:`PluginWarning` for code that records or escalates warnings (the stderr line is the report,
so warning filters such as ``PYTHONWARNINGS=ignore`` cannot hide it); every other loss keeps
working (as MLflow's plugin loader does).
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import re
import sys
import warnings
from importlib.metadata import entry_points
from pathlib import Path

from . import registry

ENTRY_POINT_GROUP = "tripletlab.losses"
ENV_VAR = "TRIPLETLAB_PLUGINS"

BUILTIN_MODULES = (
    "losses.triplet",
    "losses.batch_hard",
    "losses.semi_hard",
    "losses.multi_similarity",
    "losses.circle",
    "losses.cross_modal",
    "losses.triplet_center",
)

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


def _import_as(source: str, fn) -> bool:
    previous = registry._current_source
    registry._current_source = source
    try:
        fn()
        return True
    except Exception as exc:  # a broken plugin must not take down the others
        _report(f"tripletlab plugin {source!r} failed to load and was skipped: {type(exc).__name__}: {exc}")
        return False
    finally:
        registry._current_source = previous


def _load_builtins() -> None:
    for module in BUILTIN_MODULES:
        importlib.import_module(module)


def load_entry_points() -> None:
    """Load every installed distribution's ``tripletlab.losses`` entry point, once."""
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        label = f"entry point {ep.name} ({ep.value})"
        if ep.value not in _loaded:
            _loaded.add(ep.value)
            _import_as(label, ep.load)


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
    """Load the plugins named explicitly plus those in ``TRIPLETLAB_PLUGINS`` (``:`` or ``,`` separated)."""
    registry._ensure_loaded()
    from_env = [s for s in re.split(r"[,%s]" % re.escape(os.pathsep), os.environ.get(ENV_VAR, "")) if s.strip()]
    for spec in [*from_env, *specs]:
        load_plugin(spec)


_load_builtins()
