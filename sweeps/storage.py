"""Where the Optuna studies live, how trials of a dead worker are failed and retried, and the locks
that keep the trial budget exact.

- Default: a journal file ``runs/<sweep>/optuna.journal`` (``JournalStorage(JournalFileBackend)``),
  Optuna's recommendation for several processes on one machine; a file lock guards the budget.
- ``--storage <SQLAlchemy URL>`` (``sqlite:///...``, ``postgresql://...``): :class:`SweepRDBStorage`
  with Optuna's heartbeat (``heartbeat_interval``, ``grace_period``), for several machines. With
  PostgreSQL a database-side advisory lock guards the budget of workers on every machine.

Every running trial records its worker (user attributes ``worker_host``, ``worker_pid`` and
``heartbeat``: Unix seconds, refreshed every epoch). :func:`recover_stale_trials` fails a running
trial whose worker process is gone (same host, any storage: at once) or whose heartbeat is older
than the grace period (Optuna's heartbeat table for an RDB storage, the ``heartbeat`` attribute for
a journal), and queues a retry with the same parameters. A retried trial carries the system
attribute ``retry_history`` (the original numbers) and the original stays FAIL;
:func:`budget_trials` leaves such originals out of the trial budget. A final retrain is claimed
per seed in a study user attribute (:data:`FINAL_CLAIM`), under the same lock and kept fresh by a
:class:`Heartbeat`, so that each seed runs once however many machines finish the sweep.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import os
import socket
import threading
import time
import warnings
from pathlib import Path
from typing import Callable

import optuna
import sqlalchemy
from optuna.storages import JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from experiments.tracking.secrets import mask_secrets

JOURNAL_NAME = "optuna.journal"
WORKER_ATTRS = ("worker_host", "worker_pid", "heartbeat", "fail_reason", "mlflow_run_id", "retry")
FINAL_CLAIM = "tripletlab.final_claim.{seed}"  # study user attribute: who runs that final seed


def default_storage(sweep_dir: Path) -> str:
    """The journal file the sweep in ``sweep_dir`` uses unless ``--storage`` names another."""
    return str(Path(sweep_dir) / JOURNAL_NAME)


def is_url(storage: str) -> bool:
    return "://" in storage


class SweepRDBStorage(RDBStorage):
    """``RDBStorage`` as sweeps use it: pooled connections are checked before use (a restarted
    database is reconnected to), the heartbeat thread outlives a database outage, and stale trials
    are failed only by :func:`recover_stale_trials`, which records why and queues the retry under
    the budget lock (Optuna's own check inside ``optimize`` is turned off)."""

    def record_heartbeat(self, trial_id: int) -> None:
        try:
            super().record_heartbeat(trial_id)
        except Exception:  # the database is briefly away: the next beat tries again
            pass

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        return []

    def silent_trial_ids(self, study_id: int) -> set[int]:
        """Running trials whose heartbeat is older than the grace period (the database's clock)."""
        return set(super()._get_stale_trial_ids(study_id))


def open_storage(
    storage: str, heartbeat_interval: int = 60, grace_period: int = 600
) -> optuna.storages.BaseStorage:
    """A journal file storage for a path, a :class:`SweepRDBStorage` with heartbeat for a SQLAlchemy URL."""
    if not is_url(storage):
        Path(storage).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(storage)))
    if storage.startswith(("redis://", "rediss://")):
        raise ValueError(
            "--storage takes a SQLAlchemy URL (sqlite:///..., postgresql://...) or a journal "
            "file path; Redis is not supported"
        )
    with warnings.catch_warnings():  # the heartbeat API is stable in use but still flagged experimental
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        try:
            return SweepRDBStorage(
                storage,
                engine_kwargs={"pool_pre_ping": True},
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
            )
        except Exception as exc:  # SQLAlchemy: bad URL, missing driver, unreachable server, ...
            raise ValueError(
                f"cannot open the Optuna storage {mask_secrets(storage)}: "
                f"{mask_secrets(str(exc)).splitlines()[0]}"
            ) from None


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


def worker_identity() -> dict[str, object]:
    """This process as a worker: its host name and pid."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def mark_worker(trial: optuna.Trial) -> None:
    """Record this process as the trial's worker, with a fresh heartbeat."""
    me = worker_identity()
    trial.set_user_attr("worker_host", me["host"])
    trial.set_user_attr("worker_pid", me["pid"])
    trial.set_user_attr("heartbeat", time.time())


def beat(trial: optuna.Trial) -> None:
    trial.set_user_attr("heartbeat", time.time())


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_reason(
    trial: FrozenTrial, grace_period: float, now: float | None = None, silent: bool | None = None
) -> str | None:
    """Why the running ``trial`` is stale, or ``None`` while its worker looks alive.

    On the worker's own machine its process is asked: gone means stale at once. Otherwise the
    heartbeat decides: ``silent`` is the storage's own verdict where it keeps a heartbeat (RDB:
    older than ``grace_period``), ``None`` where it keeps none (journal: the ``heartbeat`` attribute
    of a worker on another machine is compared with ``grace_period``).
    """
    now = time.time() if now is None else now
    attrs = trial.user_attrs
    host, pid = attrs.get("worker_host"), attrs.get("worker_pid")
    local = host == socket.gethostname() and isinstance(pid, int)
    if local and not process_alive(pid):
        return f"its worker (pid {pid} on {host}) exited without finishing it"
    if silent:
        return f"no heartbeat from its worker (pid {pid} on {host}) for over {grace_period:.0f}s"
    beat_at = attrs.get("heartbeat")
    if beat_at is None:
        started = trial.datetime_start.timestamp() if trial.datetime_start else now
        if now - started > grace_period:
            return f"no heartbeat since it started {now - started:.0f}s ago"
        return None
    if local or silent is not None:
        return None
    if now - float(beat_at) > grace_period:
        return f"no heartbeat from its worker (pid {pid} on {host}) for {now - float(beat_at):.0f}s"
    return None


