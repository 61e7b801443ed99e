"""A small sweep written straight into a real MLflow SQLite store and a real Optuna journal.

It follows the MLflow layout of docs/design.md (parent / trial / final runs, per-epoch metrics,
``embeddings/test.npz``) without training anything, so the analysis tests can control every value
(validation geometry per epoch falls as the run's quality rises).
``copy_store`` copies a real sweep's store so a test can write to the copy.
"""

from __future__ import annotations

import math
import shutil
import sqlite3
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from optuna.storages.journal import JournalFileBackend

from experiments.eval.geometry import GEOMETRY_KEYS
from experiments.eval.retrieval import HEADLINE_METRICS
from losses import STAT_NAMES

TEST_METRICS = tuple(HEADLINE_METRICS)


@dataclass
class LoggedSweep:
    name: str
    tracking_uri: str
    storage: str
    output_dir: Path
    losses: tuple[str, ...]
    seeds: tuple[int, ...]


def _space(loss: str) -> dict:
    if loss == "multi_similarity":
        return {"loss.alpha": optuna.distributions.FloatDistribution(0.5, 10.0, log=True)}
    space = {"loss.margin": optuna.distributions.FloatDistribution(0.01, 1.0)}
    if loss == "triplet":
        space["loss.mining"] = optuna.distributions.CategoricalDistribution(
            ("all", "semi-hard-triplets", "hard-triplets")
        )
    return space


def _embeddings(
    rng: np.random.Generator, separation: float, classes: int = 5, per_class: int = 16, dim: int = 8
):
    centres = rng.normal(size=(classes, dim)) * separation
    labels = np.repeat(np.arange(classes), per_class)
    emb = centres[labels] + rng.normal(size=(labels.size, dim))
    return (emb / np.linalg.norm(emb, axis=1, keepdims=True)).astype(np.float32), labels.astype(np.int64)


