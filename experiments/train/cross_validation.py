"""One cross-validated run: a model per class-disjoint fold (``experiments.data.folds``), one MLflow run.

As in "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020): model ``i`` trains on the
other folds' classes and is validated on fold ``i``'s; at test time the folds' embeddings are
concatenated (``folds x d`` per image, L2-normalised again when the model normalises) and, to
compare, each model is also scored alone. Logged besides the keys of a single-model run:

- ``fold_<i>/<key>`` per fold and epoch (step = epoch): ``fold_<i>/train/loss``, ``fold_<i>/val/map_at_r``...;
- the plain keys (``val/map_at_r``, ``train/loss``...) per epoch as the mean over the folds that
  reached it, so a cross-validated run reads like a single one; ``RunResult.val_metrics`` is the
  mean of the folds' tested validation metrics (a sweep's objective), also in ``metrics.json``;
- ``test/<metric>`` of the concatenated embeddings, ``test/separated/<metric>`` the mean over the
  per-fold models, ``fold_<i>/test/<metric>`` each model's; ``embeddings/test.npz`` holds the
  concatenation; with ``log_model``, ``model/fold_<i>/weights.pt`` each model.

``on_epoch(step, metrics)`` gets step ``fold * epochs + epoch`` and the fold's metrics plus
``fold``; ``on_fold(fold, val_metrics)`` each fold's tested validation metrics once it is trained.
Either returning ``True`` stops the run, pruned, before the next fold.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from experiments.data.folds import class_folds, fold_parts, training_pool
from experiments.data.sampler import PKSampler
from experiments.train.fitting import fit_model
from experiments.train.record import (
    RunResult,
    log_embeddings_artifact,
    log_run_config,
    log_weights,
    tested_val_metrics,
)
from experiments.train.tasks import ImageTask, with_dense_labels


def mean_history(histories: list[list[dict[str, float]]]) -> list[dict[str, float]]:
    """Per epoch, the mean of each key over the folds whose history has that epoch and key."""
    epochs = sorted({entry["epoch"] for history in histories for entry in history})
    out = []
    for epoch in epochs:
        entries = [e for history in histories for e in history if e["epoch"] == epoch]
        keys = dict.fromkeys(k for e in entries for k in e if k != "epoch")
        out.append(
            {
                "epoch": epoch,
                **{k: sum(e[k] for e in entries if k in e) / sum(k in e for e in entries) for k in keys},
            }
        )
    return out


def _mean(dicts: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each key present in every dict."""
    keys = [k for k in dicts[0] if all(k in d for d in dicts)]
    return {k: sum(d[k] for d in dicts) / len(dicts) for k in keys}


def concatenated_embeddings(per_fold: list[torch.Tensor], normalize: bool) -> torch.Tensor:
    """The folds' embeddings side by side, ``(n, folds * d)``; L2-normalised when ``normalize``."""
    joined = torch.cat(per_fold, dim=1)
    return F.normalize(joined, dim=1) if normalize else joined


def test_fold_models(task: ImageTask, models: list, device):
    """Test metrics of the fold models: the concatenation's, plus ``separated/<metric>`` (their mean
    over the models); returns ``(metrics, per-model metrics, embeddings artifact arrays)``, the
    embeddings concatenated."""
    normalize = task.cfg.model.normalize
    embedded = [task.embed(model, task.splits.test, device) for model in models]
    galleries = [task.embed(model, task.splits.gallery, device) for model in models]
    test = concatenated_embeddings([e for e, _ in embedded], normalize), embedded[0][1]
    arrays = {"embeddings": test[0], "labels": test[1]}
    gallery = None
    if galleries[0] is not None:
        gallery = concatenated_embeddings([g for g, _ in galleries], normalize), galleries[0][1]
        arrays.update(ref_embeddings=gallery[0], ref_labels=gallery[1])
    metrics = task.score(*test, gallery)
    separated = [task.score(e, lab, g) for (e, lab), g in zip(embedded, galleries)]
    metrics.update({f"separated/{k}": v for k, v in _mean(separated).items()})
    return metrics, separated, arrays


