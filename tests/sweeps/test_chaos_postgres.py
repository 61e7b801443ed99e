"""Chaos on real servers: one sweep on two "machines" (the second a process with another host name,
``unshare --uts``) sharing a PostgreSQL study and an ``mlflow server``; 3 workers in all. Random
SIGKILLs hit workers and commands, each killed command is started again until it exits 0, and
PostgreSQL and the tracking server are each restarted mid-sweep. The end state must be exact."""

from __future__ import annotations

import functools
import os
import random
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from helpers.mlflow_server_fixture import log_tail, start_sweep, sweep_command
from sweeps.storage import budget_trials, claim_alive, final_claim

pytestmark = pytest.mark.postgres

LOSSES = ("batch_hard", "multi_similarity")
TRIALS, SEEDS = 4, 2
KILLS = 6
OTHER_HOST = "chaos-machine-b"
# Trials of a few seconds (two epochs), so that most kills land in the middle of one.
EXTRA = [f"losses=[{','.join(LOSSES)}]", f"seeds={SEEDS}", "epochs=2", "dataset.max_per_class=30"]
DEADLINE = 420  # seconds for the whole sweep, kills and restarts included
STARTING = 6  # seconds after a start in which a command is left alone: it is still importing


def _can_unshare() -> str | None:
    """Why a process cannot get a host name of its own here, or ``None`` when it can."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return "needs root and unshare(1) to give the second machine its own host name"
    probe = subprocess.run(["unshare", "--uts", "true"], capture_output=True, text=True)
    return None if probe.returncode == 0 else f"unshare --uts is not permitted here: {probe.stderr.strip()}"


def _group_pids(pgids: set[int]) -> list[int]:
    """Live (not zombie) processes in any of the process groups ``pgids``."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) in pgids:
            pids.append(int(entry.name))
    return pids


@dataclass
class Machine:
    """One machine's sweep command, started again whenever it exits non-zero."""

    name: str
    command: list[str]
    log: Path
    process: subprocess.Popen | None = None
    groups: set[int] = field(default_factory=set)  # every start's process group (orphaned workers too)
    starts: int = 0
    started_at: float = 0.0
    done: bool = False

    def start(self) -> None:
        self.starts += 1
        self.started_at = time.monotonic()
        with open(self.log, "a") as out:
            out.write(f"\n=== start {self.starts} of {self.name} ===\n")
        self.process = start_sweep(self.command, self.log)
        self.groups.add(self.process.pid)

    def poll(self) -> None:
        """Start the command again if it exited non-zero; mark the machine done at exit 0."""
        if self.done or self.process.poll() is None:
            return
        if self.process.returncode == 0:
            self.done = True
        else:
            self.start()

    def pids(self) -> list[int]:
        return _group_pids(self.groups)

    def kill_all(self) -> None:
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process is not None:
            self.process.wait()


@functools.lru_cache(maxsize=None)
def rdb_storage(url: str) -> optuna.storages.RDBStorage:
    return optuna.storages.RDBStorage(url, engine_kwargs={"pool_pre_ping": True})


def busy_workers(url: str, sweep: str) -> set[int]:
    """Pids of processes running a trial or claiming a final seed right now (empty while the
    database is away)."""
    pids = set()
    try:
        for loss in LOSSES:
            study = optuna.load_study(study_name=f"{sweep}/{loss}", storage=rdb_storage(url))
            running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            pids |= {t.user_attrs["worker_pid"] for t in running if "worker_pid" in t.user_attrs}
            claims = [final_claim(study, seed) for seed in range(1, SEEDS + 1)]
            pids |= {c["pid"] for c in claims if claim_alive(c, grace_period=3)}
    except Exception:  # noqa: BLE001 - not created yet, or PostgreSQL is restarting
        pass
    return pids


def trial_started(url: str, sweep: str) -> bool:
    try:
        study = optuna.load_study(study_name=f"{sweep}/{LOSSES[0]}", storage=rdb_storage(url))
        return bool(study.get_trials(deepcopy=False))
    except Exception:  # noqa: BLE001
        return False


def restart_in_background(name: str, restart, events: list[str], start: float) -> threading.Thread:
    """Run ``restart()`` in a thread (the kills and restarts of commands go on meanwhile)."""

    def run() -> None:
        restart()
        events.append(f"{time.monotonic() - start:.0f}s {name} back")

    events.append(f"{time.monotonic() - start:.0f}s {name} restarting")
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def restart_tracking(tracking) -> None:
    tracking.stop()
    time.sleep(2)
    tracking.start()


