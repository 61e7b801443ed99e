"""``run_experiment``: one config -> data, model, objective, training, evaluation, one MLflow run.

The steps are the same for every dataset; what depends on the data (images or (image, caption)
pairs) is the run's task (:mod:`experiments.train.tasks`). The run is created first and always
ended: FINISHED (also when ``on_epoch`` prunes it), FAILED with the error in tag
``tripletlab.error`` (bad data, a non-finite loss, any exception), or KILLED on
``KeyboardInterrupt``. Logging goes to the run by id, so runs can train in parallel threads.
"""

from __future__ import annotations

import copy
import traceback
from pathlib import Path
from typing import Callable

from experiments.config import ExperimentConfig, flatten_config
from experiments.data.registry import load_dataset
from experiments.data.sampler import PKSampler
from experiments.tracking.provenance import provenance_tags
from experiments.tracking.secrets import mask_secrets
from experiments.tracking.store import RunLogger, get_or_create_experiment, prepare_store
from experiments.tracking.system_metrics import system_metrics
from experiments.train.cross_validation import train_and_evaluate_folds
from experiments.train.fitting import fit_model
from experiments.train.loop import NonFiniteLossError, pick_device
from experiments.train.record import RunResult, finish_run, log_run_config, log_weights
from experiments.train.tasks import ImageTask, make_task


def _train_and_evaluate(
    cfg: ExperimentConfig,
    run: RunLogger,
    on_epoch,
    evaluate_test: bool,
    log_embeddings: bool,
    folds: int = 1,
    fold_seed: int = 0,
    on_fold=None,
    log_model: bool = False,
) -> RunResult:
    device = pick_device(cfg.device)
    run.set_tags({"tripletlab.device": str(device)})
    task = make_task(cfg, load_dataset(cfg.dataset, cfg.seed))
    if not isinstance(task, ImageTask):
        run.set_tags({"tripletlab.task": "cross-modal"})
    if folds > 1:
        if not isinstance(task, ImageTask):
            raise ValueError(
                f"folds={folds}: cross-validation folds are for image datasets, not the "
                f"paired dataset {cfg.dataset.name!r}; use folds=1"
            )
        return train_and_evaluate_folds(
            cfg,
            run,
            task,
            device,
            folds,
            fold_seed,
            on_epoch,
            on_fold,
            evaluate_test,
            log_embeddings,
            log_model,
        )
    train_split = task.training_split()
    sampler = PKSampler(train_split.labels, cfg.batch.p, cfg.batch.k, cfg.seed)
    log_run_config(run, cfg, task.splits.info, int(train_split.labels.max()) + 1, sampler)
    run.log_params(task.run_params())
    checkpoints = Path(cfg.train.checkpoint_dir) / run.run_id if cfg.train.checkpoint_dir else None
    model, outcome = fit_model(
        cfg,
        run,
        task,
        train_split,
        sampler,
        task.splits.val,
        device,
        on_epoch,
        lambda epoch, metrics: run.log_metrics(metrics, step=epoch),
        checkpoints,
    )
    if log_model:
        log_weights(run, model)
    if not evaluate_test:
        return finish_run(run, cfg, outcome, None, None)
    test, arrays = task.test(model, device)
    keep = log_embeddings and cfg.tracking.log_embeddings
    return finish_run(run, cfg, outcome, test, arrays if keep else None)


def run_experiment(
    cfg: ExperimentConfig,
    *,
    tracking_uri: str | None = None,
    experiment_name: str = "tripletlab",
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, str] | None = None,
    on_epoch: Callable[[int, dict[str, float]], bool] | None = None,
    evaluate_test: bool = True,
    log_embeddings: bool = True,
    folds: int = 1,
    fold_seed: int | None = None,
    on_fold: Callable[[int, dict[str, float]], bool] | None = None,
    log_model: bool = False,
) -> RunResult:
    """Train and evaluate ``cfg`` as one MLflow run; see the module docstring and docs/design.md.

    ``folds`` > 1 cross-validates on class-disjoint folds of the training classes, dealt by
    ``fold_seed`` (default: the run's seed), one model per fold (``experiments.train.cross_validation``, which
    also says what ``on_epoch`` and ``on_fold`` receive). ``log_model`` logs the trained weights
    (``model/weights.pt``, or ``model/fold_<i>/weights.pt``) for ``tripletlab evaluate``.
    """
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 1:
        raise ValueError(f"folds must be an integer >= 1 (1 = no cross-validation), got {folds!r}")
    cfg = copy.deepcopy(cfg)
    uri = prepare_store(tracking_uri)
    experiment_id = get_or_create_experiment(experiment_name, uri)
    run_tags = {
        "tripletlab.role": "train",
        "tripletlab.loss": cfg.loss.name,
        "tripletlab.dataset": cfg.dataset.name,
        "tripletlab.split": cfg.dataset.split,
        "tripletlab.seed": str(cfg.seed),
        "tripletlab.device": cfg.device,
        **provenance_tags(),
        **(tags or {}),
    }
    run = RunLogger(
        uri,
        experiment_id,
        run_name or f"{cfg.loss.name}-{cfg.dataset.name}-seed{cfg.seed}",
        run_tags,
        parent_run_id,
    )
    status = "FAILED"
    try:
        with system_metrics(run.run_id, uri):
            result = _train_and_evaluate(
                cfg,
                run,
                on_epoch,
                evaluate_test,
                log_embeddings,
                folds,
                cfg.seed if fold_seed is None else fold_seed,
                on_fold,
                log_model,
            )
        status = "FINISHED"
        return result
    except KeyboardInterrupt:
        status = "KILLED"
        run.set_tags({"tripletlab.error": "interrupted (KeyboardInterrupt)"})
        raise
    except BaseException as exc:
        _record_failure(run, cfg, exc)
        raise
    finally:
        run.end(status)


def _record_failure(run: RunLogger, cfg: ExperimentConfig, exc: BaseException) -> None:
    """Error tags (and the config, if not logged yet) on a failing run; never masks ``exc``."""
    try:
        run.set_tags(
            {
                "tripletlab.error": mask_secrets(f"{type(exc).__name__}: {exc}")[:5000],
                "tripletlab.traceback": mask_secrets(traceback.format_exc())[-5000:],
            }
        )
        if not run.params_logged:
            run.log_params(flatten_config(cfg))
    except Exception:  # the store itself failing must not hide the original error
        pass


__all__ = ["NonFiniteLossError", "RunResult", "run_experiment"]
