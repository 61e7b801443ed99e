"""Read a finished sweep back from MLflow (runs, metric histories, embeddings) and Optuna.

Analysis never trains: everything comes from the MLflow layout of ``docs/design.md`` (roles
``parent`` / ``trial`` / ``final`` / ``summary`` under one experiment per sweep) and from the
sweep's Optuna storage (studies named ``<sweep>/<loss>``).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow import MlflowClient

from experiments.tracking.store import existing_store_uri
from sweeps.context import study_name
from sweeps.storage import is_url, open_storage
from sweeps.tracking import LOSS_TAG, ROLE_TAG, SEED_TAG, find_experiment

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded npz is noise

BASELINE_LOSS = "triplet"
EMBEDDINGS_ARTIFACT = "embeddings/test.npz"


@dataclass
class Sweep:
    """One sweep: its MLflow runs as a table (one row per run) and its Optuna studies.

    ``runs`` has columns ``run_id``, ``run_name``, ``status``, ``start_time``, ``end_time``
    (datetimes), ``role``, ``loss``, ``seed``, ``parent_run_id`` plus ``metrics.<key>``,
    ``params.<key>`` and ``tags.<key>`` for every logged value.
    """

    name: str
    experiment_id: str
    tracking_uri: str
    runs: pd.DataFrame
    studies: dict = field(default_factory=dict)
    storage: str | None = None

    def role(self, role: str) -> pd.DataFrame:
        """Finished runs of one role (``parent``, ``trial``, ``final``, ``summary``)."""
        return self.runs[(self.runs["role"] == role) & (self.runs["status"] == "FINISHED")]

    @property
    def losses(self) -> list[str]:
        """Losses of the sweep, the ``triplet`` baseline first, then alphabetical."""
        names = set(self.runs.loc[self.runs["role"].isin(["parent", "trial", "final"]), "loss"].dropna())
        return sorted(names, key=lambda n: (n != BASELINE_LOSS, n))


def runs_frame(client: MlflowClient, experiment_id: str) -> pd.DataFrame:
    """All runs of an experiment as one row each (see :class:`Sweep` for the columns)."""
    rows, token = [], None
    while True:
        page = client.search_runs([experiment_id], max_results=1000, page_token=token)
        for run in page:
            tags = run.data.tags
            row = {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "status": run.info.status,
                "start_time": pd.to_datetime(run.info.start_time, unit="ms"),
                "end_time": pd.to_datetime(run.info.end_time, unit="ms") if run.info.end_time else pd.NaT,
                "role": tags.get(ROLE_TAG),
                "loss": tags.get(LOSS_TAG),
                "seed": tags.get(SEED_TAG),
                "parent_run_id": tags.get("mlflow.parentRunId"),
            }
            row.update({f"metrics.{k}": v for k, v in run.data.metrics.items()})
            row.update({f"params.{k}": v for k, v in run.data.params.items()})
            row.update({f"tags.{k}": v for k, v in tags.items()})
            rows.append(row)
        token = page.token
        if not token:
            break
    empty = [
        "run_id",
        "run_name",
        "status",
        "start_time",
        "end_time",
        "role",
        "loss",
        "seed",
        "parent_run_id",
    ]
    return pd.DataFrame(rows, columns=None if rows else empty)


def load_sweep(experiment: str | None, tracking_uri: str | None = None, storage: str | None = None) -> Sweep:
    """Load a sweep's runs and (when ``storage`` is given) its Optuna studies.

    Raises ``ValueError`` for an unknown experiment or one without finished sweep runs.
    """
    uri = existing_store_uri(tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    exp = find_experiment(client, experiment)
    runs = runs_frame(client, exp.experiment_id)
    finished = runs[(runs["status"] == "FINISHED") & runs["role"].isin(["trial", "final"])]
    if finished.empty:
        raise ValueError(
            f"experiment {exp.name!r} has no finished trial or final runs to analyse "
            f"({len(runs)} runs in all): wait for the sweep to finish or pick another "
            "--experiment"
        )
    sweep = Sweep(
        name=exp.name, experiment_id=exp.experiment_id, tracking_uri=uri, runs=runs, storage=storage
    )
    if storage:
        sweep.studies = load_studies(storage, exp.name, sweep.losses)
    return sweep


def optuna_storage(url_or_path: str):
    """The sweep's Optuna storage (``sweeps.storage.open_storage``), a database URL or a journal file
    path; a missing journal is an error (opening it would create an empty one)."""
    if not is_url(url_or_path) and not Path(url_or_path).is_file():
        raise ValueError(f"no Optuna journal at {url_or_path}: pass --storage with the sweep's storage")
    return open_storage(url_or_path)


def load_studies(storage: str, sweep_name: str, losses: list[str]) -> dict:
    """``{loss: optuna.Study}`` for each loss whose study ``<sweep>/<loss>`` is in the storage."""
    import optuna

    backend = optuna_storage(storage)
    names = {s.study_name for s in optuna.get_all_study_summaries(backend, include_best_trial=False)}
    return {
        loss: optuna.load_study(study_name=study_name(sweep_name, loss), storage=backend)
        for loss in losses
        if study_name(sweep_name, loss) in names
    }


def metric_histories(sweep: Sweep, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    """Per-epoch values as a long table with columns ``run_id``, ``key``, ``step``, ``value``."""
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    rows = [
        (run_id, key, m.step, m.value)
        for run_id in run_ids
        for key in keys
        for m in client.get_metric_history(run_id, key)
    ]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def final_run_histories(sweep: Sweep, keys: list[str]) -> pd.DataFrame:
    """:func:`metric_histories` of ``keys`` over the final runs, with their ``loss`` column."""
    finals = sweep.role("final")
    histories = metric_histories(sweep, finals["run_id"].tolist(), keys)
    return histories.merge(finals[["run_id", "loss"]], on="run_id")


def load_embeddings(sweep: Sweep, run_id: str) -> dict[str, np.ndarray] | None:
    """The arrays of a run's ``embeddings/test.npz``, or None when the run has no such artifact."""
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    listed = {a.path for a in client.list_artifacts(run_id, "embeddings")}
    if EMBEDDINGS_ARTIFACT not in listed:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, EMBEDDINGS_ARTIFACT, tmp)
        with np.load(path) as data:
            return {key: data[key] for key in data.files}
