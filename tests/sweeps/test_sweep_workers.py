"""Worker processes sharing one study, and recovery of trials a dead worker left RUNNING."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from helpers.sweep_fixture import run_sweep, sweep_args, working_directory
from sweeps.storage import BudgetLock, budget_trials, open_storage, recover_stale_trials, stale_reason
from tripletlab.cli import main as cli_main


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _journal_study(tmp_path, name="s"):
    storage = open_storage(str(tmp_path / "optuna.journal"))
    return optuna.create_study(study_name=name, storage=storage, direction="maximize"), storage


def _start_trial(study, pid, heartbeat, host=None):
    trial = study.ask({"loss.margin": optuna.distributions.FloatDistribution(0.01, 1.0)})
    trial.set_user_attr("worker_host", host or socket.gethostname())
    trial.set_user_attr("worker_pid", pid)
    trial.set_user_attr("heartbeat", heartbeat)
    return trial


def test_trials_of_dead_or_silent_workers_are_failed_and_retried_once(tmp_path):
    study, storage = _journal_study(tmp_path)
    dead = _start_trial(study, _dead_pid(), time.time())
    silent = _start_trial(study, os.getpid(), time.time() - 3600, host="another-machine")
    alive = _start_trial(study, os.getpid(), time.time() - 3600)  # a long epoch: alive, if quiet
    done = _start_trial(study, _dead_pid(), time.time())
    study.tell(done, 0.5)

    assert sorted(recover_stale_trials(study, storage, grace_period=600)) == [dead.number, silent.number]
    assert recover_stale_trials(study, storage, grace_period=600) == []  # a second pass finds nothing new
    by_number = {t.number: t for t in study.trials}
    assert by_number[dead.number].state == TrialState.FAIL
    assert "exited" in by_number[dead.number].user_attrs["fail_reason"]
    assert by_number[silent.number].state == TrialState.FAIL
    assert "no heartbeat" in by_number[silent.number].user_attrs["fail_reason"]
    assert by_number[alive.number].state == TrialState.RUNNING
    retries = [t for t in study.trials if t.state == TrialState.WAITING]
    assert sorted(t.system_attrs["retry_history"] for t in retries) == [[dead.number], [silent.number]]
    assert {t.params["loss.margin"] for t in retries} == {
        dead.params["loss.margin"],
        silent.params["loss.margin"],
    }
    assert all("worker_pid" not in t.user_attrs for t in retries)
    # budget: the failed originals are replaced by their retries, so the count is unchanged
    assert len(budget_trials(study)) == 4


def test_stale_reason_by_heartbeat_age():
    trial = optuna.trial.create_trial(
        state=TrialState.RUNNING,
        user_attrs={"worker_host": "elsewhere", "worker_pid": 1, "heartbeat": 1000.0},
    )
    assert stale_reason(trial, grace_period=60, now=1030.0) is None
    assert "for 100s" in stale_reason(trial, grace_period=60, now=1100.0)


def test_budget_lock_is_exclusive(tmp_path):
    path = tmp_path / "budget.lock"
    script = (
        "import sys, time; sys.path.insert(0, %r); from sweeps.storage import BudgetLock; "
        "print('ready', flush=True); t = time.time(); BudgetLock(%r).acquire(); print(time.time() - t)"
    )
    with BudgetLock(path):
        proc = subprocess.Popen(
            [sys.executable, "-c", script % (os.getcwd(), str(path))], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout.readline().strip() == "ready"  # the other process is now waiting for the lock
        time.sleep(1.0)
    waited = float(proc.communicate(timeout=120)[0])
    assert waited >= 0.9


@pytest.mark.slow  # two worker processes each import torch and MLflow (~10 s each on 2 cores)
def test_two_worker_processes_fill_one_study_exactly(tmp_path):
    with working_directory(tmp_path):
        code = cli_main([*sweep_args("pair", ("batch_hard",), ["trials=4", "seeds=1"]), "--workers", "2"])
    assert code == 0
    storage = open_storage(str(tmp_path / "runs/pair/optuna.journal"))
    study = optuna.load_study(study_name="pair/batch_hard", storage=storage)
    numbers = [t.number for t in study.trials]
    assert sorted(numbers) == [0, 1, 2, 3] and len(set(numbers)) == 4
    assert all(t.state == TrialState.COMPLETE for t in study.trials)
    assert len({t.user_attrs["worker_pid"] for t in study.trials}) == 2  # both workers took trials
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pair")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    roles = sorted(r.data.tags["tripletlab.role"] for r in runs)
    assert roles == ["final"] + ["parent"] + ["summary"] + ["trial"] * 4


def test_a_sweep_retries_the_trial_a_killed_worker_left_running(tmp_path):
    storage_path = tmp_path / "runs" / "revive" / "optuna.journal"
    storage_path.parent.mkdir(parents=True)
    first = run_sweep(tmp_path, name="revive", losses=("batch_hard",), extra=["trials=1", "seeds=1"])
    assert first.exit_code == 0
    study = optuna.load_study(study_name="revive/batch_hard", storage=open_storage(str(storage_path)))
    orphan = _start_trial(study, _dead_pid(), time.time())  # as if its worker was killed mid-trial

    again = run_sweep(tmp_path, name="revive", losses=("batch_hard",), extra=["trials=2", "seeds=1"])
    assert again.exit_code == 0
    trials = study.trials
    assert trials[orphan.number].state == TrialState.FAIL
    [retry] = [t for t in trials if t.system_attrs.get("retry_history") == [orphan.number]]
    assert retry.state == TrialState.COMPLETE
    assert retry.params["loss.margin"] == pytest.approx(orphan.params["loss.margin"])
    assert len(budget_trials(study)) == 2  # the retry took the orphan's place in the budget


INTERRUPTING_PLUGIN = '''
import os
import torch
from losses import MetricLoss, register_loss
from losses.params import HyperParam

MARKER = {marker!r}


@register_loss("interrupting_contrastive")
class InterruptingContrastive(MetricLoss):
    """Contrastive loss that presses Ctrl-C once, while a marker file exists."""

    hyperparams = (HyperParam("margin", float, 0.5, "negative margin", low=0.0, high=2.0, search=(0.1, 1.0)),)

    def __init__(self, margin=0.5):
        super().__init__()
        self.margin = margin

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        if os.path.exists(MARKER):
            os.remove(MARKER)
            raise KeyboardInterrupt
        d = torch.cdist(embeddings, embeddings)
        same = labels[:, None] == labels[None, :]
        return torch.cat([d[same].pow(2), (self.margin - d[~same]).clamp(min=0).pow(2)]).mean()
'''


def test_an_interrupted_trial_is_redone_on_resume_not_counted(tmp_path):
    marker = tmp_path / "press-ctrl-c"
    marker.write_text("")
    plugin = tmp_path / "interrupting.py"
    plugin.write_text(INTERRUPTING_PLUGIN.format(marker=str(marker)))
    extra = ["trials=1", "seeds=1", f"plugins=[{plugin}]"]
    stopped = run_sweep(tmp_path, name="ctrl-c", losses=("interrupting_contrastive",), extra=extra)
    assert stopped.exit_code == 130
    storage = open_storage(str(tmp_path / "runs" / "ctrl-c" / "optuna.journal"))
    study = optuna.load_study(study_name="ctrl-c/interrupting_contrastive", storage=storage)
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    assert "interrupted" in study.trials[0].user_attrs["fail_reason"]

    resumed = run_sweep(tmp_path, name="ctrl-c", losses=("interrupting_contrastive",), extra=extra)
    assert resumed.exit_code == 0
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert study.trials[1].params == study.trials[0].params and len(budget_trials(study)) == 1
