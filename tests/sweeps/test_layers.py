"""The packages form layers, lowest first: losses < experiments < sweeps < analysis < tripletlab (the
CLI). A module imports only from its own package or lower ones: at the top of the file, inside a
function, or by a module name given to ``importlib.import_module`` / ``__import__``. The check reads
the source (every ``import`` statement and every such call with a literal name), so an import that
would only run on some code path is caught too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("losses", "experiments", "sweeps", "analysis", "tripletlab")
RANK = {package: rank for rank, package in enumerate(LAYERS)}
IMPORT_CALLS = {"import_module", "__import__"}


def _module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(module: str, path: Path, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """``(line, module)`` for every module the file names in an import, wherever it stands."""
    module = _module_name(path, root)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            found.append((node.lineno, _absolute(module, path, node)))
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            if name in IMPORT_CALLS:
                found.append((node.lineno, node.args[0].value))
    return found


def layer_violations(root: Path = ROOT) -> list[str]:
    out = []
    for package in LAYERS:
        for path in sorted((root / package).rglob("*.py")):
            for line, name in imported_modules(path, root):
                target = name.split(".")[0]
                if target in RANK and RANK[target] > RANK[package]:
                    out.append(f"{path.relative_to(root)}:{line} ({package}) imports {name} ({target})")
    return out


def test_no_package_imports_a_higher_layer():
    assert layer_violations() == []


def test_sweeps_never_imports_analysis():
    """The cycle this rule broke: sweeps' rerun command read experiments through analysis.load."""
    names = [name for path in (ROOT / "sweeps").rglob("*.py") for _, name in imported_modules(path)]
    assert not [name for name in names if name.split(".")[0] == "analysis"]


@pytest.mark.parametrize(
    "source, caught",
    [
        ("from analysis.load import find_experiment\n", True),
        ("def main():\n    from analysis import load\n", True),
        ("import importlib\nimportlib.import_module('analysis.load')\n", True),
        ("__import__('tripletlab.cli')\n", True),
        (
            "from experiments.config import load_config\nfrom . import table\n"
            "from .table import markdown_table\n",
            False,
        ),
        ("from losses import build_loss\nimport sweeps.storage\n", False),
    ],
)
def test_the_check_catches_every_form_of_import(tmp_path, source, caught):
    for package in LAYERS:
        (tmp_path / package).mkdir()
    (tmp_path / "sweeps" / "module.py").write_text(source)
    assert bool(layer_violations(tmp_path)) is caught
