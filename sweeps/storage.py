"""Where the Optuna studies live, and how trials of a dead worker are failed and retried.

- Default: a journal file ``runs/<sweep>/optuna.journal`` (``JournalStorage(JournalFileBackend)``),
  Optuna's recommendation for several processes on one machine. It has no heartbeat, so each
  running trial records one itself (user attributes ``worker_host``, ``worker_pid``,
  ``heartbeat``: Unix seconds, refreshed every epoch); :func:`recover_stale_trials` fails a
  running trial whose worker process is gone (same host) or, from another host, whose heartbeat
  is older than the grace period, and enqueues a retry with the same parameters.
- ``--storage <SQLAlchemy URL>`` (``sqlite:///...``, ``postgresql://...``): ``RDBStorage`` with
  Optuna's own heartbeat (``heartbeat_interval``, ``grace_period``) and
  ``RetryHeartbeatStaleTrialCallback``, for several machines.

Either way a retried trial carries the system attribute ``retry_history`` (the original numbers),
and the original stays FAIL; :func:`budget_trials` leaves such originals out of the trial budget.
"""
from __future__ import annotations

import copy
import fcntl
import os
import socket
import time
import warnings
from pathlib import Path

import optuna
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from experiments.tracking import mask_secrets

JOURNAL_NAME = "optuna.journal"
WORKER_ATTRS = ("worker_host", "worker_pid", "heartbeat", "fail_reason", "mlflow_run_id")


def default_storage(sweep_dir: Path) -> str:
    """The journal file the sweep in ``sweep_dir`` uses unless ``--storage`` names another."""
    return str(Path(sweep_dir) / JOURNAL_NAME)


def is_url(storage: str) -> bool:
    return "://" in storage


def open_storage(storage: str, heartbeat_interval: int = 60, grace_period: int = 600) -> optuna.storages.BaseStorage:
    """A journal file storage for a path, an ``RDBStorage`` with heartbeat for a SQLAlchemy URL."""
    if not is_url(storage):
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(storage)))
    if storage.startswith(("redis://", "rediss://")):
        raise ValueError("--storage takes a SQLAlchemy URL (sqlite:///..., postgresql://...) or a journal file path; "
                         "Redis is not supported")
    with warnings.catch_warnings():  # the heartbeat API is stable in use but still flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return RDBStorage(
                storage, heartbeat_interval=heartbeat_interval, grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(),
            )
        except Exception as exc:  # SQLAlchemy: bad URL, missing driver, unreachable server, ...
            raise ValueError(f"cannot open the Optuna storage {mask_secrets(storage)}: "
                             f"{mask_secrets(str(exc)).splitlines()[0]}") from None


def is_retried(trial: FrozenTrial, retried_numbers: set[int]) -> bool:
    return trial.state == TrialState.FAIL and trial.number in retried_numbers


def retried_numbers(trials: list[FrozenTrial]) -> set[int]:
    """Numbers of trials some later trial retries (from the ``retry_history`` system attribute)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def budget_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that count toward the budget: all of them except failed originals that were retried."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return [t for t in trials if not is_retried(t, retried)]


def mark_worker(trial: optuna.Trial) -> None:
    """Record this process as the trial's worker, with a fresh heartbeat."""
    trial.set_user_attr("worker_host", socket.gethostname())
    trial.set_user_attr("worker_pid", os.getpid())
    trial.set_user_attr("heartbeat", time.time())


def beat(trial: optuna.Trial) -> None:
    trial.set_user_attr("heartbeat", time.time())


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(trial: FrozenTrial, grace_period: float, now: float | None = None) -> str | None:
    """Why the running ``trial`` is stale, or ``None`` while its worker looks alive."""
    now = time.time() if now is None else now
    attrs = trial.user_attrs
    beat_at = attrs.get("heartbeat")
    if beat_at is None:
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        if now - started > grace_period:
            return f"no heartbeat since it started {now - started:.0f}s ago"
        return None
    host, pid = attrs.get("worker_host"), attrs.get("worker_pid")
    if host == socket.gethostname() and isinstance(pid, int):  # same machine: ask the process itself
        return None if _process_alive(pid) else f"its worker (pid {pid} on {host}) exited without finishing it"
    if now - float(beat_at) > grace_period:
        return f"no heartbeat from its worker (pid {pid} on {host}) for {now - float(beat_at):.0f}s"
    return None


def enqueue_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue ``trial``'s parameters again, as ``RetryHeartbeatStaleTrialCallback`` does (without the
    worker attributes), so :func:`budget_trials` counts the retry instead of ``trial``."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in WORKER_ATTRS}
    study.add_trial(optuna.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        user_attrs=user_attrs,
        system_attrs={**copy.deepcopy(trial.system_attrs), "failed_trial": history[0], "retry_history": history},
    ))


def recover_stale_trials(study: optuna.Study, storage: optuna.storages.BaseStorage, grace_period: float) -> list[int]:
    """Fail the stale running trials of ``study`` and queue their retries; returns their numbers.

    ``storage`` is the one the study was opened with: an ``RDBStorage`` uses Optuna's heartbeat
    check, a journal file the worker attributes.
    """
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    if not running:
        return []
    if isinstance(storage, RDBStorage):
        fail_stale_trials(study)
        retried = retried_numbers(study.get_trials(deepcopy=False))
        return sorted(running & retried)
    recovered = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        reason = stale_reason(trial, grace_period)
        if reason is None:
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", f"stale: {reason}; retried")
            storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process got there first (or the worker finished it after all)
        enqueue_retry(study, trial)
        recovered.append(trial.number)
    return recovered


class BudgetLock:
    """An exclusive file lock held from "is there budget left?" until the next trial exists.

    Taking the lock, counting the trials and asking Optuna for a new one happen as one step, so
    several workers on one machine start exactly the budgeted number of trials.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._file = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        fcntl.flock(self._file, fcntl.LOCK_EX)

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None

    def __enter__(self) -> "BudgetLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
