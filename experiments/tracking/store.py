"""MLflow plumbing: the tracking URI, a store created once up front, experiments with local
artifacts, and :class:`RunLogger`, which logs to one run by its id.

Everything goes through ``MlflowClient`` with explicit run ids, never MLflow's thread-local
active-run stack, so trials running in threads each log to their own run.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments.tracking.secrets import mask_secrets

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
ARTIFACT_DIR = "mlartifacts"
BATCH_LIMIT = 100  # MLflow accepts at most 100 params or tags per log_batch call
LOCAL_SCHEMES = ("sqlite", "file", "postgresql", "mysql", "mssql")

_prepared: set[str] = set()
_prepare_lock = threading.Lock()


def add_tracking_uri_argument(parser: argparse.ArgumentParser) -> None:
    """The ``--tracking-uri`` option every command that reads or writes runs takes."""
    parser.add_argument(
        "--tracking-uri",
        default=None,
        metavar="URI",
        help=f"MLflow tracking URI (default: MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI})",
    )


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory.

    A relative SQLite path is made absolute, so the store stays put if the working directory
    changes; a bare filesystem path is refused with the fix (MLflow 3 needs a URI).
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if "://" not in uri and not uri.startswith(("databricks", "sqlite:")):
        raise ValueError(
            f"tracking URI {mask_secrets(uri)!r} is not a URI; use e.g. sqlite:///{uri} "
            "for a SQLite file or http://host:5000 for a tracking server"
        )
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        relative = uri[len("sqlite:///") :]
        if relative and relative != ":memory:":
            uri = "sqlite:///" + str(Path(relative).resolve())
    return uri


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``None`` for other stores and ``:memory:``)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return None if path in ("", ":memory:") else Path(path)


def existing_store_uri(uri: str | None) -> str:
    """The tracking URI as :func:`resolve_tracking_uri` resolves it, for reading a store back: a
    missing SQLite file is an error (opening it would create an empty store)."""
    uri = resolve_tracking_uri(uri)
    path = sqlite_file(uri)
    if path is not None and not path.exists():
        raise ValueError(f"no MLflow store at {path}: run a sweep first or pass --tracking-uri")
    return uri


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].split("+", 1)[0].lower()


def prepare_store(uri: str) -> str:
    """Create and migrate the tracking store once, before any worker or thread touches it.

    A fresh SQLite database opened by several processes at once races in MLflow's schema
    migration; calling this first (once per process, serialised by a lock) avoids that. A
    ``file:`` store is refused unless ``MLFLOW_ALLOW_FILE_STORE=true`` (MLflow 3.17's own rule).
    """
    uri = resolve_tracking_uri(uri)
    with _prepare_lock:
        if uri in _prepared:
            return uri
        if _scheme(uri) == "file" and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() != "true":
            raise ValueError(
                f"MLflow 3 refuses the file store {uri!r}; use sqlite:///mlflow.db or set "
                "MLFLOW_ALLOW_FILE_STORE=true"
            )
        if _scheme(uri) == "sqlite":
            Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        try:
            MlflowClient(tracking_uri=uri).search_experiments(max_results=1)
        except MlflowException as exc:
            raise ValueError(
                f"cannot open the MLflow store {mask_secrets(uri)}: {mask_secrets(str(exc))}"
            ) from exc
        _prepared.add(uri)
    return uri


def get_or_create_experiment(name: str, uri: str | None = None) -> str:
    """The id of experiment ``name``, created if missing; for local and database stores its
    artifacts go under ``./mlartifacts`` (the directory ``make ui`` serves)."""
    uri = prepare_store(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.lifecycle_stage == "deleted":
            raise ValueError(
                f"MLflow experiment {name!r} is deleted; restore it in the UI or pick another name"
            )
        return experiment.experiment_id
    location = Path(ARTIFACT_DIR).resolve().as_uri() if _scheme(uri) in LOCAL_SCHEMES else None
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:  # another thread or process created it first
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


def _chunks(items: list, size: int = BATCH_LIMIT):
    for start in range(0, len(items), size):
        yield items[start : start + size]


class RunLogger:
    """Logs params, tags, metrics and artifacts to one MLflow run, addressed by id."""

    def __init__(
        self,
        uri: str,
        experiment_id: str,
        run_name: str | None,
        tags: dict[str, str],
        parent_run_id: str | None = None,
    ) -> None:
        self.client = MlflowClient(tracking_uri=uri)
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        self.ended = False
        self.params_logged = False  # set by the caller once the run's config is logged

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for chunk in _chunks(items):
            self.client.log_batch(self.run_id, params=chunk)

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, str(v)) for k, v in tags.items()]
        for chunk in _chunks(items):
            self.client.log_batch(self.run_id, tags=chunk)

    def log_metrics(self, metrics: dict[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items()]
        for chunk in _chunks(items, 1000):
            self.client.log_batch(self.run_id, metrics=chunk)

    def log_json(self, data: Any, artifact_file: str) -> None:
        self.log_text(json.dumps(data, indent=2, sort_keys=True, default=str), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def log_npz(self, artifact_file: str, **arrays: np.ndarray) -> None:
        path = Path(artifact_file)
        with tempfile.TemporaryDirectory() as tmp:
            local = Path(tmp) / path.name
            np.savez_compressed(local, **arrays)
            self.client.log_artifact(
                self.run_id, str(local), str(path.parent) if path.parent != Path(".") else None
            )

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the run (``FINISHED``, ``FAILED`` or ``KILLED``) once; later calls do nothing."""
        if not self.ended:
            self.client.set_terminated(self.run_id, status=status)
            self.ended = True
