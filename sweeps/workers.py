"""Worker processes: several trials at once, sharing the Optuna storage and the MLflow store.

On CPU the default is one worker using every core (run in the calling process). On GPUs the
default is ``trials_per_gpu`` workers per visible GPU, each pinned to one GPU with
``CUDA_VISIBLE_DEVICES``. Each worker is ``python -m sweeps.workers SPEC INDEX``: it loads the
sweep's plugins, then tunes every loss in turn (``tune`` phase) or runs its share of the final
retrains (``final`` phase).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from mlflow import MlflowClient

from .context import SweepContext
from .storage import (
    Heartbeat,
    budget_lock,
    claim_alive,
    final_claim,
    open_storage,
    set_final_claim,
    worker_identity,
)

STORAGE_ENV = "TRIPLETLAB_SWEEP_STORAGE"


@dataclass(frozen=True)
class WorkerSlot:
    index: int
    env: dict[str, str]  # CUDA_VISIBLE_DEVICES, thread counts


def visible_gpus(device: str) -> list[str]:
    """GPU ids workers may be spread over: none for CPU/MPS or an explicit ``cuda:N``."""
    if device not in ("auto", "cuda"):
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed:
        return [g.strip() for g in listed.split(",") if g.strip()]
    return [str(i) for i in range(torch.cuda.device_count())]


def plan_workers(
    requested: int | None, device: str, trials_per_gpu: int, cpus: int | None = None
) -> list[WorkerSlot]:
    """One slot per worker: how many (``requested`` or the device default) and each one's environment."""
    if requested is not None and requested < 1:
        raise ValueError(f"--workers must be >= 1, got {requested}")
    gpus = visible_gpus(device)
    count = requested or (len(gpus) * trials_per_gpu if gpus else 1)
    threads = str(max(1, (cpus or os.cpu_count() or 1) // count))
    slots = []
    for index in range(count):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
        slots.append(WorkerSlot(index, env))
    return slots


def tune_all(ctx: SweepContext, storage: optuna.storages.BaseStorage, worker_index: int) -> None:
    from .study import tune

    for loss in ctx.sweep.losses:
        tune(ctx, loss, storage, worker_index)


def _claimed_elsewhere(claim: dict | None, best: int, grace_period: float) -> bool:
    """Whether another live worker is running this final seed of best trial ``best``."""
    if not claim or claim.get("best_trial") != best:
        return False
    me = worker_identity()
    mine = (claim.get("host"), claim.get("pid")) == (me["host"], me["pid"])
    return not mine and claim_alive(claim, grace_period)


def run_finals(
    ctx: SweepContext,
    storage: optuna.storages.BaseStorage,
    tasks: list[tuple[str, int]],
    retry_failed: bool = True,
) -> list[tuple[str, int]]:
    """Run each (loss, seed) retrain that is neither done nor claimed by a live worker (on any
    machine), claiming it first; returns the tasks live workers elsewhere are running.

    A claim (study user attribute, see :func:`sweeps.storage.final_claim`) is taken under the
    budget lock and kept fresh by a heartbeat; it is given up when the run ends, or marked failed
    when it failed (``retry_failed=False`` leaves such seeds alone).
    """
    from .final import best_trial, final_runs, run_final
    from .tracking import end_orphaned_final_runs

    lock = budget_lock(storage, ctx.lock_path, ctx.sweep.name)
    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    elsewhere = []
    for loss, seed in tasks:
        study = optuna.load_study(study_name=ctx.study_name(loss), storage=storage)
        best = best_trial(study).number
        with lock:
            end_orphaned_final_runs(ctx, loss, study)
            claim = final_claim(study, seed)
            if seed in final_runs(ctx, client, loss, best):
                continue
            if _claimed_elsewhere(claim, best, ctx.sweep.grace_period):
                elsewhere.append((loss, seed))
                continue
            if claim and claim.get("failed") and claim.get("best_trial") == best and not retry_failed:
                continue
            set_final_claim(study, seed, best)
        outcome = None
        try:
            with Heartbeat(lambda: set_final_claim(study, seed, best), ctx.sweep.heartbeat_interval):
                outcome = run_final(ctx, storage, loss, seed)
        finally:
            with lock:
                set_final_claim(study, seed, None if outcome is None else best, failed=outcome)
    return elsewhere


def finish_finals(
    ctx: SweepContext, storage: optuna.storages.BaseStorage, tasks: list[tuple[str, int]]
) -> None:
    """After the final phase: run here the retrains a dead worker left, wait for those running on
    live workers elsewhere (with a line naming them), and take over any whose worker dies."""
    poll = max(0.5, min(5.0, ctx.sweep.heartbeat_interval))
    shown = None
    while True:
        tasks = run_finals(ctx, storage, tasks, retry_failed=False)
        if not tasks:
            return
        if tasks != shown:
            print(
                "waiting for final runs on live workers: "
                + ", ".join(f"{loss} seed {seed}" for loss, seed in tasks),
                flush=True,
            )
            shown = tasks
        time.sleep(poll)


def run_phase(
    ctx: SweepContext,
    phase: str,
    slots: list[WorkerSlot],
    storage: optuna.storages.BaseStorage,
    tasks: list[tuple[str, int]] = (),
) -> list[int]:
    """Run ``phase`` (``tune`` or ``final``) on ``slots``; returns the indices of workers that failed.

    A single worker runs in this process; several run as subprocesses sharing the storage.
    """
    if len(slots) == 1:
        if phase == "tune":
            tune_all(ctx, storage, 0)
        else:
            run_finals(ctx, storage, list(tasks))
        return []
    spec_path = ctx.sweep_dir / f"worker-{phase}.json"
    # the storage URL may hold a password: it is passed in the environment instead
    context = {**json.loads(ctx.to_json()), "storage": ""}
    spec_path.write_text(
        json.dumps(
            {"phase": phase, "workers": len(slots), "tasks": list(map(list, tasks)), "context": context}
        )
    )
    env = {**os.environ, STORAGE_ENV: ctx.storage}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "sweeps.workers", str(spec_path), str(slot.index)], env={**env, **slot.env}
        )
        for slot in slots
    ]
    failed = [slot.index for slot, proc in zip(slots, procs) if proc.wait() != 0]
    spec_path.unlink(missing_ok=True)
    for index in failed:
        print(f"worker {index} ({phase}) exited with an error; re-run the same command to resume", flush=True)
    return failed


def worker_main(spec_path: str, index: int) -> int:
    spec = json.loads(Path(spec_path).read_text())
    ctx = SweepContext.from_json(json.dumps(spec["context"]))
    ctx.storage = os.environ[STORAGE_ENV]
    threads = int(os.environ.get("OMP_NUM_THREADS", "0"))
    if threads:
        import torch

        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        storage = open_storage(ctx.storage, ctx.sweep.heartbeat_interval, ctx.sweep.grace_period)
    except ValueError as exc:  # the database went away after the command opened it
        print(f"worker {index} ({spec['phase']}): error: {exc}", file=sys.stderr, flush=True)
        return 1
    if spec["phase"] == "tune":
        tune_all(ctx, storage, index)
    else:
        run_finals(ctx, storage, [(loss, seed) for loss, seed in spec["tasks"][index :: spec["workers"]]])
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1], int(sys.argv[2])))
