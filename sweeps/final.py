"""After tuning: retrain each loss's best configuration with N seeds, test once, compare.

The final seeds (``seed+1 .. seed+N``) differ from the tuning seed, so the reported numbers are
not the very run that won the selection. Each final run is an MLflow child of the loss's parent
run (role ``final``) evaluated once on the held-out test classes; re-running a sweep skips the
seeds already done for the same best trial. Every final run logs its weights (``model/``) for
``tripletlab evaluate``. With ``folds`` > 1 a final seed trains one model per fold (the trials'
folds) and the table shows the test metrics of the concatenated embeddings (``test/<metric>``),
with those of the separated per-fold models (``test/separated/<metric>``) beside them, as
"A Metric Learning Reality Check" (Musgrave et al., ECCV 2020) reports both.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from mlflow import MlflowClient
from optuna.trial import TrialState

from experiments.eval.retrieval import HEADLINE_METRICS

from .context import SweepContext
from .statistics import t_interval
from .storage import budget_lock, budget_trials, recover_stale_trials, worker_identity
from .study import base_experiment, trial_experiment, tune
from .table import short_value, write_table
from .tracking import ROLE_TAG, SEED_TAG, end_orphaned_runs

WAIT_REPORT_SECONDS = 30  # a progress line at least this often while waiting for other workers


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    """The completed trial with the highest val MAP@R, or ``None`` when no trial completed."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def best_values(ctx: SweepContext, loss: str, trial: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """Config values of ``trial``: the loss, its fixed values and its tuned parameters."""
    return {"loss.name": loss, **ctx.space(loss).fixed, **trial.params}


def _experiment_id(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        raise ValueError(f"MLflow experiment {name!r} does not exist; run the sweep first")
    return experiment.experiment_id


def final_runs(ctx: SweepContext, client: MlflowClient, loss: str, best_number: int) -> dict[int, Any]:
    """Finished final runs of ``loss`` for best trial ``best_number``, by seed (the latest per seed)."""
    runs = client.search_runs(
        [_experiment_id(client, ctx.sweep.name)],
        filter_string=f"tags.`mlflow.parentRunId` = '{ctx.parents[loss]}' and tags.`{ROLE_TAG}` = 'final' "
        f"and tags.`tripletlab.best_trial` = '{best_number}' "
        "and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time ASC"],
    )
    return {int(run.data.tags[SEED_TAG]): run for run in runs}


def _running_on(trials: list[optuna.trial.FrozenTrial]) -> str:
    return ", ".join(
        f"trial {t.number} on {t.user_attrs.get('worker_host', '?')} "
        f"(pid {t.user_attrs.get('worker_pid', '?')})"
        for t in trials
    )


def wait_for_finished_studies(ctx: SweepContext, storage: optuna.storages.BaseStorage) -> None:
    """Return once every loss's study holds its budget with no trial running: the best trial is final.

    Stale trials are recovered first; their retries, and any trial still to start, run here. Trials
    running on live workers (other machines included) are waited for, with a line naming them.
    """
    lock = budget_lock(storage, ctx.lock_path, ctx.sweep.name)
    poll = max(0.5, min(5.0, ctx.sweep.heartbeat_interval))
    for loss in ctx.sweep.losses:
        study = optuna.load_study(study_name=ctx.study_name(loss), storage=storage)
        shown, shown_at = "", 0.0
        while True:
            with lock:
                recover_stale_trials(study, storage, ctx.sweep.grace_period)
                end_orphaned_runs(ctx, loss, study)
                trials = budget_trials(study)
            if len(trials) < ctx.budget(loss) or any(t.state == TrialState.WAITING for t in trials):
                tune(ctx, loss, storage)
                continue
            running = _running_on([t for t in trials if t.state == TrialState.RUNNING])
            if not running:
                break
            if running != shown or time.monotonic() - shown_at > WAIT_REPORT_SECONDS:
                print(
                    f"[{loss}] waiting for trials on live workers before the final runs: {running}",
                    flush=True,
                )
                shown, shown_at = running, time.monotonic()
            time.sleep(poll)


def final_tasks(ctx: SweepContext, storage: optuna.storages.BaseStorage) -> list[tuple[str, int]]:
    """The (loss, seed) retrains still to do: losses with a completed trial, seeds not yet done."""
    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    tasks = []
    for loss in ctx.sweep.losses:
        best = best_trial(optuna.load_study(study_name=ctx.study_name(loss), storage=storage))
        if best is None:
            print(f"[{loss}] no completed trial: no final runs", flush=True)
            continue
        done = final_runs(ctx, client, loss, best.number)
        tasks += [(loss, seed) for seed in ctx.sweep.final_seeds if seed not in done]
    return tasks


def run_final(ctx: SweepContext, storage: optuna.storages.BaseStorage, loss: str, seed: int) -> str | None:
    """Retrain ``loss``'s best configuration with ``seed`` and test it; a failure is reported and
    returned (the error as one line), not raised."""
    from experiments.train.run import run_experiment

    best = best_trial(optuna.load_study(study_name=ctx.study_name(loss), storage=storage))
    cfg = trial_experiment(base_experiment(ctx), best_values(ctx, loss, best), seed)
    tags = {
        ROLE_TAG: "final",
        "tripletlab.sweep": ctx.sweep.name,
        "tripletlab.best_trial": str(best.number),
        "optuna.study_name": ctx.study_name(loss),
        **{f"tripletlab.worker_{k}": str(v) for k, v in worker_identity().items()},
    }
    try:
        result = run_experiment(
            cfg,
            tracking_uri=ctx.tracking_uri,
            experiment_name=ctx.sweep.name,
            parent_run_id=ctx.parents[loss],
            run_name=f"{loss}/seed-{seed}",
            tags=tags,
            folds=ctx.sweep.folds,
            fold_seed=ctx.sweep.seed,
            log_model=True,
        )
    except Exception as exc:
        print(f"[{loss}] final seed {seed} failed: {type(exc).__name__}: {exc}", flush=True)
        return f"{type(exc).__name__}: {exc}"
    test = result.test_metrics
    folds = (
        f" ({ctx.sweep.folds} folds concatenated; separated {test['separated/map_at_r']:.4f})"
        if ctx.sweep.folds > 1
        else ""
    )
    print(f"[{loss}] final seed {seed}: test MAP@R {test['map_at_r']:.4f}{folds}", flush=True)
    return None


def _trial_seconds(trials: list[optuna.trial.FrozenTrial]) -> float:
    return sum(
        (t.datetime_complete - t.datetime_start).total_seconds()
        for t in trials
        if t.datetime_complete is not None and t.datetime_start is not None
    )


def _interval(finals: dict[int, Any], key: str, column: str) -> dict[str, float]:
    """``<column>_mean|_ci_low|_ci_high``: the t-interval of metric ``key`` over the final runs."""
    mean, low, high = t_interval([r.data.metrics[key] for r in finals.values() if key in r.data.metrics])
    return {f"{column}_mean": mean, f"{column}_ci_low": low, f"{column}_ci_high": high}


def _log_parent(client: MlflowClient, run_id: str, row: dict[str, Any], best_params: dict[str, Any]) -> None:
    """Best parameters (params, set once), counts and final metrics on the loss's parent run."""
    logged = client.get_run(run_id).data.params
    for key, value in best_params.items():
        name = f"best.{key}"
        if name not in logged:
            client.log_param(run_id, name, str(value))
        elif logged[name] != str(value):  # params are immutable: a later, better trial goes to a tag
            client.set_tag(run_id, name, str(value))
    metrics = {k: row[k] for k in ("best_val_map_at_r", "trials_complete", "trials_pruned", "trials_failed")}
    for metric in HEADLINE_METRICS:
        for suffix in ("mean", "ci_low", "ci_high"):
            metrics[f"final/test/{metric}_{suffix}"] = row[f"{metric}_{suffix}"]
            if f"separated_{metric}_{suffix}" in row:
                metrics[f"final/test/separated/{metric}_{suffix}"] = row[f"separated_{metric}_{suffix}"]
    for key, value in metrics.items():
        if value is not None and math.isfinite(float(value)):
            client.log_metric(run_id, key, float(value))


