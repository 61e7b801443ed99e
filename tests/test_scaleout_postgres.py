"""Scale-out on real servers: three sweep workers share one Optuna study in PostgreSQL and log to
one PostgreSQL-backed ``mlflow server``; nothing is lost or duplicated."""
from __future__ import annotations

import optuna
import pytest
from mlflow import MlflowClient
from mlflow_server_fixture import finish, mlflow_server, start_sweep, sweep_command  # noqa: F401
from optuna.trial import TrialState
from postgres_fixture import postgres_server, postgres_url  # noqa: F401

from experiments.server import DEFAULT_HOST, build_parser, server_command

pytestmark = pytest.mark.postgres

STUDY_LOSS = "batch_hard"


def trial_runs(client: MlflowClient, sweep: str) -> list:
    experiment = client.get_experiment_by_name(sweep)
    assert experiment is not None, f"the sweep logged no MLflow experiment {sweep!r}"
    return client.search_runs([experiment.experiment_id], filter_string="tags.`tripletlab.role` = 'trial'",
                              max_results=1000)


def test_server_binds_localhost_unless_told_otherwise():
    args = build_parser().parse_args([])
    assert args.host == DEFAULT_HOST == "127.0.0.1"
    command = server_command("postgresql://u@127.0.0.1:5432/mlflow", "art")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--artifacts-destination" in command


def test_three_workers_share_one_study(mlflow_server, postgres_url, tmp_path):  # noqa: F811
    log = tmp_path / "sweep.log"
    command = sweep_command("scaleout", postgres_url, mlflow_server.url, tmp_path / "runs", workers=3, trials=12)
    code = finish(start_sweep(command, log), log)
    assert code == 0, log.read_text()[-3000:]

    study = optuna.load_study(study_name=f"scaleout/{STUDY_LOSS}", storage=postgres_url)
    trials = study.get_trials(deepcopy=False)
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 12
    assert len(trials) == 12, [t.state for t in trials]
    numbers = [t.number for t in trials]
    assert sorted(numbers) == list(range(12))
    workers = {t.user_attrs["worker_pid"] for t in trials}
    assert len(workers) >= 2, f"the trials all ran in one worker process: {workers}"

    client = MlflowClient(tracking_uri=mlflow_server.url)
    runs = trial_runs(client, "scaleout")
    assert len(runs) == 12
    assert {r.info.status for r in runs} == {"FINISHED"}
    run_numbers = [int(r.data.tags["optuna.trial_number"]) for r in runs]
    assert sorted(run_numbers) == list(range(12)), "duplicate or missing trial numbers in MLflow"
    parents = {r.data.tags["mlflow.parentRunId"] for r in runs}
    assert len(parents) == 1
    parent = client.get_run(parents.pop())
    assert parent.info.run_name == STUDY_LOSS and parent.data.tags["tripletlab.role"] == "parent"
    # Each trial links to its run and back.
    by_id = {r.info.run_id: r for r in runs}
    for trial in trials:
        run = by_id[trial.user_attrs["mlflow_run_id"]]
        assert run.data.tags["optuna.trial_number"] == str(trial.number)
        assert run.data.tags["tripletlab.trial_state"] == "complete"
