"""Faults on real servers (PostgreSQL study, PostgreSQL-backed ``mlflow server``): a worker killed
with SIGKILL or stopped with SIGINT in the middle of a trial, a trial held by a live worker when
the budget is reached, the tracking server going away for a while, and a loss that turns NaN.
After each, the counts are exact, no trial or run is left RUNNING, final runs start only on a
finished study, and the sweep resumes with the same command."""

from __future__ import annotations

import functools
import os
import re
import signal
import socket
import subprocess
import time

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from helpers.mlflow_server_fixture import finish, kill_group, start_sweep, sweep_command, wait_for
from sweeps.storage import budget_trials, fail_for_retry, open_storage, recover_stale_trials

pytestmark = pytest.mark.postgres

LOSS = "batch_hard"
# Trials long enough (a few seconds) that a test can catch one in the middle.
LONGER_TRIAL = ["dataset.max_per_class=60", "epochs=3"]
# Optuna's default grace period: a dead worker must be seen at once by its process, not its heartbeat.
DEFAULT_GRACE = ["grace_period=600"]

NAN_PLUGIN = '''
from losses import HyperParam, MetricLoss, register_loss

@register_loss("nan_after_two_steps")
class NanAfterTwoSteps(MetricLoss):
    """A loss that trains for two steps, then returns NaN (a diverging run)."""
    paper = "none: a fault-injection loss"
    hyperparams = (HyperParam("scale", float, 1.0, "scale", low=0.0, search=(0.5, 2.0)),)

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale, self.calls = scale, 0

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        self.calls += 1
        loss = self.scale * embeddings.pow(2).mean()
        return loss * float("nan") if self.calls > 2 else loss
'''


@functools.lru_cache(maxsize=None)
def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    """One storage, so one connection pool, per database for all of a test's polling: a URL given
    to ``load_study`` builds a new engine each time, and ten polls a second would soon hold every
    connection the server allows."""
    return optuna.storages.RDBStorage(url)


def study_trials(storage: str, sweep: str, loss: str = LOSS) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=f"{sweep}/{loss}", storage=rdb_storage(storage))
    return study.get_trials(deepcopy=False)


def runs_of(client: MlflowClient, sweep: str, role: str | None = None) -> list:
    experiment = client.get_experiment_by_name(sweep)
    if experiment is None:
        return []
    query = f"tags.`tripletlab.role` = '{role}'" if role else ""
    return client.search_runs([experiment.experiment_id], filter_string=query, max_results=1000)


def running_trial_with_run(storage: str, sweep: str, client: MlflowClient, exclude_pid: int):
    """A RUNNING trial of a worker (not the leader) whose MLflow run is RUNNING too, or ``None``."""
    try:
        trials = study_trials(storage, sweep)
    except KeyError:  # the study is not created yet
        return None
    running = {
        t.number: t
        for t in trials
        if t.state == TrialState.RUNNING and t.user_attrs.get("worker_pid") not in (None, exclude_pid)
    }
    if not running:
        return None
    for run in runs_of(client, sweep, "trial"):
        number = int(run.data.tags.get("optuna.trial_number", -1))
        if run.info.status == "RUNNING" and number in running:
            return running[number]
    return None


def assert_nothing_running(storage: str, sweep: str, client: MlflowClient) -> None:
    states = [t.state for t in study_trials(storage, sweep)]
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states, states
    stuck = [(r.info.run_name, r.info.status) for r in runs_of(client, sweep) if r.info.status == "RUNNING"]
    assert not stuck, f"MLflow runs left RUNNING: {stuck}"


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _running(study: optuna.Study, host: str, pid: int) -> optuna.Trial:
    trial = study.ask({"loss.margin": optuna.distributions.FloatDistribution(0.01, 1.0)})
    for key, value in {"worker_host": host, "worker_pid": pid, "heartbeat": time.time()}.items():
        trial.set_user_attr(key, value)
    return trial


