"""``run_experiment``: one config -> data, model, loss, training, evaluation, one MLflow run.

The run is created first and always ended: FINISHED (also when ``on_epoch`` prunes it), FAILED
with the error in tag ``tripletlab.error`` (bad data, a non-finite loss, any exception), or KILLED
on ``KeyboardInterrupt``. Logging goes to the run by id, so runs can train in parallel threads.
"""
from __future__ import annotations

import copy
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from experiments.models.backbones import input_options, load_backbone_weights
from experiments.config import ExperimentConfig, flatten_config
from experiments.data.paired import is_paired
from experiments.data.registry import LabeledImages, load_dataset
from experiments.data.device_data import DeviceImages
from experiments.eval.embedding_quality import FACENET_MARGIN
from experiments.eval.run_metrics import VAL_METRICS, embed_split, test_metrics
from experiments.models.image import build_model
from experiments.tracking.provenance import provenance_tags
from experiments.data.sampler import PKSampler
from experiments.tracking.dataset_inputs import dataset_inputs, log_dataset_inputs
from experiments.train.loss_cost import training_batch_cost
from experiments.tracking.system_metrics import system_metrics
from experiments.tracking.secrets import mask_secrets
from experiments.tracking.store import RunLogger, get_or_create_experiment, prepare_store
from experiments.train.loop import NonFiniteLossError, pick_device, train
from losses import build_loss, loss_info

IDENTITY_DATASETS = ("orl-faces",)  # verification metrics on by default
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


def with_dense_labels(split: LabeledImages) -> LabeledImages:
    """The training split with class ids renumbered 0..C-1 (losses with one parameter per class,
    like triplet_center, index by label; a class-disjoint split keeps the dataset's own ids)."""
    _, dense = torch.unique(split.labels, return_inverse=True)
    return split.with_labels(dense)


def _split_params(info: dict[str, Any]) -> dict[str, str]:
    """The scalar entries of the dataset's split record, as ``data.<key>`` params."""
    return {f"data.{k}": str(v) for k, v in info.items() if isinstance(v, (int, float, str, bool)) and len(str(v)) < 500}


def log_run_config(run: RunLogger, cfg: ExperimentConfig, split_info: dict[str, Any], num_classes: int,
                   sampler: PKSampler) -> None:
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
    log_dataset_inputs(run.client, [run.run_id, *([parent] if parent else [])],
                       dataset_inputs(cfg.dataset.name, cfg.dataset.path, split_info))


def tested_val_metrics(cfg: ExperimentConfig, outcome) -> dict[str, float]:
    """Unprefixed validation metrics of the model that is tested (the last epoch, or the best one
    under early stopping), plus ``best_map_at_r`` when any epoch was validated."""
    tested_epoch = outcome.best_epoch if cfg.train.early_stopping_patience else outcome.history[-1]["epoch"]
    tested = next((h for h in outcome.history if h["epoch"] == tested_epoch), outcome.history[-1])
    val_metrics = {k: tested[f"val/{k}"] for k in VAL_METRICS if f"val/{k}" in tested}
    if outcome.best_epoch:
        val_metrics["best_map_at_r"] = outcome.best_map_at_r
    return val_metrics


def finish_run(run: RunLogger, cfg: ExperimentConfig, outcome, test: dict[str, float] | None,
               embeddings_npz: dict[str, Any] | None) -> RunResult:
    """Log the final metrics, the metrics JSON and the embeddings; build the :class:`RunResult`."""
    val_metrics = tested_val_metrics(cfg, outcome)
    final = {"train_seconds": outcome.train_seconds}
    if outcome.best_epoch:
        final["val/best_map_at_r"] = outcome.best_map_at_r
    if outcome.stopped:
        run.set_tags({"tripletlab.stopped": outcome.stopped})
    if test is not None:
        final.update({f"test/{k}": v for k, v in test.items()})
    if embeddings_npz is not None:
        run.log_npz("embeddings/test.npz", **embeddings_npz)
    run.log_metrics(final, step=len(outcome.history))
    run.log_json({"history": outcome.history, "val": val_metrics, "test": test, **final}, "metrics.json")
    return RunResult(run.run_id, outcome.history, val_metrics, test, pruned=outcome.stopped == "pruned")


def data_options(cfg: ExperimentConfig) -> dict:
    """``DeviceImages`` options for a run: the model's inputs and the resident budget."""
    return {**input_options(cfg.dataset.crop_size, cfg.model.weights), "resident_mb": cfg.dataset.resident_mb}


