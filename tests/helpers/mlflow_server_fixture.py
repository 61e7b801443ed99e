"""A real ``mlflow server`` backed by PostgreSQL for the scale-out and fault tests, plus helpers to
run ``tripletlab sweep`` as separate processes against it.

The ``mlflow_server`` fixture is registered for every test in ``tests/conftest.py``. One server per
test module; tests keep apart by sweep name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from experiments.tracking.server import server_url, start_server, stop_server, wait_until_ready
from helpers.postgres_fixture import free_port

REPO = Path(__file__).resolve().parents[2]
SERVER_START_TIMEOUT = 180  # seconds; a cold start migrates the schema, slow on a busy 2-core machine

# Tiny and fast: digits, 20 images per class, 1 epoch, small batches (under a second per trial).
TINY_TRIAL = [
    "epochs=1",
    "pruner=none",
    "dataset.max_per_class=20",
    "model.embedding_dim=8",
    "batch.p=3",
    "batch.k=4",
    "optimizer.warmup_fraction=0",
]


@dataclass
class TrackingServer:
    """``mlflow server`` on 127.0.0.1:port with runs in ``backend_uri`` and artifacts in ``artifacts``."""

    backend_uri: str
    artifacts: Path
    log_file: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return server_url("127.0.0.1", self.port)

    def start(self) -> None:
        self.process = start_server(
            self.backend_uri, self.artifacts, port=self.port, workers=1, log_file=self.log_file
        )
        try:
            wait_until_ready(self.url, self.process, timeout=SERVER_START_TIMEOUT)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; its log ends:\n{self.log_tail()}") from None

    def stop(self) -> None:
        if self.process is not None:
            stop_server(self.process, timeout=5)  # workers' keep-alive connections would hold a graceful stop

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="module")
def mlflow_server(postgres_server, tmp_path_factory):
    """One PostgreSQL-backed tracking server for the module, stopped (and its database dropped) after."""
    root = tmp_path_factory.mktemp("mlflow-server")
    database = postgres_server.create_database()
    server = TrackingServer(database, root / "artifacts", root / "server.log")
    try:
        server.start()
        yield server
    finally:
        server.stop()
        postgres_server.drop_database(database)


def sweep_command(
    name: str,
    storage: str,
    tracking_uri: str,
    output_dir: Path,
    workers: int,
    trials: int,
    extra: list[str] = (),
) -> list[str]:
    """``tripletlab sweep`` for one loss, tiny trials, a short heartbeat so dead workers are seen fast."""
    return [
        sys.executable,
        "-m",
        "tripletlab.cli",
        "sweep",
        "--config",
        "quick",
        f"name={name}",
        "losses=[batch_hard]",
        f"trials={trials}",
        "seeds=1",
        "heartbeat_interval=1",
        "grace_period=3",
        *TINY_TRIAL,
        *extra,
        "--workers",
        str(workers),
        "--storage",
        storage,
        "--tracking-uri",
        tracking_uri,
        "--output-dir",
        str(output_dir),
    ]


def start_sweep(command: list[str], log_file: Path) -> subprocess.Popen:
    """Start a sweep in its own process group (so a test can stop it and all its workers)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}
    with open(log_file, "ab") as out:
        return subprocess.Popen(
            command,
            cwd=log_file.parent,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def finish(process: subprocess.Popen, log_file: Path, timeout: float = 240) -> int:
    """Wait for ``process``; on timeout kill its whole group and fail with the end of its log."""
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        pytest.fail(f"sweep did not finish within {timeout:.0f}s; its log ends:\n{log_tail(log_file)}")


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def log_tail(log_file: Path, lines: int = 40) -> str:
    return "\n".join(log_file.read_text(errors="replace").splitlines()[-lines:])


def wait_for(
    predicate, timeout: float, what: str, process: subprocess.Popen, log_file: Path, interval: float = 0.2
):
    """Poll ``predicate`` while ``process`` runs until it returns something truthy (returned);
    fail naming ``what`` and showing the end of the process's log."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if process.poll() is not None:
            pytest.fail(
                f"the sweep exited ({process.returncode}) before {what}; its log ends:\n{log_tail(log_file)}"
            )
        time.sleep(interval)
    pytest.fail(
        f"timed out after {timeout:.0f}s waiting for {what}; the sweep's log ends:\n{log_tail(log_file)}"
    )