def test_database_liveness_asks_the_process_here_and_the_heartbeat_elsewhere(postgres_url):
    GRACE = 4  # seconds
    storage = open_storage(postgres_url, heartbeat_interval=1, grace_period=GRACE)
    study = optuna.create_study(study_name="liveness", storage=storage, direction="maximize")
    here = socket.gethostname()
    silent = _running(study, "another-machine", 4242)
    storage.record_heartbeat(silent._trial_id)
    time.sleep(GRACE + 1)  # older than the grace period
    beating = _running(study, "another-machine", 4242)
    storage.record_heartbeat(beating._trial_id)
    dead = _running(study, here, _dead_pid())  # no heartbeat yet, but its process is gone
    alive = _running(study, here, os.getpid())
    orphan = _running(study, here, _dead_pid())
    assert fail_for_retry(storage, study.trials[orphan.number], "stale: test")  # its recoverer died here

    storage.record_heartbeat(beating._trial_id)  # fresh however long the set-up took on a loaded machine
    assert recover_stale_trials(study, storage, grace_period=GRACE) == [silent.number, dead.number]
    by_number = {t.number: t for t in study.get_trials()}
    assert (
        f"no heartbeat from its worker (pid 4242 on another-machine) for over {GRACE}s"
        in by_number[silent.number].user_attrs["fail_reason"]
    )
    assert "exited without finishing it" in by_number[dead.number].user_attrs["fail_reason"]
    assert by_number[beating.number].state == by_number[alive.number].state == TrialState.RUNNING
    waiting = [t for t in by_number.values() if t.state == TrialState.WAITING]
    retried = sorted(t.system_attrs["retry_history"][0] for t in waiting)
    assert retried == [silent.number, dead.number, orphan.number]
    assert len(budget_trials(study)) == 5
    storage.record_heartbeat(beating._trial_id)
    assert recover_stale_trials(study, storage, grace_period=GRACE) == []
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 3, "a retry was queued twice"


def final_runs_of(client: MlflowClient, sweep: str) -> list:
    return [r for r in runs_of(client, sweep, "final") if r.info.status == "FINISHED"]


def test_sigkill_in_mid_trial_fails_the_trial_retries_it_and_resumes(mlflow_server, postgres_url, tmp_path):
    sweep, trials = "killed", 4
    client = MlflowClient(tracking_uri=mlflow_server.url)
    command = sweep_command(
        sweep,
        postgres_url,
        mlflow_server.url,
        tmp_path / "runs",
        workers=2,
        trials=trials,
        extra=[*LONGER_TRIAL, *DEFAULT_GRACE],
    )
    log = tmp_path / "sweep.log"
    leader = start_sweep(command, log)
    try:
        victim = wait_for(
            lambda: running_trial_with_run(postgres_url, sweep, client, leader.pid),
            240,
            "a worker in the middle of a trial",
            leader,
            log,
            interval=0.1,
        )
        os.kill(victim.user_attrs["worker_pid"], signal.SIGKILL)
        code = finish(leader, log)
    finally:
        kill_group(leader)
    # The command reports the lost worker, and has already failed its trial (its process is gone:
    # no wait for the 600 s grace period) and retried it before the final run.
    assert code != 0 and "re-run the same command to resume" in log.read_text()
    assert len(final_runs_of(client, sweep)) == 1
    assert_nothing_running(postgres_url, sweep, client)

    # Re-run at once, one worker (the machine that lost its worker): nothing is left to do.
    restart_log = tmp_path / "restart.log"
    restart = [*command[: command.index("--workers") + 1], "1", *command[command.index("--workers") + 2 :]]
    assert finish(start_sweep(restart, restart_log), restart_log) == 0, restart_log.read_text()[-3000:]
    assert not re.search(r"\] trial \d+", restart_log.read_text()), "the re-run ran trials again"
    assert len(final_runs_of(client, sweep)) == 1

    by_number = {t.number: t for t in study_trials(postgres_url, sweep)}
    assert by_number[victim.number].state == TrialState.FAIL
    retries = [t for t in by_number.values() if t.system_attrs.get("failed_trial") == victim.number]
    assert [t.state for t in retries] == [TrialState.COMPLETE], (
        "the killed trial was not retried to completion"
    )
    assert retries[0].params == victim.params
    complete = [t for t in by_number.values() if t.state == TrialState.COMPLETE]
    assert len(complete) == trials
    assert len(by_number) == trials + 1, {n: t.state for n, t in by_number.items()}

    runs = runs_of(client, sweep, "trial")
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert sorted(int(r.data.tags["optuna.trial_number"]) for r in finished) == sorted(
        t.number for t in complete
    )
    assert retries[0].user_attrs["mlflow_run_id"] in {r.info.run_id for r in finished}
    killed_runs = [r for r in runs if r.data.tags["optuna.trial_number"] == str(victim.number)]
    assert len(killed_runs) == 1
    assert killed_runs[0].info.status in ("FAILED", "KILLED"), "the dead worker's run was left RUNNING"
    assert "worker lost" in killed_runs[0].data.tags["tripletlab.error"]
    assert_nothing_running(postgres_url, sweep, client)