def run_chaos(machines: list[Machine], url: str, sweep: str, restart_postgres, tracking) -> dict:
    """Start the machines, then kill at random until ``KILLS`` kills; restart PostgreSQL after the
    second kill and the tracking server after the fourth; return what happened."""
    rng = random.Random(15)
    for machine in machines:
        machine.start()
    start = time.monotonic()
    events, kills, next_kill, restarts = [], 0, None, []
    while not all(m.done for m in machines):
        elapsed = time.monotonic() - start
        if elapsed > DEADLINE:
            tails = "\n".join(f"--- {m.name}:\n{log_tail(m.log, 30)}" for m in machines)
            pytest.fail(f"the sweep did not finish within {DEADLINE}s ({events}); logs end:\n{tails}")
        for machine in machines:
            machine.poll()
        if next_kill is None and trial_started(url, sweep):
            next_kill = elapsed + rng.uniform(1, 3)
        if kills < KILLS and next_kill is not None and elapsed >= next_kill:
            settled = [m for m in machines if not m.done and time.monotonic() - m.started_at > STARTING]
            alive = {pid: m for m in settled for pid in m.pids()}
            busy = sorted(busy_workers(url, sweep) & alive.keys())
            if not busy and elapsed < next_kill + 3:  # most kills should land in a trial or a final run
                time.sleep(0.2)
                continue
            pool = busy if busy and rng.random() < 0.7 else sorted(alive)
            if pool:
                victim = rng.choice(pool)
                os.kill(victim, signal.SIGKILL)
                kills += 1
                busy_mark = " (busy)" if victim in busy else ""
                events.append(f"{elapsed:.0f}s kill {alive[victim].name}:{victim}{busy_mark}")
            next_kill = elapsed + rng.uniform(3, 6)
            if kills == 2 and not restarts:
                restarts.append(
                    restart_in_background("postgres", lambda: restart_postgres(2.0), events, start)
                )
            elif kills == 4 and len(restarts) == 1:
                restarts.append(
                    restart_in_background(
                        "tracking server", lambda: restart_tracking(tracking), events, start
                    )
                )
        time.sleep(0.2)
    for thread in restarts:
        thread.join()
    return {
        "kills": kills,
        "events": events,
        "starts": {m.name: m.starts for m in machines},
        "seconds": round(time.monotonic() - start),
    }


def test_random_kills_and_server_restarts_end_in_the_exact_state(
    mlflow_server, restartable_postgres, tmp_path
):
    reason = _can_unshare()
    if reason:
        pytest.skip(reason)
    sweep = "chaos"
    url = restartable_postgres.server.create_database()

    def command(machine: str, workers: int) -> list[str]:
        return sweep_command(
            sweep,
            url,
            mlflow_server.url,
            tmp_path / machine / "runs",
            workers=workers,
            trials=TRIALS,
            extra=EXTRA,
        )

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    other = ["unshare", "--uts", "sh", "-c", f'hostname {OTHER_HOST} && exec "$@"', "sh", *command("b", 1)]
    machines = [
        Machine("a", command("a", 2), tmp_path / "a" / "sweep.log"),
        Machine("b", other, tmp_path / "b" / "sweep.log"),
    ]
    try:
        outcome = run_chaos(machines, url, sweep, restartable_postgres.restart, mlflow_server)
    finally:
        for machine in machines:
            machine.kill_all()
    waits = {m.name: m.log.read_text().count("waiting for") for m in machines}
    print(f"chaos: {outcome}, progress lines while waiting: {waits}")
    assert outcome["kills"] >= 5, outcome

    client = MlflowClient(tracking_uri=mlflow_server.url)
    experiment = client.get_experiment_by_name(sweep)
    runs = client.search_runs([experiment.experiment_id], max_results=5000)
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"], "MLflow runs left RUNNING"
    hosts = set()
    for loss in LOSSES:
        study = optuna.load_study(study_name=f"{sweep}/{loss}", storage=rdb_storage(url))
        trials = study.get_trials(deepcopy=False)
        assert sorted(t.number for t in trials) == list(range(len(trials)))
        assert not [t.number for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        counted = budget_trials(study)
        assert len(counted) == TRIALS, [(t.number, t.state.name) for t in trials]
        assert [t.state for t in counted] == [TrialState.COMPLETE] * TRIALS, [
            (t.number, t.state.name, t.user_attrs.get("fail_reason")) for t in trials
        ]
        counted_numbers = {t.number for t in counted}
        for trial in trials:
            if trial.number not in counted_numbers:
                assert trial.state == TrialState.FAIL and "retried" in trial.user_attrs["fail_reason"], trial
        hosts |= {t.user_attrs["worker_host"] for t in trials if "worker_host" in t.user_attrs}
        print(
            f"{loss}: "
            + "; ".join(
                f"{t.number} {t.state.name} {t.user_attrs.get('worker_host')} "
                f"{t.user_attrs.get('fail_reason', '')}".strip()
                for t in trials
            )
        )

        trial_runs = [
            r
            for r in runs
            if r.data.tags.get("tripletlab.role") == "trial"
            and r.data.tags["optuna.study_name"] == study.study_name
        ]
        numbers = [r.data.tags["optuna.trial_number"] for r in trial_runs]
        assert len(numbers) == len(set(numbers)), f"two runs for one trial number: {sorted(numbers)}"
        by_id = {r.info.run_id: r for r in trial_runs}
        for trial in counted:
            run = by_id[trial.user_attrs["mlflow_run_id"]]
            assert run.info.status == "FINISHED" and run.data.tags["tripletlab.trial_state"] == "complete"

        [parent] = [
            r
            for r in runs
            if r.data.tags.get("tripletlab.role") == "parent" and r.data.tags["tripletlab.loss"] == loss
        ]
        assert parent.info.status == "FINISHED"
        best = study.best_trial
        finals = [
            r
            for r in runs
            if r.data.tags.get("tripletlab.role") == "final"
            and r.info.status == "FINISHED"
            and r.data.tags.get("mlflow.parentRunId") == parent.info.run_id
        ]
        assert sorted(int(r.data.tags["tripletlab.seed"]) for r in finals) == list(range(1, SEEDS + 1)), [
            (r.data.tags["tripletlab.seed"], r.data.tags["tripletlab.best_trial"]) for r in finals
        ]
        for run in finals:
            assert run.data.tags["tripletlab.best_trial"] == str(best.number)
            assert {k: run.data.params[k] for k in best.params} == {k: str(v) for k, v in best.params.items()}
    # Both machines drew trials from the shared study (random kills may leave one with no finished trial).
    assert OTHER_HOST in hosts and len(hosts) == 2, f"the trials did not run on both machines: {hosts}"