def build_run_model(cfg: ExperimentConfig, image_shape: tuple[int, int, int]) -> nn.Module:
    """The freshly initialised embedding network of ``cfg`` for images of ``image_shape`` (C, H, W)."""
    channels, height, width = image_shape
    crop = cfg.dataset.crop_size
    return build_model(cfg.model.name, channels, (crop, crop) if crop else (height, width),
                       cfg.model.embedding_dim, cfg.model.normalize, cfg.seed, freeze_bn=cfg.model.freeze_bn)


def fit_model(cfg: ExperimentConfig, run: RunLogger, train_split: LabeledImages, sampler: PKSampler,
              val_split: LabeledImages, device: torch.device, on_epoch, log_epoch,
              checkpoint_dir: Path | None):
    """Build the model (and its pretrained backbone weights) and the loss, train on ``train_split``
    (dense labels) validating on ``val_split``, then log the cost: ``cost/step_ms`` (the training
    loop's time per step, validation left out) and the loss's own on one training batch
    (:mod:`experiments.train.loss_cost`); returns ``(model, TrainOutcome)``."""
    model = build_run_model(cfg, train_split.image_shape)
    if cfg.model.weights:
        run.log_params(load_backbone_weights(model, cfg.model.weights))
    model = model.to(device)
    inputs = data_options(cfg)
    with torch.random.fork_rng(devices=[]):  # a loss drawing random numbers (triplet_center's centres)
        torch.manual_seed(cfg.seed)
        loss_fn = build_loss(cfg.loss.name, **cfg.loss.params).to(device)
    train_data = DeviceImages(train_split, device, augment=cfg.dataset.augment, seed=cfg.seed, **inputs)
    val_data = DeviceImages(val_split, device, augment=False, **inputs) if len(val_split) > 1 else None
    outcome = train(model, loss_fn, train_data, sampler, val_data, cfg, device, on_epoch=on_epoch,
                    log_epoch=log_epoch, checkpoint_dir=checkpoint_dir)
    step_ms = 1000 * sum(h["epoch_seconds"] for h in outcome.history) / (len(outcome.history) * len(sampler))
    run.log_metrics({"cost/step_ms": step_ms, **training_batch_cost(model, loss_fn, train_data, sampler)})
    return model, outcome


def embed_test(cfg: ExperimentConfig, model: nn.Module, splits, device: torch.device):
    """``(embeddings, labels)`` of the test split, fed to the model as in training, never augmented."""
    inputs = data_options(cfg)
    return embed_split(model, DeviceImages(splits.test, device, augment=False, **inputs), cfg.eval.batch_size)


def embed_gallery(cfg: ExperimentConfig, model: nn.Module, splits, device: torch.device):
    """``(embeddings, labels)`` of the gallery the test queries are ranked against (In-shop's
    official split), or ``None`` when test images query one another."""
    if splits.gallery is None:
        return None
    inputs = data_options(cfg)
    gallery = DeviceImages(splits.gallery, device, augment=False, **inputs)
    return embed_split(model, gallery, cfg.eval.batch_size)


def score_test(cfg: ExperimentConfig, embeddings: torch.Tensor, labels: torch.Tensor,
               gallery: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict[str, float]:
    """The run's unprefixed test metrics of ``embeddings``: retrieval (against ``gallery`` when
    given), embedding quality at the loss's margin, and verification metrics where
    ``eval.verification`` (or the dataset) asks."""
    verification = cfg.eval.verification
    if verification is None:
        verification = cfg.dataset.name in IDENTITY_DATASETS
    margin = cfg.loss.params.get("margin")
    return test_metrics(embeddings, labels, verification, cfg.seed,
                        margin=float(margin) if isinstance(margin, (int, float)) else FACENET_MARGIN,
                        gallery=gallery)


def weights_artifact_dir(fold: int | None = None) -> str:
    """Where a run's model weights go: ``model``, or ``model/fold_<i>`` for fold ``i``'s model."""
    return MODEL_ARTIFACT if fold is None else f"{MODEL_ARTIFACT}/fold_{fold}"


def log_weights(run: RunLogger, model: nn.Module, fold: int | None = None) -> None:
    """The model's state dict (CPU tensors, ``torch.save``) as ``<weights_artifact_dir>/weights.pt``;
    the run's ``config.yaml`` rebuilds the network (:func:`build_run_model`)."""
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / WEIGHTS_FILE
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, local)
        run.client.log_artifact(run.run_id, str(local), weights_artifact_dir(fold))


