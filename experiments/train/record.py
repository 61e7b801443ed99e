"""What a run records in MLflow: its resolved config and splits, its final metrics, embeddings and
weights, and the :class:`RunResult` handed back to the caller."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from experiments.config import ExperimentConfig, flatten_config
from experiments.data.sampler import PKSampler
from experiments.eval.run_metrics import VAL_METRICS
from experiments.tracking.dataset_inputs import dataset_inputs, log_dataset_inputs
from experiments.tracking.store import RunLogger
from losses import loss_info

MODEL_ARTIFACT = "model"  # model/weights.pt, or model/fold_<i>/weights.pt for each fold's model
WEIGHTS_FILE = "weights.pt"


@dataclass
class RunResult:
    """What a caller (a sweep trial, the CLI) needs back; everything else is in MLflow.

    ``history``: one dict per epoch with the logged keys (``epoch``, ``train/loss``, ``val/map_at_r``...).
    ``val_metrics``: unprefixed validation metrics of the model that was tested (the last epoch, or
    the best one under early stopping) plus ``best_map_at_r``. ``test_metrics``: unprefixed test
    metrics, or ``None`` when not evaluated.
    """

    run_id: str
    history: list[dict[str, float]] = field(default_factory=list)
    val_metrics: dict[str, float] = field(default_factory=dict)
    test_metrics: dict[str, float] | None = None
    pruned: bool = False


def _fill_derived_params(cfg: ExperimentConfig, num_classes: int) -> None:
    """Loss params the loss declares and the user left unset: ``num_classes``/``embedding_dim``
    (0) from the data and model (``num_classes`` covers the largest training class id, since
    splits keep the dataset's ids), ``seed`` (its default) from the run's seed."""
    declared = {p.name: p.default for p in loss_info(cfg.loss.name).params}
    derived = {"num_classes": num_classes, "embedding_dim": cfg.model.embedding_dim}
    for name in derived.keys() & declared.keys():
        if not cfg.loss.params.get(name):
            cfg.loss.params[name] = derived[name]
    if "seed" in declared and cfg.loss.params.get("seed") == declared["seed"]:
        cfg.loss.params["seed"] = cfg.seed


def _split_params(info: dict[str, Any]) -> dict[str, str]:
    """The scalar entries of the dataset's split record, as ``data.<key>`` params."""
    return {
        f"data.{k}": str(v)
        for k, v in info.items()
        if isinstance(v, (int, float, str, bool)) and len(str(v)) < 500
    }


def log_run_config(
    run: RunLogger, cfg: ExperimentConfig, split_info: dict[str, Any], num_classes: int, sampler: PKSampler
) -> None:
    """Fill derived loss params and the sampler's resolved P, then log the flattened config, the
    split, the resolved YAML and the splits as MLflow dataset inputs (on the parent run too: a sweep's
    parent rows then show their dataset)."""
    _fill_derived_params(cfg, num_classes)
    cfg.batch.p = sampler.p
    run.log_params({**flatten_config(cfg), **_split_params(split_info)})
    run.params_logged = True
    run.log_params({"data.classes_with_replacement": len(sampler.classes_with_replacement)})
    run.log_json(split_info, "split.json")
    run.log_text(cfg.to_yaml(), "config.yaml")
    parent = run.client.get_run(run.run_id).data.tags.get("mlflow.parentRunId")
    log_dataset_inputs(
        run.client,
        [run.run_id, *([parent] if parent else [])],
        dataset_inputs(cfg.dataset.name, cfg.dataset.path, split_info),
    )


def tested_val_metrics(cfg: ExperimentConfig, outcome) -> dict[str, float]:
    """Unprefixed validation metrics of the model that is tested (the last epoch, or the best one
    under early stopping), plus ``best_map_at_r`` when any epoch was validated."""
    tested_epoch = outcome.best_epoch if cfg.train.early_stopping_patience else outcome.history[-1]["epoch"]
    tested = next((h for h in outcome.history if h["epoch"] == tested_epoch), outcome.history[-1])
    val_metrics = {k: tested[f"val/{k}"] for k in VAL_METRICS if f"val/{k}" in tested}
    if outcome.best_epoch:
        val_metrics["best_map_at_r"] = outcome.best_map_at_r
    return val_metrics


def log_embeddings_artifact(run: RunLogger, arrays: dict[str, torch.Tensor]) -> None:
    """The test embeddings (and labels, and a gallery's) as ``embeddings/test.npz``."""
    run.log_npz("embeddings/test.npz", **{k: v.cpu().numpy() for k, v in arrays.items()})


def finish_run(
    run: RunLogger,
    cfg: ExperimentConfig,
    outcome,
    test: dict[str, float] | None,
    arrays: dict[str, torch.Tensor] | None,
) -> RunResult:
    """Log the final metrics, the metrics JSON and the test embeddings ``arrays`` (unless ``None``);
    build the :class:`RunResult`."""
    val_metrics = tested_val_metrics(cfg, outcome)
    final = {"train_seconds": outcome.train_seconds}
    if outcome.best_epoch:
        final["val/best_map_at_r"] = outcome.best_map_at_r
    if outcome.stopped:
        run.set_tags({"tripletlab.stopped": outcome.stopped})
    if test is not None:
        final.update({f"test/{k}": v for k, v in test.items()})
    if arrays is not None:
        log_embeddings_artifact(run, arrays)
    run.log_metrics(final, step=len(outcome.history))
    run.log_json({"history": outcome.history, "val": val_metrics, "test": test, **final}, "metrics.json")
    return RunResult(run.run_id, outcome.history, val_metrics, test, pruned=outcome.stopped == "pruned")


def weights_artifact_dir(fold: int | None = None) -> str:
    """Where a run's model weights go: ``model``, or ``model/fold_<i>`` for fold ``i``'s model."""
    return MODEL_ARTIFACT if fold is None else f"{MODEL_ARTIFACT}/fold_{fold}"


def log_weights(run: RunLogger, model: nn.Module, fold: int | None = None) -> None:
    """The model's state dict (CPU tensors, ``torch.save``) as ``<weights_artifact_dir>/weights.pt``;
    the run's ``config.yaml`` rebuilds the network (:func:`experiments.train.tasks.build_run_model`)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / WEIGHTS_FILE
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, local)
        run.client.log_artifact(run.run_id, str(local), weights_artifact_dir(fold))