def test_final_runs_wait_for_a_live_worker_and_take_over_its_trial_when_it_dies(
    mlflow_server, postgres_url, tmp_path
):
    sweep, trials = "waits", 2
    client = MlflowClient(tracking_uri=mlflow_server.url)
    command = sweep_command(
        sweep,
        postgres_url,
        mlflow_server.url,
        tmp_path / "runs",
        workers=1,
        trials=trials,
        extra=DEFAULT_GRACE,
    )
    # Another worker of the same machine holds trial 0: a live process the test controls.
    holder = subprocess.Popen(["sleep", "600"])
    study = optuna.create_study(
        study_name=f"{sweep}/{LOSS}", storage=rdb_storage(postgres_url), direction="maximize"
    )
    _running(study, socket.gethostname(), holder.pid)
    log = tmp_path / "sweep.log"
    sweeping = start_sweep(command, log)
    try:
        line = (
            f"[{LOSS}] waiting for trials on live workers before the final runs: "
            f"trial 0 on {socket.gethostname()} (pid {holder.pid})"
        )
        wait_for(
            lambda: line in log.read_text(),
            240,
            "the line saying what the final runs wait for",
            sweeping,
            log,
        )
        time.sleep(2)  # still waiting: the trial's worker is alive
        assert sweeping.poll() is None and not runs_of(client, sweep, "final")
        holder.kill()
        holder.wait()
        code = finish(sweeping, log)
    finally:
        holder.kill()
        kill_group(sweeping)
    assert code == 0, log.read_text()[-3000:]

    by_number = {t.number: t for t in study_trials(postgres_url, sweep)}
    assert by_number[0].state == TrialState.FAIL
    assert "exited without finishing" in by_number[0].user_attrs["fail_reason"]
    [retry] = [t for t in by_number.values() if t.system_attrs.get("retry_history") == [0]]
    assert retry.state == TrialState.COMPLETE
    assert [t.state for t in by_number.values()].count(TrialState.COMPLETE) == trials
    [final] = final_runs_of(client, sweep)
    best = max((t for t in by_number.values() if t.state == TrialState.COMPLETE), key=lambda t: t.value)
    assert final.data.tags["tripletlab.best_trial"] == str(best.number)
    assert log.read_text().index(line) < log.read_text().index("final seed 1")
    assert_nothing_running(postgres_url, sweep, client)


def test_sigint_ends_trial_and_run_cleanly_and_the_study_resumes(mlflow_server, postgres_url, tmp_path):
    sweep, trials = "interrupted", 3
    client = MlflowClient(tracking_uri=mlflow_server.url)
    command = sweep_command(
        sweep,
        postgres_url,
        mlflow_server.url,
        tmp_path / "runs",
        workers=1,
        trials=trials,
        extra=LONGER_TRIAL,
    )
    log = tmp_path / "sweep.log"
    worker = start_sweep(command, log)  # one worker: the sweep process trains itself
    try:
        victim = wait_for(
            lambda: running_trial_with_run(postgres_url, sweep, client, exclude_pid=-1),
            240,
            "a trial in progress",
            worker,
            log,
            interval=0.1,
        )
        os.kill(worker.pid, signal.SIGINT)
        code = finish(worker, log, timeout=120)
    finally:
        kill_group(worker)
    assert code == 130, log.read_text()[-3000:]
    assert "interrupted" in log.read_text()

    trial = {t.number: t for t in study_trials(postgres_url, sweep)}[victim.number]
    assert trial.state == TrialState.FAIL
    run = next(
        r for r in runs_of(client, sweep, "trial") if r.data.tags["optuna.trial_number"] == str(victim.number)
    )
    assert run.info.status == "KILLED"
    assert "interrupt" in run.data.tags.get("tripletlab.error", "").lower()

    resume_log = tmp_path / "resume.log"
    assert finish(start_sweep(command, resume_log), resume_log) == 0, resume_log.read_text()[-3000:]
    by_number = {t.number: t.state for t in study_trials(postgres_url, sweep)}
    assert [n for n, state in by_number.items() if state != TrialState.COMPLETE] == [victim.number], by_number
    assert list(by_number.values()).count(TrialState.COMPLETE) == trials, (
        "the resumed study is not topped up exactly"
    )
    assert_nothing_running(postgres_url, sweep, client)


