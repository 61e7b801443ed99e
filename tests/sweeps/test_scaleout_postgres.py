"""Scale-out on real servers: three sweep workers share one Optuna study in PostgreSQL and log to
one PostgreSQL-backed ``mlflow server``; nothing is lost or duplicated. The budget lock is on the
database, so workers on different machines (no shared lock file) start exactly ``trials`` trials."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from experiments.tracking.server import DEFAULT_HOST, build_parser, server_command
from helpers.mlflow_server_fixture import finish, start_sweep, sweep_command
from sweeps.storage import AdvisoryLock, budget_lock, open_storage

pytestmark = pytest.mark.postgres

STUDY_LOSS = "batch_hard"


def trial_runs(client: MlflowClient, sweep: str) -> list:
    experiment = client.get_experiment_by_name(sweep)
    assert experiment is not None, f"the sweep logged no MLflow experiment {sweep!r}"
    return client.search_runs(
        [experiment.experiment_id], filter_string="tags.`tripletlab.role` = 'trial'", max_results=1000
    )


def test_server_binds_localhost_unless_told_otherwise():
    args = build_parser().parse_args([])
    assert args.host == DEFAULT_HOST == "127.0.0.1"
    command = server_command("postgresql://u@127.0.0.1:5432/mlflow", "art")
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert "--artifacts-destination" in command


def test_three_workers_share_one_study(mlflow_server, postgres_url, tmp_path):
    log = tmp_path / "sweep.log"
    command = sweep_command(
        "scaleout", postgres_url, mlflow_server.url, tmp_path / "runs", workers=3, trials=12
    )
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


# A worker of another machine: its own lock directory, the real budget step ("count, then ask")
# with a pause inside it, so that workers without a common lock would each start the last trials.
RACER = """
import sys, time
import optuna
from sweeps.storage import budget_lock, budget_trials, open_storage

url, lock_dir, target, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
storage = open_storage(url, heartbeat_interval=1, grace_period=3)
study = optuna.load_study(study_name="race/batch_hard", storage=storage)
lock = budget_lock(storage, lock_dir + "/budget.lock", "race")
while not __import__("os").path.exists(go):
    time.sleep(0.01)
while True:
    with lock:
        if len(budget_trials(study)) >= target:
            break
        time.sleep(0.05)
        trial = study.ask()
    time.sleep(0.02)
    study.tell(trial, 0.5)
"""


def _python(*args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    return subprocess.Popen(
        [sys.executable, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_advisory_lock_excludes_other_connections(postgres_url):
    storage = open_storage(postgres_url)
    lock = budget_lock(storage, "unused", "exclusive")
    assert isinstance(lock, AdvisoryLock)
    script = (
        "import sys, time; from sweeps.storage import budget_lock, open_storage; "
        "lock = budget_lock(open_storage(sys.argv[1]), 'unused', 'exclusive'); "
        "print('ready', flush=True); t = time.time(); lock.acquire(); print(time.time() - t)"
    )
    with lock:
        proc = _python("-c", script, postgres_url)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(1.5)  # the other process waits on the database
    waited = float(proc.communicate(timeout=120)[0].split()[-1])
    assert waited >= 1.0


def test_advisory_lock_of_a_killed_worker_is_released(postgres_url):
    script = (
        "import sys, time; from sweeps.storage import budget_lock, open_storage; "
        "budget_lock(open_storage(sys.argv[1]), 'unused', 'killed').acquire(); "
        "print('held', flush=True); time.sleep(600)"
    )
    holder = _python("-c", script, postgres_url)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    lock = budget_lock(open_storage(postgres_url), "unused", "killed")
    start = time.monotonic()
    with lock:
        assert time.monotonic() - start < 10


def test_budget_is_exact_for_workers_on_several_machines(postgres_url, tmp_path):
    target, machines = 12, 4
    optuna.create_study(study_name="race/batch_hard", storage=open_storage(postgres_url))
    go = tmp_path / "go"
    racers = []
    for machine in range(machines):
        lock_dir = tmp_path / f"machine-{machine}"
        lock_dir.mkdir()
        racers.append(_python("-c", RACER, postgres_url, str(lock_dir), str(target), str(go)))
    time.sleep(3)  # every racer imported Optuna and waits for the start
    go.write_text("")
    outputs = [racer.communicate(timeout=180)[0] for racer in racers]
    assert [r.returncode for r in racers] == [0] * machines, outputs
    trials = optuna.load_study(study_name="race/batch_hard", storage=postgres_url).get_trials(deepcopy=False)
    overshoot = len(trials) - target
    assert overshoot == 0, f"{len(trials)} trials for a budget of {target}"
    assert [t.state for t in trials] == [TrialState.COMPLETE] * target
