"""Training one model of a run: the task's network and objective, the split on the device, the
loop, and the measured cost of a step and of the loss."""

from __future__ import annotations

from pathlib import Path

import torch

from experiments.config import ExperimentConfig
from experiments.data.sampler import PKSampler
from experiments.tracking.store import RunLogger
from experiments.train.loop import train
from experiments.train.loss_cost import training_batch_cost
from losses import build_loss


def fit_model(
    cfg: ExperimentConfig,
    run: RunLogger,
    task,
    train_split,
    sampler: PKSampler,
    val_split,
    device: torch.device,
    on_epoch,
    log_epoch,
    checkpoint_dir: Path | None,
):
    """Build ``task``'s model and objective, train on ``train_split`` (``sampler``'s PK batches)
    validating on ``val_split``, then log the cost: ``cost/step_ms`` (the training loop's time per
    step, validation left out) and the loss's own on one training batch
    (:mod:`experiments.train.loss_cost`); returns ``(model, TrainOutcome)``."""
    model = task.build_model(train_split, run.log_params).to(device)
    with torch.random.fork_rng(devices=[]):  # a loss drawing random numbers (triplet_center's centres)
        torch.manual_seed(cfg.seed)
        objective = task.objective(build_loss(cfg.loss.name, **cfg.loss.params)).to(device)
    train_data, val_data = task.device_data(train_split, val_split, device)
    outcome = train(
        model,
        objective,
        train_data,
        sampler,
        val_data,
        cfg,
        device,
        on_epoch=on_epoch,
        log_epoch=log_epoch,
        checkpoint_dir=checkpoint_dir,
        validate=task.validate,
    )
    step_ms = 1000 * sum(h["epoch_seconds"] for h in outcome.history) / (len(outcome.history) * len(sampler))
    run.log_metrics({"cost/step_ms": step_ms, **training_batch_cost(model, objective, train_data, sampler)})
    return model, outcome