def summarize(ctx: SweepContext, storage: optuna.storages.BaseStorage) -> pd.DataFrame:
    """The comparison table (one row per loss), also logged to each loss's parent run."""
    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    rows = []
    for loss in ctx.sweep.losses:
        study = optuna.load_study(study_name=ctx.study_name(loss), storage=storage)
        trials = budget_trials(study)
        counts = {
            s: sum(t.state == s for t in trials)
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
        }
        best = best_trial(study)
        finals = final_runs(ctx, client, loss, best.number) if best is not None else {}
        final_seconds = sum(
            (r.info.end_time - r.info.start_time) / 1000 for r in finals.values() if r.info.end_time
        )
        row: dict[str, Any] = {
            "loss": loss,
            "best_val_map_at_r": best.value if best is not None else math.nan,
            "trials_complete": counts[TrialState.COMPLETE],
            "trials_pruned": counts[TrialState.PRUNED],
            "trials_failed": counts[TrialState.FAIL],
            "seeds": len(finals),
            "tuning_seconds": round(_trial_seconds(study.get_trials(deepcopy=False)), 1),
            "final_seconds": round(final_seconds, 1),
        }
        row["compute_seconds"] = row["tuning_seconds"] + row["final_seconds"]
        for metric in HEADLINE_METRICS:
            row.update(_interval(finals, f"test/{metric}", metric))
        if ctx.sweep.folds > 1:  # test/<metric> above: the folds' concatenated embeddings
            row["folds"] = ctx.sweep.folds
            for metric in HEADLINE_METRICS:
                row.update(_interval(finals, f"test/separated/{metric}", f"separated_{metric}"))
        tuned = best.params if best is not None else {}
        row["best_params"] = ", ".join(f"{k}={short_value(v)}" for k, v in tuned.items())
        rows.append(row)
        _log_parent(client, ctx.parents[loss], row, tuned)
    return pd.DataFrame(rows)


def write_outputs(ctx: SweepContext, table: pd.DataFrame) -> list[Path]:
    """``comparison.csv``, ``comparison.md`` and ``sweep.yaml`` in the sweep directory."""
    csv_path, md_path = write_table(table, ctx.sweep_dir)
    config_path = ctx.sweep_dir / "sweep.yaml"
    config_path.write_text(ctx.sweep.to_yaml())
    return [csv_path, md_path, config_path]