def train_and_evaluate_folds(
    cfg,
    run,
    task: ImageTask,
    device,
    folds: int,
    fold_seed: int,
    on_epoch,
    on_fold,
    evaluate_test: bool,
    log_embeddings: bool,
    log_model: bool,
):
    """Cross-validate ``cfg`` on ``folds`` class-disjoint folds dealt by ``fold_seed`` (module docstring)."""
    splits = task.splits
    pool = training_pool(splits)
    fold_classes = class_folds(pool.classes(), folds, fold_seed)
    info = {**splits.info, "folds": folds, "fold_seed": fold_seed, "fold_classes": fold_classes}
    most_classes = len(pool.classes()) - min(len(f) for f in fold_classes)  # the largest training part
    log_run_config(
        run,
        cfg,
        info,
        most_classes,
        PKSampler(with_dense_labels(pool).labels, cfg.batch.p, cfg.batch.k, cfg.seed),
    )
    run.set_tags({"tripletlab.folds": str(folds)})
    checkpoints = Path(cfg.train.checkpoint_dir) / run.run_id if cfg.train.checkpoint_dir else None
    models, outcomes, fold_val, pruned = [], [], [], False
    for fold in range(folds):
        train_part, val_part = fold_parts(pool, fold_classes, fold)
        train_part = with_dense_labels(train_part)
        sampler = PKSampler(train_part.labels, cfg.batch.p, cfg.batch.k, cfg.seed)

        def log_epoch(epoch: int, metrics: dict[str, float], prefix: str = f"fold_{fold}/") -> None:
            run.log_metrics({prefix + k: v for k, v in metrics.items()}, step=epoch)

        def report(epoch: int, metrics: dict[str, float], fold: int = fold) -> bool:
            step = fold * cfg.epochs + epoch
            return on_epoch is not None and bool(on_epoch(step, {**metrics, "fold": fold}))

        model, outcome = fit_model(
            cfg,
            run,
            task,
            train_part,
            sampler,
            val_part,
            device,
            report,
            log_epoch,
            checkpoints / f"fold_{fold}" if checkpoints else None,
        )
        outcomes.append(outcome)
        fold_val.append(tested_val_metrics(cfg, outcome))
        if log_model:
            log_weights(run, model, fold)
        if evaluate_test:
            models.append(model)
        if outcome.stopped == "pruned" or (on_fold is not None and on_fold(fold, dict(fold_val[-1]))):
            pruned = True
            break

    history = mean_history([o.history for o in outcomes])
    for entry in history:
        run.log_metrics({k: v for k, v in entry.items() if k != "epoch"}, step=entry["epoch"])
    val_metrics = _mean(fold_val)
    final = {"train_seconds": sum(o.train_seconds for o in outcomes)}
    if "best_map_at_r" in val_metrics:
        final["val/best_map_at_r"] = val_metrics["best_map_at_r"]
        final.update({f"fold_{i}/val/best_map_at_r": v["best_map_at_r"] for i, v in enumerate(fold_val)})
    stopped = "pruned" if pruned else next((o.stopped for o in outcomes if o.stopped), None)
    if stopped:
        run.set_tags({"tripletlab.stopped": stopped})
    test = None
    if evaluate_test and not pruned:
        test, separated, arrays = test_fold_models(task, models, device)
        final.update({f"test/{k}": v for k, v in test.items()})
        final.update({f"fold_{i}/test/{k}": v for i, s in enumerate(separated) for k, v in s.items()})
        if log_embeddings and cfg.tracking.log_embeddings:
            log_embeddings_artifact(run, arrays)
    steps = max((len(o.history) for o in outcomes), default=0)
    run.log_metrics(final, step=steps)
    run.log_json(
        {"history": history, "val": val_metrics, "folds": fold_val, "test": test, **final}, "metrics.json"
    )
    return RunResult(run.run_id, history, val_metrics, test, pruned=pruned)
