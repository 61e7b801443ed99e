"""A tiny real sweep (digits, 2 losses x 3 trials x 1 epoch, 2 final seeds) for the sweep and
analysis tests: real training, a real Optuna journal file and a real MLflow SQLite store.

The ``tiny_sweep`` fixture is registered for every test in ``tests/conftest.py``.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from tripletlab.cli import main as cli_main

TINY_LOSSES = ("batch_hard", "multi_similarity")
TINY_SETTINGS = [
    "trials=3",
    "seeds=2",
    "epochs=1",
    "pruner=none",
    "model.embedding_dim=16",
    "optimizer.warmup_fraction=0",
    "batch.p=8",
    "batch.k=4",
    "dataset.max_per_class=40",
]


@dataclass
class TinySweep:
    root: Path  # working directory of the sweep (holds mlflow.db, mlartifacts/, runs/)
    name: str
    tracking_uri: str
    experiment_name: str
    storage: str  # journal file path or SQLAlchemy URL
    output_dir: Path  # runs/<name>/
    losses: tuple[str, ...]
    trials: int
    seeds: int
    exit_code: int
    args: list[str]


@contextlib.contextmanager
def working_directory(path: Path):
    previous = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(previous)


def sweep_args(name: str, losses=TINY_LOSSES, extra=(), storage: str | None = None) -> list[str]:
    args = [
        "sweep",
        "--config",
        "quick",
        f"name={name}",
        f"losses=[{','.join(losses)}]",
        *TINY_SETTINGS,
        *extra,
        "--tracking-uri",
        "sqlite:///mlflow.db",
    ]
    return args + (["--storage", storage] if storage else [])


def run_sweep(
    root: Path, name: str = "tiny", losses=TINY_LOSSES, extra=(), storage: str | None = None, cli_args=()
) -> TinySweep:
    """Run ``tripletlab sweep`` in ``root`` (in this process) and describe what it wrote."""
    root.mkdir(parents=True, exist_ok=True)
    args = [*cli_args, *sweep_args(name, losses, extra, storage)]
    with working_directory(root):
        code = cli_main(args)
    trials = next((int(a.split("=", 1)[1]) for a in reversed(args) if a.startswith("trials=")), 3)
    seeds = next((int(a.split("=", 1)[1]) for a in reversed(args) if a.startswith("seeds=")), 2)
    return TinySweep(
        root,
        name,
        f"sqlite:///{root / 'mlflow.db'}",
        name,
        storage or str(root / "runs" / name / "optuna.journal"),
        root / "runs" / name,
        tuple(losses),
        trials,
        seeds,
        code,
        args,
    )


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> TinySweep:
    """The tiny sweep, run once per test session."""
    return run_sweep(tmp_path_factory.mktemp("tiny-sweep"))
