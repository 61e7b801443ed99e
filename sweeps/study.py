"""Tuning one loss: an Optuna study (seeded TPE, optional pruning) whose trials are MLflow child runs.

Each trial samples the loss's search space, trains on the training classes and returns the
validation MAP@R of the model that would be tested (validation split only, as the Reality Check
protocol asks). Every epoch reports val MAP@R to the pruner and refreshes the trial's heartbeat.

With ``folds`` > 1 a trial trains one model per class-disjoint fold of the training classes
(``experiments.train.cross_validation``) and returns the mean of the folds' val MAP@R. ``wilcoxon`` (Optuna's
WilcoxonPruner) gets each fold's val MAP@R at step = fold index, once the fold is trained, and
compares it with the best trial's same fold; the other pruners get, at step
``fold * epochs + epoch``, the running mean: the trained folds' val MAP@R and the current fold's
latest, averaged. A pruned trial ends PRUNED, so it is counted as pruned and never retrained.
A trial that raises (a non-finite loss included) ends FAILED with ``fail_reason`` recorded on the
trial and ``tripletlab.trial_state=failed`` on its run; the sweep carries on.

Budget: ``trials`` is the target number of trials per loss. Trials that finished (complete,
pruned, failed) or are running count toward it; a trial failed because its worker died does not,
its retry does. Re-running the same sweep therefore only tops the studies up to the target.
"""

from __future__ import annotations

import json
import time
import warnings
from typing import Any

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from experiments.config import ExperimentConfig, apply, from_dict
from experiments.tracking.secrets import mask_secrets
from experiments.train.interrupts import raise_if_interrupted

from .context import SweepContext
from .space import SearchSpace
from .storage import (
    ExclusiveStep,
    beat,
    budget_lock,
    budget_trials,
    enqueue_retry,
    mark_worker,
    recover_stale_trials,
)
from .table import short_value
from .tracking import ROLE_TAG, TRIAL_STATE_TAG, end_orphaned_runs

OBJECTIVE = "val/map_at_r"


def base_experiment(ctx: SweepContext) -> ExperimentConfig:
    """The shared training settings; raises ``ValueError`` for a key or value the runner rejects."""
    cfg = from_dict(ctx.sweep.experiment)
    if cfg.dataset.val_fraction <= 0:
        raise ValueError("a sweep tunes on the validation split: set experiment.dataset.val_fraction > 0")
    return cfg


def trial_experiment(base: ExperimentConfig, values: dict[str, Any], seed: int) -> ExperimentConfig:
    """``base`` with a trial's (or the best trial's) values and ``seed`` applied."""
    return apply(base, {**values, "seed": seed})


