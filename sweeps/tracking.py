"""The sweep's MLflow runs that no single training run owns: one parent per loss, one summary.

Both are found again by their tags on a re-run, so resuming a sweep reuses them instead of
adding duplicates (design.md, "sweeps/"). The tags that name a sweep's runs, and the lookup of a
sweep's experiment in a store (for ``tripletlab rerun`` and ``tripletlab analyze``), are here too.
"""

from __future__ import annotations

import json
from pathlib import Path

import optuna
from mlflow import MlflowClient
from mlflow.entities import ViewType
from optuna.trial import TrialState

from experiments.config import from_dict as experiment_from_dict
from experiments.tracking.provenance import provenance_tags
from experiments.tracking.store import get_or_create_experiment, prepare_store

from .context import SweepContext
from .storage import claim_alive, final_claim

ROLE_TAG = "tripletlab.role"  # parent | trial | final | summary | rerun (train and evaluate outside sweeps)
LOSS_TAG = "tripletlab.loss"
SEED_TAG = "tripletlab.seed"
TRIAL_STATE_TAG = "tripletlab.trial_state"  # complete | pruned | failed, on trial runs
RERUN_ROLE = "rerun"
RERUN_OF_TAG = "tripletlab.rerun_of"  # on a rerun: the id of the final run it repeats