def enqueue_retry(study: optuna.Study, trial: FrozenTrial) -> None:
    """Queue ``trial``'s parameters again, as ``RetryHeartbeatStaleTrialCallback`` does (without the
    worker attributes), so :func:`budget_trials` counts the retry instead of ``trial``."""
    history = [*trial.system_attrs.get("retry_history", []), trial.number]
    user_attrs = {k: v for k, v in trial.user_attrs.items() if k not in WORKER_ATTRS}
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING,
            params=trial.params,
            distributions=trial.distributions,
            user_attrs=user_attrs,
            system_attrs={
                **copy.deepcopy(trial.system_attrs),
                "failed_trial": history[0],
                "retry_history": history,
            },
        )
    )


def fail_for_retry(storage: optuna.storages.BaseStorage, trial: FrozenTrial, reason: str) -> bool:
    """Fail the running ``trial`` with ``reason``, marked (user attribute ``retry``) for
    :func:`recover_stale_trials` to queue its retry; ``False`` if it had finished meanwhile."""
    try:
        storage.set_trial_user_attr(trial._trial_id, "fail_reason", reason)
        storage.set_trial_user_attr(trial._trial_id, "retry", True)
        storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another process got there first (or the worker finished it after all)
    return True


def recover_stale_trials(
    study: optuna.Study, storage: optuna.storages.BaseStorage, grace_period: float
) -> list[int]:
    """Fail the stale running trials of ``study`` and queue their retries; returns their numbers.

    ``storage`` is the one the study was opened with. Call it holding the budget lock: it also
    queues the missing retry of a trial failed for retry by a process that died before queueing it.
    """
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    silent = None
    if running and isinstance(storage, SweepRDBStorage):
        silent = storage.silent_trial_ids(study._study_id)
    recovered = []
    for trial in running:
        quiet = None if silent is None else trial._trial_id in silent
        reason = stale_reason(trial, grace_period, silent=quiet)
        if reason is not None and fail_for_retry(storage, trial, f"stale: {reason}; retried"):
            recovered.append(trial.number)
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    for trial in trials:
        if trial.state == TrialState.FAIL and trial.user_attrs.get("retry") and trial.number not in retried:
            enqueue_retry(study, trial)
    return recovered


class ExclusiveStep:
    """A lock taken and released many times, also usable as ``with lock:``."""

    def acquire(self) -> None:
        raise NotImplementedError

    def release(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class BudgetLock(ExclusiveStep):
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


class AdvisoryLock(ExclusiveStep):
    """The same step as :class:`BudgetLock` for workers on any number of machines: a PostgreSQL
    session advisory lock, held on a connection of its own. PostgreSQL drops it when that
    connection goes, so a killed worker never leaves it held."""

    def __init__(self, engine: sqlalchemy.Engine, name: str) -> None:
        self.engine = engine
        self.key = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "big", signed=True)
        self._conn = None

    def acquire(self) -> None:
        conn = self.engine.connect()
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(:key)"), {"key": self.key})
            conn.commit()
        except BaseException:
            conn.invalidate()  # a lock granted as the wait was interrupted goes with the connection
            conn.close()
            raise
        self._conn = conn

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            conn.commit()
        except Exception:
            conn.invalidate()  # closing the session releases the lock just as well
        finally:
            conn.close()


def budget_lock(storage: optuna.storages.BaseStorage, path: Path, name: str) -> ExclusiveStep:
    """The lock around "count, then ask" of sweep ``name``: database-side for PostgreSQL (workers
    on several machines), else a file lock at ``path`` (workers on one machine)."""
    if isinstance(storage, RDBStorage) and storage.engine.dialect.name == "postgresql":
        return AdvisoryLock(storage.engine, f"tripletlab sweep {name}")
    return BudgetLock(path)


def final_claim(study: optuna.Study, seed: int) -> dict | None:
    """Who runs final seed ``seed`` of ``study``'s loss: ``host``, ``pid``, ``heartbeat``, ``best_trial``."""
    return study.user_attrs.get(FINAL_CLAIM.format(seed=seed))


def claim_alive(claim: dict | None, grace_period: float, now: float | None = None) -> bool:
    """Whether the claim's worker is still at it: its process on this machine, its heartbeat elsewhere."""
    if not claim or "host" not in claim:
        return False
    if claim["host"] == socket.gethostname():
        return process_alive(claim["pid"])
    return (time.time() if now is None else now) - claim["heartbeat"] <= grace_period


def set_final_claim(
    study: optuna.Study, seed: int, best_trial: int | None, failed: str | None = None
) -> None:
    """Claim final seed ``seed`` of ``best_trial`` for this process, or record that its run
    ``failed``; ``best_trial=None`` gives the seed up. Hold the budget lock."""
    claim = None
    if best_trial is not None:
        claim = {"failed": failed} if failed else {**worker_identity(), "heartbeat": time.time()}
        claim["best_trial"] = best_trial
    study.set_user_attr(FINAL_CLAIM.format(seed=seed), claim)


class Heartbeat:
    """Calls ``beat()`` every ``interval`` seconds in a thread while the ``with`` block runs; a
    failed beat (the storage briefly away) is skipped."""

    def __init__(self, beat: Callable[[], None], interval: float) -> None:
        self.beat, self.interval = beat, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception:
                pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
