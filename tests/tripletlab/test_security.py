"""Security: secrets in storage URLs never reach MLflow or the console, YAML and checkpoints are
loaded safely, servers bind 127.0.0.1 by default, no shell runs user strings, and plugins load
only when named."""

from __future__ import annotations

import ast
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch

from experiments.config import load_config
from experiments.tracking.secrets import mask_secrets
from experiments.tracking.server import build_parser
from experiments.train.loop import read_checkpoint
from sweeps.config import load_sweep_config

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("losses", "experiments", "sweeps", "analysis", "benchmarks", "examples", "tripletlab")
SERVER_TARGETS = ("server", "ui", "dashboard")


def project_python_files() -> list[Path]:
    files = [p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py")]
    assert len(files) > 20, "the source tree was not found"
    return files


def calls(path: Path):
    """Every call in ``path`` as (dotted function name, ast.Call)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


@pytest.mark.postgres
def test_password_in_storage_url_is_never_logged(postgres_url, tmp_path):
    password = unquote(urlsplit(postgres_url).password or "")
    assert len(password) >= 8, "the test database URL needs a password to look for"
    command = [
        sys.executable,
        "-m",
        "tripletlab.cli",
        "sweep",
        "--config",
        "quick",
        "name=secret",
        "losses=[batch_hard]",
        "trials=1",
        "seeds=1",
        "epochs=1",
        "dataset.max_per_class=20",
        "model.embedding_dim=8",
        "batch.p=3",
        "batch.k=4",
        "--workers",
        "1",
        "--storage",
        postgres_url,
        "--tracking-uri",
        "sqlite:///mlflow.db",
        "--output-dir",
        "runs",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "***@" in result.stdout + result.stderr, "the storage URL was not shown masked"
    for name, text in (("stdout", result.stdout), ("stderr", result.stderr)):
        assert password not in text, f"the password appears in the sweep's {name}"
    store = tmp_path / "mlflow.db"
    assert store.stat().st_size > 0
    written = [
        store,
        *(p for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()),
        *(p for p in (tmp_path / "runs").rglob("*") if p.is_file()),
    ]
    assert any(p.name == "config.yaml" for p in written), "the run artifacts were not found"
    leaks = [str(p.relative_to(tmp_path)) for p in written if password.encode() in p.read_bytes()]
    assert not leaks, f"the storage password is written in {leaks}"


def test_mask_secrets_hides_passwords_and_tokens():
    assert mask_secrets("postgresql://alice:s3cr%40t@db:5432/x") == "postgresql://alice:***@db:5432/x"
    assert "hunter2" not in mask_secrets("mysql+pymysql://bob:hunter2@h/db?password=hunter2")
    assert mask_secrets("sqlite:///mlflow.db") == "sqlite:///mlflow.db"


@pytest.mark.parametrize("loader", [load_config, load_sweep_config], ids=["experiment", "sweep"])
def test_yaml_tags_that_run_code_are_refused(loader, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(
        f"name: !!python/object/apply:pathlib.Path.touch [!!python/object/apply:pathlib.Path ['{marker}']]\n"
    )
    with pytest.raises(ValueError, match="not valid YAML"):
        loader(str(path), [])
    assert not marker.exists()


def test_yaml_is_read_only_with_the_safe_loader():
    unsafe = []
    for path in project_python_files():
        for name, call in calls(path):
            if name in ("yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                unsafe.append(f"{path.relative_to(REPO)}:{call.lineno} {name}")
            if name == "yaml.load" and "SafeLoader" not in ast.unparse(call):
                unsafe.append(f"{path.relative_to(REPO)}:{call.lineno} yaml.load without SafeLoader")
    assert not unsafe, unsafe


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_checkpoints_load_weights_only(tmp_path):
    model = torch.nn.Linear(2, 2)
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        pickle.dump({"model": model.state_dict(), "epoch": 1, "payload": _Payload()}, f, protocol=2)
    with pytest.raises(ValueError, match="not a readable checkpoint.*weights_only: UnpicklingError"):
        read_checkpoint(evil)
    loads = [
        (path, call) for path in project_python_files() for name, call in calls(path) if name == "torch.load"
    ]
    assert loads, "no checkpoint loading found to check"
    for path, call in loads:
        flags = {kw.arg: ast.unparse(kw.value) for kw in call.keywords}
        assert flags.get("weights_only") == "True", (
            f"{path.relative_to(REPO)}:{call.lineno} torch.load without weights_only=True"
        )


def test_no_shell_runs_user_strings():
    offenders = []
    for path in [*project_python_files(), *(REPO / "tests").rglob("*.py")]:
        for name, call in calls(path):
            if any(kw.arg == "shell" and ast.unparse(kw.value) != "False" for kw in call.keywords):
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno} {name}(shell=...)")
            if name in ("os.system", "os.popen", "subprocess.getoutput", "subprocess.getstatusoutput"):
                offenders.append(f"{path.relative_to(REPO)}:{call.lineno} {name}")
    assert not offenders, offenders


def test_servers_bind_localhost_by_default():
    assert build_parser().parse_args([]).host == "127.0.0.1"
    result = subprocess.run(
        ["make", "-n", *SERVER_TARGETS],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k not in ("HOST", "MAKEFLAGS")},
    )
    assert result.returncode == 0, result.stderr
    server_lines = [line for line in result.stdout.splitlines() if "--port" in line]
    assert len(server_lines) == len(SERVER_TARGETS), result.stdout
    for line in server_lines:
        assert re.search(r"--host 127\.0\.0\.1(\s|$)", line), f"not bound to 127.0.0.1 by default: {line}"


def test_plugins_load_only_when_named(tmp_path):
    (tmp_path / "sneaky_loss.py").write_text(
        "from losses import MetricLoss, register_loss\n"
        "@register_loss('sneaky')\nclass Sneaky(MetricLoss):\n"
        "    '''Must not load unasked.'''\n    paper = 'none'\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRIPLETLAB_PLUGINS"}
    code = "from losses import list_losses; print(sorted(list_losses()))"
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr
    assert "batch_hard" in result.stdout and "sneaky" not in result.stdout