def last_activity(client: MlflowClient, experiment) -> int:
    """When the experiment's latest run started (its creation time if it has no runs), in ms."""
    runs = client.search_runs(
        [experiment.experiment_id],
        run_view_type=ViewType.ALL,
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.start_time if runs else (experiment.creation_time or 0)


def sweep_experiments(client: MlflowClient) -> list:
    """Experiments that hold at least one sweep parent run, the most recent sweep (latest run
    started last: a resumed sweep counts as recent) first."""
    found = []
    for exp in client.search_experiments(view_type=ViewType.ACTIVE_ONLY):
        if client.search_runs([exp.experiment_id], f"tags.`{ROLE_TAG}` = 'parent'", max_results=1):
            found.append(exp)
    return sorted(
        found,
        reverse=True,
        key=lambda e: (last_activity(client, e), int(e.experiment_id) if e.experiment_id.isdigit() else 0),
    )


def find_experiment(client: MlflowClient, name: str | None):
    """The named experiment, or the most recent sweep when ``name`` is None; clear errors otherwise."""
    if name is None:
        sweeps = sweep_experiments(client)
        if not sweeps:
            raise ValueError(
                f"no sweep found in the MLflow store (no run tagged {ROLE_TAG}=parent): "
                "run `make sweep` first or pass --experiment NAME"
            )
        return sweeps[0]
    exp = client.get_experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        names = [e.name for e in client.search_experiments(view_type=ViewType.ACTIVE_ONLY)]
        raise ValueError(f"unknown experiment {name!r}; available: {', '.join(sorted(names)) or 'none'}")
    return exp


def _find_or_create(client: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    query = " and ".join(f"tags.`{k}` = '{v}'" for k, v in tags.items())
    runs = client.search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time ASC"], max_results=1
    )
    if runs:
        client.update_run(runs[0].info.run_id, status="RUNNING")
        return runs[0].info.run_id
    return client.create_run(experiment_id, run_name=run_name, tags={**provenance_tags(), **tags}).info.run_id


def _identity(ctx: SweepContext, role: str) -> dict[str, str]:
    """The tags naming a sweep's parent or summary run; dataset and split as the runs resolve them
    (the experiment config's defaults where the sweep config leaves them out)."""
    dataset = experiment_from_dict(ctx.sweep.experiment).dataset
    return {
        ROLE_TAG: role,
        "tripletlab.sweep": ctx.sweep.name,
        "tripletlab.dataset": dataset.name,
        "tripletlab.split": dataset.split,
    }


# The MLflow UI's runs table with the datasets, models and test metrics as columns: a view state
# stored as an experiment tag, opened by the URL of runs_view_path (MLflow's "share view" mechanism).
RUNS_VIEW_KEY = "tripletlab"
RUNS_VIEW_COLUMNS = (
    "attributes.`Dataset`",
    "attributes.`Models`",
    "metrics.`test/map_at_r`",
    "metrics.`test/precision_at_1`",
    "metrics.`test/r_precision`",
    "metrics.`cost/step_ms`",
)


def runs_view_path(experiment_id: str) -> str:
    """The path, below the UI's address, of the experiment's runs table in the view of
    ``RUNS_VIEW_COLUMNS``."""
    return f"/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW_KEY}"


def prepare_tracking(ctx: SweepContext) -> str:
    """Create and migrate the store and the sweep's experiment once, before any worker starts, and
    store the experiment's runs view."""
    ctx.tracking_uri = prepare_store(ctx.tracking_uri)
    experiment_id = get_or_create_experiment(ctx.sweep.name, ctx.tracking_uri)
    MlflowClient(tracking_uri=ctx.tracking_uri).set_experiment_tag(
        experiment_id,
        f"mlflow.sharedViewState.{RUNS_VIEW_KEY}",
        json.dumps({"selectedColumns": list(RUNS_VIEW_COLUMNS)}),
    )
    return experiment_id


def ensure_parent_runs(ctx: SweepContext, experiment_id: str) -> dict[str, str]:
    """The parent run of every loss (created, or found again on a re-run), by loss name."""
    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    ctx.parents = {
        loss: _find_or_create(
            client,
            experiment_id,
            loss,
            {**_identity(ctx, "parent"), LOSS_TAG: loss, "optuna.study_name": ctx.study_name(loss)},
        )
        for loss in ctx.sweep.losses
    }
    return ctx.parents


def finish_runs(ctx: SweepContext, experiment_id: str, artifacts: list[Path]) -> str:
    """End the parent runs and log ``artifacts`` (table, sweep config) to the summary run; returns its id."""
    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    for run_id in ctx.parents.values():
        client.set_terminated(run_id, status="FINISHED")
    summary = _find_or_create(client, experiment_id, "summary", _identity(ctx, "summary"))
    for path in artifacts:
        client.log_artifact(summary, str(path))
    client.set_terminated(summary, status="FINISHED")
    return summary


def _runs(client: MlflowClient, ctx: SweepContext, query: str) -> list:
    experiment = client.get_experiment_by_name(ctx.sweep.name)
    if experiment is None:
        return []
    return client.search_runs([experiment.experiment_id], filter_string=query, max_results=5000)


def _end_killed(client: MlflowClient, run_id: str, reason: str) -> None:
    client.set_tag(run_id, "tripletlab.error", f"worker lost: {reason}")
    client.set_terminated(run_id, status="KILLED")


def end_orphaned_runs(ctx: SweepContext, loss: str, study: optuna.Study) -> list[str]:
    """End as KILLED the RUNNING trial runs of ``loss`` whose Optuna trial is no longer running
    (its worker died and the trial was failed as stale); returns their run ids. A run its worker
    finished just before dying, whose trial was then failed and retried, is tagged ``failed``."""
    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    study_runs = f"tags.`optuna.study_name` = '{ctx.study_name(loss)}' and tags.`{ROLE_TAG}` = 'trial'"
    runs = _runs(client, ctx, f"{study_runs} and attributes.status = 'RUNNING'")
    runs += _runs(client, ctx, f"{study_runs} and tags.`{TRIAL_STATE_TAG}` = 'complete'")
    if not runs:
        return []
    trials = {t.number: t for t in study.get_trials(deepcopy=False)}
    ended = []
    for run in runs:
        trial = trials.get(int(run.data.tags.get("optuna.trial_number", -1)))
        if trial is None or trial.state in (TrialState.RUNNING, TrialState.WAITING, TrialState.COMPLETE):
            continue
        reason = trial.user_attrs.get("fail_reason") or "its worker stopped before ending the run"
        client.set_tag(run.info.run_id, TRIAL_STATE_TAG, "failed")
        if run.info.status == "RUNNING":
            _end_killed(client, run.info.run_id, reason)
            ended.append(run.info.run_id)
    return ended


def end_orphaned_final_runs(ctx: SweepContext, loss: str, study: optuna.Study) -> list[str]:
    """End as KILLED the RUNNING final runs of ``loss`` whose worker no longer holds a live claim
    on their seed (it died, or its claim went stale and another worker took the seed); returns
    their run ids."""
    client = MlflowClient(tracking_uri=ctx.tracking_uri)
    runs = _runs(
        client,
        ctx,
        f"tags.`mlflow.parentRunId` = '{ctx.parents[loss]}' "
        f"and tags.`{ROLE_TAG}` = 'final' and attributes.status = 'RUNNING'",
    )
    ended = []
    for run in runs:
        tags = run.data.tags
        claim = final_claim(study, int(tags[SEED_TAG]))
        owner = (tags.get("tripletlab.worker_host"), tags.get("tripletlab.worker_pid"))
        if claim_alive(claim, ctx.sweep.grace_period) and owner == (claim["host"], str(claim["pid"])):
            continue
        _end_killed(
            client, run.info.run_id, f"its worker (pid {owner[1]} on {owner[0]}) stopped before ending it"
        )
        ended.append(run.info.run_id)
    return ended