def build_logged_sweep(
    root: Path,
    name: str = "tiny-sweep",
    losses=("triplet", "batch_hard", "multi_similarity"),
    seeds=(0, 1, 2),
    trials: int = 5,
    epochs: int = 3,
    embeddings_for=None,
) -> LoggedSweep:
    """Log a sweep under ``root``; ``embeddings_for`` limits which losses get an npz (default: all)."""
    rng = np.random.default_rng(0)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    exp_id = client.create_experiment(name, artifact_location=(root / "mlartifacts").as_uri())
    output_dir = root / "runs" / name
    output_dir.mkdir(parents=True)
    storage_path = output_dir / "optuna.journal"
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(storage_path)))
    embeddings_for = set(losses if embeddings_for is None else embeddings_for)

    def run(role, loss, parent=None, run_name=None, extra_tags=None):
        tags = {
            "tripletlab.role": role,
            "tripletlab.loss": loss,
            "tripletlab.dataset": "digits",
            **(extra_tags or {}),
        }
        if parent:
            tags["mlflow.parentRunId"] = parent
        return client.create_run(exp_id, tags=tags, run_name=run_name).info.run_id

    def log_epochs(run_id, quality, scale):
        metrics = []
        for epoch in range(1, epochs + 1):
            values = {
                "train/loss": scale * 0.7**epoch,
                "val/map_at_r": quality * (1 - 0.5**epoch),
                "val/precision_at_1": quality * 1.2 * (1 - 0.5**epoch),
                "val/r_precision": quality * 1.1 * (1 - 0.5**epoch),
                "epoch_seconds": 0.5,
            }
            values.update({f"train/{s}": 0.9**epoch * (0.8 if "fraction" in s else 1.0) for s in STAT_NAMES})
            values.update(
                {f"val/{k}": (1 + i) * (1 - quality) * 0.8**epoch for i, k in enumerate(GEOMETRY_KEYS)}
            )
            metrics += [Metric(k, v, 1000 + epoch, epoch) for k, v in values.items()]
        client.log_batch(run_id, metrics=metrics)

    for index, loss in enumerate(losses):
        space = _space(loss)
        study = optuna.create_study(study_name=f"{name}/{loss}", storage=storage, direction="maximize")
        parent = run("parent", loss, run_name=loss)
        best_value, best_params = -math.inf, None
        for number in range(trials):
            params = {
                k: (
                    d.choices[number % len(d.choices)]
                    if isinstance(d, optuna.distributions.CategoricalDistribution)
                    else float(d.low + (d.high - d.low) * rng.uniform())
                )
                for k, d in space.items()
            }
            pruned = number == trials - 1
            value = float(0.3 + 0.1 * index + 0.2 * rng.uniform())
            study.add_trial(
                optuna.trial.create_trial(
                    params=params,
                    distributions=space,
                    value=None if pruned else value,
                    intermediate_values={1: value / 2},
                    state=optuna.trial.TrialState.PRUNED if pruned else optuna.trial.TrialState.COMPLETE,
                )
            )
            trial_run = run(
                "trial",
                loss,
                parent,
                f"{loss}-trial-{number}",
                {
                    "optuna.study_name": f"{name}/{loss}",
                    "optuna.trial_number": str(number),
                    "tripletlab.trial_state": "pruned" if pruned else "complete",
                },
            )
            client.log_batch(
                trial_run,
                metrics=[Metric("val/best_map_at_r", value, 0, 0)],
                params=[Param(k, str(v)) for k, v in params.items()],
            )
            log_epochs(trial_run, value, 1.0 + index)
            client.set_terminated(trial_run)
            if not pruned and value > best_value:
                best_value, best_params = value, params
        test_values = {m: [] for m in TEST_METRICS}
        for seed in seeds:
            final = run("final", loss, parent, f"{loss}-seed-{seed}", {"tripletlab.seed": str(seed)})
            quality = 0.4 + 0.1 * index + 0.02 * seed + 0.01 * rng.standard_normal()
            values = {f"test/{m}": quality * (1 + 0.1 * j) for j, m in enumerate(TEST_METRICS)}
            values.update(
                {
                    "test/easy_fraction": 0.5,
                    "test/semi_hard_fraction": 0.3,
                    "test/hard_fraction": 0.2,
                    "test/alignment": 0.5 - 0.05 * index,
                    "test/uniformity": -2.0 - 0.1 * index,
                    "val/best_map_at_r": quality,
                    "train_seconds": 3.0 + seed,
                    "cost/step_ms": 20.0 + index,
                    "cost/loss_ms": 1.0 + index + seed,
                    "cost/loss_peak_mb": 0.5 * (1 + index),
                }
            )
            for m in TEST_METRICS:
                test_values[m].append(values[f"test/{m}"])
            client.log_batch(
                final,
                metrics=[Metric(k, v, 0, 0) for k, v in values.items()],
                params=[Param(k, str(v)) for k, v in best_params.items()],
            )
            log_epochs(final, quality, 1.0 + index)
            if loss in embeddings_for:
                emb, labels = _embeddings(rng, separation=1.0 + index)
                path = root / "npz" / final / "test.npz"
                path.parent.mkdir(parents=True)
                np.savez(path, embeddings=emb, labels=labels)
                client.log_artifact(final, str(path), artifact_path="embeddings")
            client.set_terminated(final)
        parent_metrics = {
            "best_val_map_at_r": best_value,
            "trials_complete": trials - 1,
            "trials_pruned": 1,
            "trials_failed": 0,
        }
        for m, vals in test_values.items():
            parent_metrics[f"final/test/{m}_mean"] = float(np.mean(vals))
        client.log_batch(
            parent,
            metrics=[Metric(k, v, 0, 0) for k, v in parent_metrics.items()],
            params=[Param(f"best.{k}", str(v)) for k, v in best_params.items()],
        )
        client.set_terminated(parent)
    return LoggedSweep(name, uri, str(storage_path), output_dir, tuple(losses), tuple(seeds))


def copy_store(root: Path, destination: Path) -> str:
    """Copy a sweep's working directory (SQLite store, artifacts, runs/) and re-point the store's
    absolute artifact locations at the copy, so a test can write to it without touching the original.
    Returns the copy's tracking URI."""
    shutil.copytree(root, destination)
    old, new = root.resolve().as_uri(), destination.resolve().as_uri()
    with sqlite3.connect(destination / "mlflow.db") as db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)", (old, new))
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    return f"sqlite:///{destination / 'mlflow.db'}"