def test_lost_tracking_server_is_survived_or_reported(mlflow_server, postgres_url, tmp_path):
    sweep, trials = "lost-server", 4
    client = MlflowClient(tracking_uri=mlflow_server.url)
    command = sweep_command(
        sweep, postgres_url, mlflow_server.url, tmp_path / "runs", workers=1, trials=trials
    )
    log = tmp_path / "sweep.log"
    worker = start_sweep(command, log)
    try:
        wait_for(
            lambda: any(t.state == TrialState.COMPLETE for t in _trials_or_empty(postgres_url, sweep)),
            240,
            "the first complete trial",
            worker,
            log,
        )
        mlflow_server.stop()
        time.sleep(3)
        mlflow_server.start()  # same port, same store
        code = finish(worker, log)
    finally:
        kill_group(worker)
        if mlflow_server.process.poll() is not None:
            mlflow_server.start()

    trials_now = study_trials(postgres_url, sweep)
    assert TrialState.RUNNING not in [t.state for t in trials_now]
    for trial in trials_now:
        if trial.state == TrialState.FAIL:
            assert trial.user_attrs.get("fail_reason"), (
                f"trial {trial.number} failed without a recorded reason"
            )
    if code != 0:  # the worker gave up: the re-run completes the study
        resume_log = tmp_path / "resume.log"
        assert finish(start_sweep(command, resume_log), resume_log) == 0, resume_log.read_text()[-3000:]
    states = [t.state for t in study_trials(postgres_url, sweep)]
    assert states.count(TrialState.COMPLETE) + states.count(TrialState.FAIL) == len(states) >= trials
    assert_nothing_running(postgres_url, sweep, client)


def _trials_or_empty(storage: str, sweep: str) -> list:
    try:
        return study_trials(storage, sweep)
    except KeyError:
        return []


def test_nan_loss_fails_the_trial_with_its_reason_and_the_sweep_goes_on(
    mlflow_server, postgres_url, tmp_path
):
    sweep, trials = "nan", 2
    plugin = tmp_path / "nan_plugin.py"
    plugin.write_text(NAN_PLUGIN)
    command = sweep_command(
        sweep,
        postgres_url,
        mlflow_server.url,
        tmp_path / "runs",
        workers=1,
        trials=trials,
        extra=["losses=[nan_after_two_steps,batch_hard]", "dataset.max_per_class=40"],
    )
    command[command.index("sweep") + 1 : command.index("sweep") + 1] = ["--plugin", str(plugin)]
    log = tmp_path / "sweep.log"
    code = finish(start_sweep(command, log), log)
    assert code == 0, log.read_text()[-3000:]

    nan_trials = study_trials(postgres_url, sweep, "nan_after_two_steps")
    assert [t.state for t in nan_trials] == [TrialState.FAIL] * trials
    for trial in nan_trials:
        reason = trial.user_attrs["fail_reason"]
        assert "NonFiniteLossError" in reason and "non-finite" in reason, reason
    assert [t.state for t in study_trials(postgres_url, sweep, LOSS)] == [TrialState.COMPLETE] * trials

    client = MlflowClient(tracking_uri=mlflow_server.url)
    nan_runs = [
        r for r in runs_of(client, sweep, "trial") if r.info.run_name.startswith("nan_after_two_steps/")
    ]
    assert len(nan_runs) == trials
    for run in nan_runs:
        assert run.info.status == "FAILED"
        assert run.data.tags["tripletlab.trial_state"] == "failed"
        assert "non-finite" in run.data.tags["tripletlab.error"]
    assert (tmp_path / "runs" / sweep / "comparison.csv").exists()
    assert_nothing_running(postgres_url, sweep, client)
