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
from mlflow.entities import ViewType

from experiments.tracking.store import resolve_tracking_uri

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one bar per downloaded npz is noise

ROLE_TAG = "tripletlab.role"
LOSS_TAG = "tripletlab.loss"
SEED_TAG = "tripletlab.seed"
TRIAL_STATE_TAG = "tripletlab.trial_state"
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


def existing_store_uri(uri: str | None) -> str:
    """The tracking URI as ``experiments.tracking.store`` resolves it; a missing SQLite file is an error
    (opening it would create an empty store)."""
    uri = resolve_tracking_uri(uri)
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.exists():
            raise ValueError(f"no MLflow store at {path}: run a sweep first or pass --tracking-uri")
    return uri


def sweep_experiments(client: MlflowClient) -> list:
    """Experiments that hold at least one sweep parent run, most recently created first."""
    found = []
    for exp in client.search_experiments(view_type=ViewType.ACTIVE_ONLY):
        if client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'parent'", max_results=1):
            found.append(exp)
    return sorted(found, key=lambda e: (e.creation_time or 0, int(e.experiment_id) if e.experiment_id.isdigit() else 0),
                  reverse=True)


def find_experiment(client: MlflowClient, name: str | None):
    """The named experiment, or the most recent sweep when ``name`` is None; clear errors otherwise."""
    if name is None:
        sweeps = sweep_experiments(client)
        if not sweeps:
            raise ValueError("no sweep found in the MLflow store (no run tagged tripletlab.role=parent): "
                             "run `make sweep` first or pass --experiment NAME")
        return sweeps[0]
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        names = [e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(sorted(names)) or 'none'}")
    return exp


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
    return pd.DataFrame(rows, columns=None if rows else ["run_id", "run_name", "status", "start_time", "end_time",
                                                         "role", "loss", "seed", "parent_run_id"])


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
        raise ValueError(f"experiment {exp.name!r} has no finished trial or final runs to analyse "
                         f"({len(runs)} runs in all): wait for the sweep to finish or pick another --experiment")
    sweep = Sweep(name=exp.name, experiment_id=exp.experiment_id, tracking_uri=uri, runs=runs, storage=storage)
    if storage:
        sweep.studies = load_studies(storage, exp.name, sweep.losses)
    return sweep


def optuna_storage(url_or_path: str):
    """An Optuna storage from a database URL or a journal file path."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if "://" in url_or_path:
        return optuna.storages.get_storage(url_or_path)
    if not Path(url_or_path).is_file():
        raise ValueError(f"no Optuna journal at {url_or_path}: pass --storage with the sweep's storage")
    return optuna.storages.JournalStorage(JournalFileBackend(str(url_or_path)))


def load_studies(storage: str, sweep_name: str, losses: list[str]) -> dict:
    """``{loss: optuna.Study}`` for each loss whose study ``<sweep>/<loss>`` is in the storage."""
    import optuna

    backend = optuna_storage(storage)
    names = {s.study_name for s in optuna.get_all_study_summaries(backend, include_best_trial=False)}
    return {loss: optuna.load_study(study_name=f"{sweep_name}/{loss}", storage=backend)
            for loss in losses if f"{sweep_name}/{loss}" in names}


def metric_histories(sweep: Sweep, run_ids: list[str], keys: list[str]) -> pd.DataFrame:
    """Per-epoch values as a long table with columns ``run_id``, ``key``, ``step``, ``value``."""
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    rows = [(run_id, key, m.step, m.value)
            for run_id in run_ids for key in keys for m in client.get_metric_history(run_id, key)]
    return pd.DataFrame(rows, columns=["run_id", "key", "step", "value"])


def final_run_histories(sweep: Sweep, keys: list[str]) -> pd.DataFrame:
    """:func:`metric_histories` of ``keys`` over the final runs, with their ``loss`` column."""
    finals = sweep.role("final")
    return metric_histories(sweep, finals["run_id"].tolist(), keys).merge(finals[["run_id", "loss"]], on="run_id")


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