def _train_and_evaluate(cfg: ExperimentConfig, run: RunLogger, on_epoch, evaluate_test: bool,
                        log_embeddings: bool, folds: int = 1, fold_seed: int = 0, on_fold=None,
                        log_model: bool = False) -> RunResult:
    if is_paired(cfg.dataset.name):
        if folds > 1:
            raise ValueError(f"folds={folds}: cross-validation folds are for image datasets, not the "
                             f"paired dataset {cfg.dataset.name!r}; use folds=1")
        from experiments.train.crossmodal_run import train_and_evaluate_paired

        return train_and_evaluate_paired(cfg, run, on_epoch, evaluate_test, log_embeddings)
    device = pick_device(cfg.device)
    run.set_tags({"tripletlab.device": str(device)})
    splits = load_dataset(cfg.dataset, cfg.seed)
    if folds > 1:
        from experiments.train.cross_validation import train_and_evaluate_folds

        return train_and_evaluate_folds(cfg, run, splits, device, folds, fold_seed, on_epoch, on_fold,
                                        evaluate_test, log_embeddings, log_model)
    train_split = with_dense_labels(splits.train)
    sampler = PKSampler(train_split.labels, cfg.batch.p, cfg.batch.k, cfg.seed)
    log_run_config(run, cfg, splits.info, int(train_split.labels.max()) + 1, sampler)
    checkpoints = Path(cfg.train.checkpoint_dir) / run.run_id if cfg.train.checkpoint_dir else None
    model, outcome = fit_model(cfg, run, train_split, sampler, splits.val, device, on_epoch,
                               lambda epoch, metrics: run.log_metrics(metrics, step=epoch), checkpoints)
    if log_model:
        log_weights(run, model)
    if not evaluate_test:
        return finish_run(run, cfg, outcome, None, None)
    embeddings, labels = embed_test(cfg, model, splits, device)
    gallery = embed_gallery(cfg, model, splits, device)
    test = score_test(cfg, embeddings, labels, gallery)
    npz = None
    if log_embeddings and cfg.tracking.log_embeddings:
        npz = {"embeddings": embeddings.cpu().numpy(), "labels": labels.cpu().numpy()}
        if gallery is not None:
            npz.update(ref_embeddings=gallery[0].cpu().numpy(), ref_labels=gallery[1].cpu().numpy())
    return finish_run(run, cfg, outcome, test, npz)


def run_experiment(cfg: ExperimentConfig, *, tracking_uri: str | None = None, experiment_name: str = "tripletlab",
                   parent_run_id: str | None = None, run_name: str | None = None, tags: dict[str, str] | None = None,
                   on_epoch: Callable[[int, dict[str, float]], bool] | None = None, evaluate_test: bool = True,
                   log_embeddings: bool = True, folds: int = 1, fold_seed: int | None = None,
                   on_fold: Callable[[int, dict[str, float]], bool] | None = None,
                   log_model: bool = False) -> RunResult:
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
        "tripletlab.role": "train", "tripletlab.loss": cfg.loss.name, "tripletlab.dataset": cfg.dataset.name,
        "tripletlab.split": cfg.dataset.split, "tripletlab.seed": str(cfg.seed), "tripletlab.device": cfg.device,
        **provenance_tags(), **(tags or {}),
    }
    run = RunLogger(uri, experiment_id, run_name or f"{cfg.loss.name}-{cfg.dataset.name}-seed{cfg.seed}",
                    run_tags, parent_run_id)
    status = "FAILED"
    try:
        with system_metrics(run.run_id, uri):
            result = _train_and_evaluate(cfg, run, on_epoch, evaluate_test, log_embeddings, folds,
                                         cfg.seed if fold_seed is None else fold_seed, on_fold, log_model)
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
        run.set_tags({"tripletlab.error": mask_secrets(f"{type(exc).__name__}: {exc}")[:5000],
                      "tripletlab.traceback": mask_secrets(traceback.format_exc())[-5000:]})
        if not run.params_logged:
            run.log_params(flatten_config(cfg))
    except Exception:  # the store itself failing must not hide the original error
        pass


__all__ = ["NonFiniteLossError", "RunResult", "run_experiment"]
