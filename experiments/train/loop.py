"""The training loop: PK batches from device-resident images, AdamW/SGD with linear warm-up and
cosine decay, channels-last convolutions, bf16 autocast on CUDA, gradient clipping, per-epoch
validation, early stopping, checkpoints. Loss and loss statistics are summed on the device and
read once per epoch, so a step never waits for the host (the nanoGPT/airbench recipe)."""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm import tqdm

from experiments.config import ExperimentConfig
from experiments.data.device_data import training_batches
from experiments.eval.run_metrics import channels_last, validate_split
from experiments.train.interrupts import raise_if_interrupted
from losses import STAT_NAMES, MetricLoss


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite (usually a learning rate that is too high)."""


@dataclass
class TrainOutcome:
    history: list[dict[str, float]] = field(default_factory=list)
    best_map_at_r: float = float("nan")
    best_epoch: int = 0
    stopped: str | None = None  # "pruned" | "early_stopping" | None
    train_seconds: float = 0.0


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: CUDA, then MPS, then CPU; otherwise the named device, checked to exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        return torch.device("mps" if mps is not None and mps.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(
            f"device={name} but {torch.cuda.device_count()} CUDA device(s) are available; "
            "use device=cpu or device=auto"
        )
    if device.type == "mps" and not (
        getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()
    ):
        raise ValueError("device=mps but MPS is not available; use device=cpu or device=auto")
    return device


def make_optimizer(cfg: ExperimentConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    opt = cfg.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(
            params, lr=opt.lr, momentum=opt.momentum, weight_decay=opt.weight_decay, nesterov=True
        )
    return torch.optim.AdamW(params, lr=opt.lr, weight_decay=opt.weight_decay)


def warmup_schedule(
    optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int, cosine: bool = True
):
    """Linear warm-up from ~0 to the base rate over ``warmup_steps``, then cosine decay to 0
    (SGDR, Loshchilov & Hutter 2017, without restarts) or a constant rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if not cosine:
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def make_scheduler(cfg: ExperimentConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The run's schedule: warm-up over ``optimizer.warmup_fraction`` of all steps (default 0.2,
    whatever the number of epochs), then ``optimizer.schedule``."""
    warmup = round(cfg.optimizer.warmup_fraction * total_steps)
    return warmup_schedule(optimizer, warmup, total_steps, cosine=cfg.optimizer.schedule == "cosine")


def progress_enabled() -> bool:
    return sys.stderr.isatty() and os.environ.get("TRIPLETLAB_PROGRESS", "1") != "0"


def save_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, epoch: int, config: dict | None = None
) -> None:
    """Model and optimizer state, the epoch and the resolved config (``ExperimentConfig.to_dict()``),
    so that the file alone rebuilds the model (``tripletlab evaluate CHECKPOINT``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch, "config": config},
        path,
    )


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint` (``model``, ``optimizer``, ``epoch``,
    ``config``), read with tensors only: a file that would run code on loading is refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise ValueError(
            f"{path} is not a readable checkpoint (torch.load with weights_only: "
            f"{type(exc).__name__}); pass a file written to train.checkpoint_dir"
        ) from None
    if not isinstance(state, dict) or "model" not in state:
        raise ValueError(f"{path} is not a checkpoint of train.checkpoint_dir (no 'model' state)")
    return state


def _loss_call(loss_fn: nn.Module) -> Callable:
    """``MetricLoss.forward`` validates its inputs with a host sync; after the first (checked)
    batch the loop calls ``compute`` directly, leaving non-finite values to the epoch-end check."""
    if isinstance(loss_fn, MetricLoss) and type(loss_fn).forward is MetricLoss.forward:
        return lambda emb, labels: loss_fn.compute(emb, labels, None, None)
    return loss_fn


def train(
    model: nn.Module,
    loss_fn: nn.Module,
    train_data,
    sampler,
    val_data,
    cfg: ExperimentConfig,
    device: torch.device,
    on_epoch: Callable[[int, dict], bool] | None = None,
    log_epoch: Callable[[int, dict], None] | None = None,
    checkpoint_dir: Path | None = None,
    validate: Callable[[nn.Module, object, int], dict[str, float]] | None = None,
) -> TrainOutcome:
    """Train ``model`` with ``loss_fn`` for ``cfg.epochs`` epochs of ``sampler``'s PK batches.

    After each validated epoch ``log_epoch(epoch, metrics)`` records the metrics and
    ``on_epoch(epoch, metrics)`` may return ``True`` to stop ("pruned"). With early stopping on,
    the best validation model is restored at the end. ``validate(model, val_data, batch_size)``
    gives the validation metrics (default: retrieval within the validation split).
    """
    validate = validate or validate_split
    params = list(model.parameters()) + list(loss_fn.parameters())
    optimizer = make_optimizer(cfg, params)
    steps = len(sampler)
    total = cfg.epochs * steps
    scheduler = make_scheduler(cfg, optimizer, total)
    forward = torch.compile(model) if cfg.train.compile else model
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.train.amp and device.type == "cuda")
    model.to(memory_format=torch.channels_last)  # faster convolutions on CUDA and on CPU (oneDNN) alike
    checked_loss, fast_loss = loss_fn, _loss_call(loss_fn)
    out, best_state, bad_epochs = TrainOutcome(), None, 0
    patience = cfg.train.early_stopping_patience
    start = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        epoch_start = time.perf_counter()
        loss_fn.set_progress((epoch - 1) / cfg.epochs)
        model.train()
        totals = torch.zeros(1 + len(STAT_NAMES), device=device)
        stat_counts = torch.zeros(len(STAT_NAMES), device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        for step, (images, labels) in enumerate(
            tqdm(
                training_batches(train_data, sampler),
                total=steps,
                desc=f"epoch {epoch}/{cfg.epochs}",
                leave=False,
                disable=not progress_enabled(),
            )
        ):
            raise_if_interrupted()
            images = channels_last(images)
            with amp:
                embeddings = forward(images)
            loss = (checked_loss if epoch == 1 and step == 0 else fast_loss)(embeddings.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip, foreach=device.type != "cpu")
            optimizer.step()
            scheduler.step()
            value = loss.detach().float()
            finite &= torch.isfinite(value) & torch.isfinite(embeddings.detach()).all()
            totals[0] += value
            for i, name in enumerate(STAT_NAMES):
                stat = getattr(loss_fn, "last_stats", {}).get(name)
                if stat is not None:
                    totals[1 + i] += stat
                    stat_counts[i] += 1
        sums = totals.tolist()  # the epoch's one host sync
        if not bool(finite):
            raise NonFiniteLossError(
                f"the training loss or embeddings became non-finite in epoch {epoch}; "
                f"lower optimizer.lr (now {cfg.optimizer.lr:g}) or set train.grad_clip"
            )
        counts = stat_counts.tolist()
        metrics = {"train/loss": sums[0] / steps}
        metrics.update({f"train/{n}": sums[1 + i] / counts[i] for i, n in enumerate(STAT_NAMES) if counts[i]})
        metrics["epoch_seconds"] = time.perf_counter() - epoch_start
        if val_data is not None and (epoch % cfg.eval.every == 0 or epoch == cfg.epochs):
            metrics.update({f"val/{k}": v for k, v in validate(model, val_data, cfg.eval.batch_size).items()})
            if not math.isfinite(metrics["val/map_at_r"]):
                raise NonFiniteLossError(
                    f"the validation embeddings became non-finite after epoch {epoch}; "
                    f"lower optimizer.lr (now {cfg.optimizer.lr:g}) or set train.grad_clip"
                )
            score = metrics["val/map_at_r"]
            if not out.best_epoch or score > out.best_map_at_r:
                out.best_map_at_r, out.best_epoch, bad_epochs = score, epoch, 0
                if patience:
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                if checkpoint_dir is not None:
                    save_checkpoint(checkpoint_dir / "best.pt", model, optimizer, epoch, cfg.to_dict())
            else:
                bad_epochs += 1
        if checkpoint_dir is not None:
            save_checkpoint(checkpoint_dir / "last.pt", model, optimizer, epoch, cfg.to_dict())
        out.history.append({"epoch": epoch, **metrics})
        if log_epoch is not None:
            log_epoch(epoch, metrics)
        if any(k.startswith("val/") for k in metrics):
            if on_epoch is not None and on_epoch(epoch, dict(metrics)):
                out.stopped = "pruned"
                break
            if patience and bad_epochs >= patience:
                out.stopped = "early_stopping"
                break
    if best_state is not None:
        model.load_state_dict(best_state)
    out.train_seconds = time.perf_counter() - start
    return out
