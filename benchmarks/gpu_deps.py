"""Install what the benchmarks import but this machine lacks, offline, from ``make gpu-wheels``' folder.

When a module cannot be found, nothing but the wheel folder is used: the wheels of its manifest,
less those whose distribution is installed at the same version, go with ``pip install --no-index
--no-deps`` (the set was resolved when it was downloaded) into a site folder next to the wheels,
which is then put first on ``sys.path`` and on ``PYTHONPATH`` for child processes, so it wins over
other versions installed. Nothing outside that folder changes. The manifest's Python version must be
this interpreter's. ``import_error`` then imports the modules in a child process, which catches a
module that is found but breaks on import.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from .gpu_wheels import MANIFEST, canonical

REQUIRED = ("optuna", "mlflow", "pytorch_metric_learning")
OPTIONAL = ("faiss",)


def missing(modules) -> list[str]:
    """The modules that cannot be found on ``sys.path``."""
    importlib.invalidate_caches()
    return [m for m in modules if importlib.util.find_spec(m) is None]


def installed_distributions() -> set[tuple[str, str]]:
    """(canonical name, version) of every installed distribution."""
    return {
        (canonical(d.metadata["Name"]), d.version)
        for d in importlib.metadata.distributions()
        if d.metadata["Name"]
    }


def wheel_distribution(filename: str) -> tuple[str, str]:
    """(canonical name, version) from a wheel's file name (``name-version-tags.whl``)."""
    name, version = filename.split("-")[:2]
    return canonical(name), version


def import_error(modules) -> str | None:
    """Why importing ``modules`` in a fresh interpreter fails (its last lines of output), or None."""
    done = subprocess.run(
        [sys.executable, "-c", "import " + ", ".join(modules)], capture_output=True, text=True
    )
    return None if done.returncode == 0 else (done.stderr or done.stdout).strip()[-400:]


def use_site(site: Path) -> None:
    """Put ``site`` first on this process's import path and on its children's ``PYTHONPATH``."""
    if str(site) not in sys.path:
        sys.path.insert(0, str(site))
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if str(site) not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([str(site), *paths])
    importlib.invalidate_caches()


def ensure(wheel_dir: Path, modules=REQUIRED + OPTIONAL, site: Path | None = None) -> dict:
    """Install, if any of ``modules`` is missing, the manifest's wheels this machine does not have
    at that version.

    Returns what was missing, the wheels installed, what is still missing and, when installing was
    needed but impossible or failed, why.
    """
    site = site or wheel_dir / f"site-{sys.version_info.major}.{sys.version_info.minor}"
    before = missing(modules)
    result = {"missing": before, "installed": [], "still_missing": before, "error": None}
    if before and site.is_dir():
        use_site(site)  # installed by an earlier run
        result["still_missing"] = missing(modules)
    if not result["still_missing"]:
        return result
    manifest_path = wheel_dir / MANIFEST
    if not manifest_path.is_file():
        result["error"] = (
            f"no {MANIFEST} in {wheel_dir}: run `make gpu-wheels` on a machine that reaches "
            "PyPI and bring the folder along"
        )
        return result
    manifest = json.loads(manifest_path.read_text())
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest.get("python_version", python) != python:
        result["error"] = (
            f"the wheels are for Python {manifest['python_version']}, this is Python "
            f"{python}: run `make gpu-wheels GPU_PYTHON_VERSION={python}`"
        )
        return result
    have = installed_distributions()
    wheels = [w for w in manifest["wheels"] if wheel_distribution(w) not in have]
    if wheels:
        pip = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--upgrade",
                "--quiet",
                "--disable-pip-version-check",
                "--target",
                str(site),
                *(str(wheel_dir / w) for w in wheels),
            ],
            capture_output=True,
            text=True,
        )
        if pip.returncode != 0:
            result["error"] = f"pip install failed: {(pip.stderr or pip.stdout).strip()[-400:]}"
            return result
        result["installed"] = wheels
    use_site(site)
    result["still_missing"] = missing(modules)
    return result


def faiss_gpus() -> tuple[int, str | None]:
    """(GPUs faiss can use, why not where it cannot be imported)."""
    try:
        import faiss
    except Exception as error:  # noqa: BLE001 (a broken binary raises more than ImportError)
        return 0, f"{type(error).__name__}: {error}"[:200]
    return (faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0), None
