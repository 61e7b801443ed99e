"""Where a run came from: the git commit of the code and the versions of the key libraries."""

from __future__ import annotations

import functools
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

TRACKED_PACKAGES = {
    "torch": "torch",
    "pytorch_metric_learning": "pytorch-metric-learning",
    "optuna": "optuna",
    "mlflow": "mlflow",
}
SOURCE_ROOT = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=None)
def git_commit(root: Path = SOURCE_ROOT) -> str:
    """The commit hash of the checkout holding the code, with ``-dirty`` for local changes;
    ``unknown`` outside a git checkout (an installed wheel)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{commit}-dirty" if dirty else commit


def library_versions() -> dict[str, str]:
    """Installed versions of torch, pytorch-metric-learning, optuna and mlflow."""
    out = {}
    for key, dist in TRACKED_PACKAGES.items():
        try:
            out[key] = version(dist)
        except PackageNotFoundError:
            out[key] = "not installed"
    return out


def provenance_tags() -> dict[str, str]:
    """The ``tripletlab.git_commit`` and ``tripletlab.version.<package>`` run tags."""
    tags = {"tripletlab.git_commit": git_commit()}
    tags.update({f"tripletlab.version.{k}": v for k, v in library_versions().items()})
    return tags