def make_sampler(ctx: SweepContext, worker_index: int = 0) -> optuna.samplers.TPESampler:
    """TPE seeded by the sweep seed; each worker gets its own stream so workers do not sample alike."""
    options = {"n_startup_trials": min(10, max(2, ctx.sweep.trials // 3)), **ctx.sweep.sampler}
    try:
        return optuna.samplers.TPESampler(seed=ctx.sweep.seed + 7919 * worker_index, **options)
    except TypeError as exc:
        raise ValueError(f"sweep key 'sampler' has an option TPESampler does not take: {exc}") from None


def make_pruner(ctx: SweepContext) -> optuna.pruners.BasePruner:
    """``median`` (MedianPruner), ``hyperband`` (HyperbandPruner over all the epochs of all folds),
    ``threshold``, ``wilcoxon`` (WilcoxonPruner over folds), ``none``."""
    options = {k: v for k, v in ctx.sweep.pruner.items() if k != "name"}
    name = ctx.sweep.pruner["name"]
    try:
        if name == "median":
            return optuna.pruners.MedianPruner(**options)
        if name == "hyperband":
            steps = from_dict(ctx.sweep.experiment).epochs * ctx.sweep.folds
            return optuna.pruners.HyperbandPruner(**{"min_resource": 1, "max_resource": steps, **options})
        if name == "threshold":
            return optuna.pruners.ThresholdPruner(**options)
        if name == "wilcoxon":
            with warnings.catch_warnings():  # experimental since Optuna 3.6
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.pruners.WilcoxonPruner(**options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"pruner {name!r}: {exc}") from None
    return optuna.pruners.NopPruner()


def _fingerprint(ctx: SweepContext, loss: str) -> str:
    folds = {"folds": ctx.sweep.folds} if ctx.sweep.folds > 1 else {}  # folds=1 studies keep their print
    return json.dumps(
        {"space": ctx.space(loss).describe(), "experiment": base_experiment(ctx).to_dict(), **folds},
        sort_keys=True,
        default=str,
    )


def create_studies(ctx: SweepContext, storage: optuna.storages.BaseStorage) -> None:
    """Create (or reopen) every loss's study before workers start.

    A study reopened with a different search space or training settings is refused: its old
    trials would not be comparable.
    """
    for loss in ctx.sweep.losses:
        study = optuna.create_study(
            study_name=ctx.study_name(loss),
            storage=storage,
            direction="maximize",
            sampler=make_sampler(ctx),
            pruner=make_pruner(ctx),
            load_if_exists=True,
        )
        fingerprint = _fingerprint(ctx, loss)
        previous = study.user_attrs.get("tripletlab.fingerprint")
        if previous is None:
            study.set_user_attr("tripletlab.fingerprint", fingerprint)
            study.set_user_attr("tripletlab.loss", loss)
            study.set_user_attr("tripletlab.sweep", ctx.sweep.name)
        elif previous != fingerprint:
            raise ValueError(
                f"study {ctx.study_name(loss)!r} already exists with another search space or training "
                "settings; give the sweep a new name (name=...) or remove its storage "
                f"({mask_secrets(ctx.storage)}) to start over"
            )


class Objective:
    """One trial: sample, train as an MLflow child run, report each epoch (or fold), return val MAP@R."""

    def __init__(self, ctx: SweepContext, loss: str, lock: ExclusiveStep) -> None:
        self.ctx, self.loss, self.lock = ctx, loss, lock
        self.space: SearchSpace = ctx.space(loss)
        self.base = base_experiment(ctx)
        self.client = MlflowClient(tracking_uri=ctx.tracking_uri)
        self.interrupted: int | None = None  # number of a trial stopped by Ctrl-C

    def __call__(self, trial: optuna.Trial) -> float:
        self.lock.release()  # the trial exists now: other workers may count it and start theirs
        mark_worker(trial)
        start = time.time()
        values = self.space.suggest(trial)
        tags = {
            ROLE_TAG: "trial",
            "tripletlab.sweep": self.ctx.sweep.name,
            "optuna.study_name": self.ctx.study_name(self.loss),
            "optuna.trial_number": str(trial.number),
        }

        folds, by_fold = self.ctx.sweep.folds, self.ctx.sweep.pruner["name"] == "wilcoxon"
        trained: list[float] = []  # val MAP@R of each fold trained so far
        reached = [0]  # the fold in training

        def on_epoch(step: int, metrics: dict[str, float]) -> bool:
            reached[0] = int(metrics.get("fold", 0))
            beat(trial)
            if by_fold:
                return False
            trial.report((sum(trained) + metrics[OBJECTIVE]) / (len(trained) + 1), step)
            return trial.should_prune()

        def on_fold(fold: int, val_metrics: dict[str, float]) -> bool:
            trained.append(val_metrics["map_at_r"])
            if not by_fold:
                return False
            trial.report(val_metrics["map_at_r"], fold)
            return fold < folds - 1 and trial.should_prune()  # a fully trained trial is kept

        from experiments.train.run import run_experiment

        try:
            cfg = trial_experiment(self.base, values, self.ctx.sweep.seed)
            result = run_experiment(
                cfg,
                tracking_uri=self.ctx.tracking_uri,
                experiment_name=self.ctx.sweep.name,
                parent_run_id=self.ctx.parents.get(self.loss),
                run_name=f"{self.loss}/trial-{trial.number}",
                tags=tags,
                on_epoch=on_epoch,
                evaluate_test=False,
                log_embeddings=False,
                folds=folds,
                fold_seed=self.ctx.sweep.seed,
                on_fold=on_fold if folds > 1 else None,
            )
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted; retried when the sweep resumes")
            self.interrupted = trial.number
            raise
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"[:2000]
            trial.set_user_attr("fail_reason", reason)
            self._tag_trial_run(trial.number, "failed")
            print(
                f"[{self.loss}] trial {trial.number} failed after {time.time() - start:.0f}s: {reason}",
                flush=True,
            )
            raise
        trial.set_user_attr("mlflow_run_id", result.run_id)
        if folds > 1:
            trial.set_user_attr("fold_val_map_at_r", trained)
        if result.pruned:
            self.client.set_tag(result.run_id, TRIAL_STATE_TAG, "pruned")
            where = f"epoch {len(result.history)}" if folds == 1 else f"fold {reached[0] + 1}/{folds}"
            print(
                f"[{self.loss}] trial {trial.number} pruned at {where} ({time.time() - start:.0f}s)",
                flush=True,
            )
            raise optuna.TrialPruned(f"pruned at {where}")
        if "map_at_r" not in result.val_metrics:
            raise ValueError("the run logged no validation MAP@R; a sweep needs dataset.val_fraction > 0")
        self.client.set_tag(result.run_id, TRIAL_STATE_TAG, "complete")
        value = float(result.val_metrics["map_at_r"])
        tuned = ", ".join(f"{k}={short_value(v)}" for k, v in trial.params.items())
        print(
            f"[{self.loss}] trial {trial.number} complete: val MAP@R {value:.4f} "
            f"({time.time() - start:.0f}s) {tuned}",
            flush=True,
        )
        return value

    def _tag_trial_run(self, number: int, state: str) -> None:
        """Tag the trial's run, if the runner got as far as creating it."""
        experiment = self.client.get_experiment_by_name(self.ctx.sweep.name)
        if experiment is None:
            return
        runs = self.client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`optuna.study_name` = '{self.ctx.study_name(self.loss)}' "
            f"and tags.`optuna.trial_number` = '{number}'",
        )
        for run in runs:
            self.client.set_tag(run.info.run_id, TRIAL_STATE_TAG, state)


def tune(ctx: SweepContext, loss: str, storage: optuna.storages.BaseStorage, worker_index: int = 0) -> None:
    """Run trials of ``loss`` until its study holds its budget; safe to run in several workers at once."""
    study = optuna.load_study(
        study_name=ctx.study_name(loss),
        storage=storage,
        sampler=make_sampler(ctx, worker_index),
        pruner=make_pruner(ctx),
    )
    target = ctx.budget(loss)
    lock = budget_lock(storage, ctx.lock_path, ctx.sweep.name)
    objective = Objective(ctx, loss, lock)
    while True:
        lock.acquire()
        try:
            recover_stale_trials(study, storage, ctx.sweep.grace_period)
            end_orphaned_runs(ctx, loss, study)
            trials = budget_trials(study)
            if len(trials) >= target and not any(t.state == TrialState.WAITING for t in trials):
                return
            raise_if_interrupted()
            study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
        except KeyboardInterrupt:
            if objective.interrupted is not None:  # an interrupted trial is redone, not counted
                enqueue_retry(study, study.trials[objective.interrupted])
            raise
        finally:
            lock.release()
