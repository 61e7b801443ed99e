"""MLflow plumbing against a real SQLite store: URIs, store preparation, experiments, run logging."""

import threading
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from experiments.tracking.provenance import git_commit, library_versions, provenance_tags
from experiments.tracking.secrets import mask_secrets
from experiments.tracking.store import (
    RunLogger,
    get_or_create_experiment,
    prepare_store,
    resolve_tracking_uri,
)


@pytest.mark.parametrize(
    "text, masked",
    [
        ("postgresql://user:pass@host:5432/db", "postgresql://user:***@host:5432/db"),
        (
            "postgresql+psycopg://u:p%40ss@h/db?sslmode=require",
            "postgresql+psycopg://u:***@h/db?sslmode=require",
        ),
        (
            "mysql://root:hunter2@localhost/x and http://a:b@c",
            "mysql://root:***@localhost/x and http://a:***@c",
        ),
        ("https://host/api?token=abc&x=1", "https://host/api?token=***&x=1"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("http://host:5000", "http://host:5000"),
    ],
)
def test_mask_secrets(text, masked):
    assert mask_secrets(text) == masked


def test_resolve_tracking_uri(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example:5000")
    assert resolve_tracking_uri() == "http://example:5000"
    assert resolve_tracking_uri("sqlite:////abs/x.db") == "sqlite:////abs/x.db"
    with pytest.raises(ValueError, match="not a URI; use e.g. sqlite:///mlflow.db"):
        resolve_tracking_uri("mlflow.db")


def test_file_store_is_refused_without_the_opt_in(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ValueError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        prepare_store((tmp_path / "mlruns").as_uri())


def test_prepare_store_and_experiment_with_local_artifacts(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = prepare_store(f"sqlite:///{tmp_path}/sub/mlflow.db")
    assert (tmp_path / "sub" / "mlflow.db").is_file()
    ids = []
    threads = [
        threading.Thread(target=lambda: ids.append(get_or_create_experiment("exp", uri))) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 1 and len(ids) == 4
    experiment = MlflowClient(uri).get_experiment(ids[0])
    assert experiment.artifact_location == (tmp_path / "mlartifacts").as_uri()


def test_run_logger_logs_everything_by_run_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    uri = prepare_store(f"sqlite:///{tmp_path}/mlflow.db")
    exp = get_or_create_experiment("exp", uri)
    parent = RunLogger(uri, exp, "parent", {"tripletlab.role": "parent"})
    run = RunLogger(uri, exp, "child", {"tripletlab.role": "trial"}, parent_run_id=parent.run_id)
    params = {f"p{i}": i for i in range(150)}  # more than one log_batch call
    run.log_params(params)
    run.log_metrics({"val/map_at_r": 0.5}, step=1)
    run.log_metrics({"val/map_at_r": 0.75}, step=2)
    run.log_json({"a": 1}, "metrics.json")
    run.log_npz("embeddings/test.npz", embeddings=np.eye(3, dtype=np.float32), labels=np.arange(3))
    run.end("FINISHED")
    run.end("FAILED")  # a second end is ignored
    parent.end("KILLED")

    client = MlflowClient(uri)
    stored = client.get_run(run.run_id)
    assert stored.info.status == "FINISHED"
    assert stored.data.tags["mlflow.parentRunId"] == parent.run_id
    assert stored.data.params["p149"] == "149" and len(stored.data.params) == 150
    history = client.get_metric_history(run.run_id, "val/map_at_r")
    assert [(m.step, m.value) for m in history] == [(1, 0.5), (2, 0.75)]
    artifacts = Path(stored.info.artifact_uri.removeprefix("file://"))
    with np.load(artifacts / "embeddings" / "test.npz") as npz:
        assert npz["embeddings"].shape == (3, 3) and npz["labels"].tolist() == [0, 1, 2]
    assert (artifacts / "metrics.json").read_text().strip().startswith("{")
    assert client.get_run(parent.run_id).info.status == "KILLED"


def test_provenance_tags():
    tags = provenance_tags()
    assert tags["tripletlab.git_commit"] == git_commit()
    versions = library_versions()
    assert set(versions) == {"torch", "pytorch_metric_learning", "optuna", "mlflow"}
    assert tags["tripletlab.version.torch"] == versions["torch"] != "not installed"
    assert len(tags["tripletlab.git_commit"]) >= 7
