"""``python -m sweeps.runs_view`` (``make ui``'s first line) on a real MLflow SQLite store: the URL of
the runs view of the most recent sweep (the one ``analyze`` takes: its latest run started last), or
one line saying no sweep has run, without creating a store."""

from __future__ import annotations

import json

from mlflow import MlflowClient

from sweeps.runs_view import main
from sweeps.tracking import ROLE_TAG, RUNS_VIEW_COLUMNS, RUNS_VIEW_KEY

ADDRESS = "http://127.0.0.1:5000"
T0 = 1_700_000_000_000  # ms


def experiment(client: MlflowClient, name: str, run_starts: list[int], sweep: bool = True) -> str:
    """An experiment with runs started at ``run_starts``; if ``sweep``, the first is a sweep's parent
    run and the experiment holds the sweep's runs view."""
    experiment_id = client.create_experiment(name)
    if sweep:
        client.set_experiment_tag(
            experiment_id,
            f"mlflow.sharedViewState.{RUNS_VIEW_KEY}",
            json.dumps({"selectedColumns": list(RUNS_VIEW_COLUMNS)}),
        )
    for i, start in enumerate(run_starts):
        tags = {ROLE_TAG: "parent" if sweep and i == 0 else "trial"}
        run_id = client.create_run(experiment_id, start_time=start, tags=tags).info.run_id
        client.set_terminated(run_id, end_time=start + 1)
    return experiment_id


def runs_view(capsys, *args: str) -> str:
    assert main([*args, "--address", ADDRESS]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1, out
    return out.strip()


def test_names_the_sweep_whose_latest_run_started_last(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    # created first but run last (a re-run of an older sweep) ...
    older = experiment(client, "sweep-a", [T0, T0 + 50_000])
    newer = experiment(client, "sweep-b", [T0 + 10_000, T0 + 20_000])
    # ... and later runs in experiments that are no sweep, or deleted, do not count
    experiment(client, "train", [T0 + 90_000], sweep=False)
    client.delete_experiment(experiment(client, "sweep-deleted", [T0 + 95_000]))

    line = runs_view(capsys, "--tracking-uri", uri)
    assert line.endswith(f"{ADDRESS}/#/experiments/{older}/runs?viewStateShareKey={RUNS_VIEW_KEY}"), line
    assert "'sweep-a'" in line

    client.create_run(newer, start_time=T0 + 60_000)
    assert runs_view(capsys, "--tracking-uri", uri).endswith(
        f"/#/experiments/{newer}/runs?viewStateShareKey={RUNS_VIEW_KEY}"
    )


def test_a_store_without_sweeps_says_so(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment(MlflowClient(tracking_uri=uri), "train", [T0], sweep=False)
    line = runs_view(capsys, "--tracking-uri", uri)
    assert line.startswith("No sweep has been run yet") and "make sweep" in line, line


def test_no_store_says_so_and_creates_none(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for args in (["--tracking-uri", "sqlite:///mlflow.db"], []):  # the Makefile's URI, and the default
        line = runs_view(capsys, *args)
        assert line.startswith("No sweep has been run yet") and "`make sweep`" in line, line
        assert str(tmp_path / "mlflow.db") in line
    assert list(tmp_path.iterdir()) == []
