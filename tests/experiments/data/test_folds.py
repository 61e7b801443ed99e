"""k-fold class-disjoint cross-validation: the fold partition, and folds in a real sweep (a
fabricated Omniglot-format npz with 40 classes, a real Optuna journal, a real MLflow SQLite store)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from mlflow import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from experiments.config import DatasetConfig
from experiments.data.folds import class_folds, fold_parts, training_pool
from experiments.data.registry import load_dataset
from helpers.sweep_fixture import run_sweep, working_directory
from sweeps.storage import open_storage
from tripletlab.cli import main as cli_main

CLASSES, DRAWERS, FOLDS, DIM = 40, 12, 4, 16


def write_characters(path: Path, classes: int = CLASSES, drawers: int = DRAWERS, seed: int = 0) -> Path:
    """An Omniglot-format npz: per class a random 7x7 stroke pattern at 28x28, each drawer's copy
    with a tenth of its pixels flipped (True = background, as in the real files)."""
    rng = np.random.default_rng(seed)
    patterns = (rng.random((classes, 7, 7)) < 0.5).repeat(4, 1).repeat(4, 2)
    ink = patterns[:, None] ^ (rng.random((classes, drawers, 28, 28)) < 0.1)
    np.savez(path, images=~ink, labels=np.repeat(np.arange(classes)[:, None], drawers, 1))
    return path


def _dataset(path: Path, split: str = "class-disjoint") -> DatasetConfig:
    return DatasetConfig(name="omniglot", path=str(path), split=split)


def test_folds_are_balanced_disjoint_and_cover_every_class_once():
    classes = list(range(100, 123))  # 23 classes: folds of 6, 6, 6, 5
    folds = class_folds(classes, 4, seed=3)
    assert sorted(len(f) for f in folds) == [5, 6, 6, 6]
    assert sorted(c for f in folds for c in f) == classes
    assert class_folds(classes, 4, seed=3) == folds  # deterministic from the seed
    assert class_folds(classes, 4, seed=4) != folds
    assert class_folds(list(reversed(classes)), 4, seed=3) == folds  # the order given does not matter


def test_bad_fold_counts_say_what_to_change():
    with pytest.raises(ValueError, match="folds must be an integer >= 2"):
        class_folds(list(range(10)), 1, 0)
    with pytest.raises(ValueError, match="folds=4 needs at least 8 training classes.*hold 7:"):
        class_folds(list(range(7)), 4, 0)


def test_folds_of_a_real_split_never_touch_the_test_classes(tmp_path):
    splits = load_dataset(_dataset(write_characters(tmp_path / "chars.npz")), seed=0)
    pool = training_pool(splits)
    assert set(pool.classes()) == set(splits.train.classes()) | set(splits.val.classes())
    assert not set(pool.classes()) & set(splits.test.classes())
    folds = class_folds(pool.classes(), FOLDS, seed=0)
    assert sorted(c for f in folds for c in f) == pool.classes() == list(range(CLASSES // 2))
    held_out = []
    for index, classes in enumerate(folds):
        train, val = fold_parts(pool, folds, index)
        assert val.classes() == classes and not set(train.classes()) & set(classes)
        assert len(train) + len(val) == len(pool) == CLASSES // 2 * DRAWERS
        assert not set(train.classes()) & set(splits.test.classes())
        held_out.append(val.labels)
    assert sorted(torch.cat(held_out).tolist()) == sorted(pool.labels.tolist())  # each image validated once


def test_folds_refuse_a_split_whose_test_classes_are_trained_on(tmp_path):
    splits = load_dataset(_dataset(write_characters(tmp_path / "chars.npz"), "standard"), seed=0)
    with pytest.raises(ValueError, match="use dataset.split=class-disjoint"):
        training_pool(splits)


def _fold_settings(data: Path) -> list[str]:
    return [
        f"folds={FOLDS}",
        "trials=2",
        "seeds=1",
        "epochs=1",
        "dataset.name=omniglot",
        f"dataset.path={data}",
        "dataset.split=class-disjoint",
        "dataset.max_per_class=0",
        f"model.embedding_dim={DIM}",
        "batch.p=4",
        "batch.k=4",
    ]


@pytest.fixture(scope="module")
def fold_sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("fold-sweep")
    data = write_characters(root / "chars.npz")
    sweep = run_sweep(
        root, name="folds", losses=("batch_hard",), extra=[*_fold_settings(data), "pruner=median"]
    )
    assert sweep.exit_code == 0
    return sweep


def _client(sweep) -> MlflowClient:
    return MlflowClient(tracking_uri=sweep.tracking_uri)


def _runs(sweep, role: str) -> list:
    client = _client(sweep)
    experiment = client.get_experiment_by_name(sweep.experiment_name)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`tripletlab.role` = '{role}'")


def _study(sweep, loss: str = "batch_hard") -> optuna.Study:
    return optuna.load_study(study_name=f"{sweep.name}/{loss}", storage=open_storage(sweep.storage))


def _history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_a_trial_objective_is_the_mean_of_its_folds(fold_sweep):
    client = _client(fold_sweep)
    trials = _study(fold_sweep).trials
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    for trial in trials:
        run = client.get_run(trial.user_attrs["mlflow_run_id"])
        assert run.data.tags["tripletlab.folds"] == str(FOLDS) and run.data.params["data.folds"] == str(FOLDS)
        per_fold = [run.data.metrics[f"fold_{i}/val/map_at_r"] for i in range(FOLDS)]
        assert trial.value == pytest.approx(sum(per_fold) / FOLDS)
        assert run.data.metrics["val/map_at_r"] == pytest.approx(trial.value)
        # the median pruner saw the running mean of the folds at step fold * epochs + epoch
        assert trial.intermediate_values == pytest.approx(
            {i + 1: sum(per_fold[: i + 1]) / (i + 1) for i in range(FOLDS)}
        )
        assert all("fold_0/test/map_at_r" not in r.data.metrics for r in _runs(fold_sweep, "trial"))


def test_each_fold_trains_on_the_other_folds_classes(fold_sweep):
    [trial] = [r for r in _runs(fold_sweep, "trial") if r.data.tags["optuna.trial_number"] == "0"]
    with tempfile.TemporaryDirectory() as tmp:
        split = json.loads(
            Path(_client(fold_sweep).download_artifacts(trial.info.run_id, "split.json", tmp)).read_text()
        )
    folds = split["fold_classes"]
    assert sorted(c for f in folds for c in f) == list(range(CLASSES // 2))
    assert folds == class_folds(list(range(CLASSES // 2)), FOLDS, seed=0)  # dealt by the sweep seed
    assert not {c for f in folds for c in f} & set(split["test_classes"])


def test_final_runs_report_concatenated_and_separated_test_metrics(fold_sweep):
    client = _client(fold_sweep)
    [final] = _runs(fold_sweep, "final")
    metrics = final.data.metrics
    separated = [metrics[f"fold_{i}/test/map_at_r"] for i in range(FOLDS)]
    assert metrics["test/separated/map_at_r"] == pytest.approx(sum(separated) / FOLDS)
    assert 0 < metrics["test/map_at_r"] <= 1
    assert metrics["test/map_at_r"] != metrics["test/separated/map_at_r"]
    with tempfile.TemporaryDirectory() as tmp:
        with np.load(client.download_artifacts(final.info.run_id, "embeddings/test.npz", tmp)) as npz:
            embeddings, labels = npz["embeddings"], npz["labels"]
    assert embeddings.shape == (CLASSES // 2 * DRAWERS, FOLDS * DIM)  # folds x d per test image
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1, atol=1e-5)
    assert set(labels.tolist()) == set(range(CLASSES // 2, CLASSES))
    models = {a.path for a in client.list_artifacts(final.info.run_id, "model")}
    assert models == {f"model/fold_{i}" for i in range(FOLDS)}
    assert all(
        [a.path for a in client.list_artifacts(final.info.run_id, f"model/fold_{i}")]
        == [f"model/fold_{i}/weights.pt"]
        for i in range(FOLDS)
    )
    table = pd.read_csv(fold_sweep.output_dir / "comparison.csv").set_index("loss")
    assert table.loc["batch_hard", "map_at_r_mean"] == pytest.approx(metrics["test/map_at_r"])
    assert table.loc["batch_hard", "separated_map_at_r_mean"] == pytest.approx(
        metrics["test/separated/map_at_r"]
    )
    markdown = (fold_sweep.output_dir / "comparison.md").read_text()
    assert "MAP@R concat. (%)" in markdown and "MAP@R separated (%)" in markdown


def test_evaluate_a_cross_validated_final_run_reproduces_its_test_metrics(fold_sweep, capsys):
    [final] = _runs(fold_sweep, "final")
    with working_directory(fold_sweep.root):
        code = cli_main(["evaluate", final.info.run_id, "--tracking-uri", fold_sweep.tracking_uri])
    assert code == 0
    out = capsys.readouterr().out
    [evaluation] = _runs(fold_sweep, "evaluate")
    assert evaluation.data.tags["tripletlab.source_run"] == final.info.run_id
    assert evaluation.data.tags["tripletlab.folds"] == str(FOLDS)
    for key in (
        "test/map_at_r",
        "test/separated/map_at_r",
        "test/precision_at_1",
        "test/separated/r_precision",
    ):
        assert evaluation.data.metrics[key] == pytest.approx(final.data.metrics[key], abs=1e-6)
        assert f"{key} " in out


def test_wilcoxon_prunes_a_trial_after_the_folds_it_lost(tmp_path):
    """A best trial with a perfect MAP@R on every fold (a real trial added to the real study):
    a new trial loses on folds 0 and 1, so the Wilcoxon test (p = 0.25 < p_threshold 0.3) prunes
    it there, before folds 2 and 3 are trained."""
    data = write_characters(tmp_path / "chars.npz")
    storage = open_storage(str(tmp_path / "runs" / "wilcoxon" / "optuna.journal"))
    study = optuna.create_study(study_name="wilcoxon/batch_hard", storage=storage, direction="maximize")
    study.add_trial(
        optuna.trial.create_trial(
            params={"loss.margin": 0.2},
            distributions={"loss.margin": FloatDistribution(0.01, 1.0)},
            value=1.0,
            intermediate_values={i: 1.0 for i in range(FOLDS)},
        )
    )
    sweep = run_sweep(
        tmp_path,
        name="wilcoxon",
        losses=("batch_hard",),
        extra=[
            *_fold_settings(data),
            "pruner={name: wilcoxon, p_threshold: 0.3}",
            "loss_overrides.batch_hard.soft_margin=false",
            "loss_overrides.batch_hard.distance=euclidean",
            "loss_overrides.batch_hard.normalize=true",
        ],
    )
    assert sweep.exit_code == 0
    added, pruned = _study(sweep).trials
    assert pruned.state == TrialState.PRUNED
    assert sorted(pruned.intermediate_values) == [0, 1]  # reported at step = fold index
    run = _client(sweep).get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.data.tags["tripletlab.trial_state"] == run.data.tags["tripletlab.stopped"] == "pruned"
    assert [pruned.intermediate_values[i] for i in (0, 1)] == pytest.approx(
        [run.data.metrics[f"fold_{i}/val/map_at_r"] for i in (0, 1)]
    )
    assert "fold_2/val/map_at_r" not in run.data.metrics and "fold_3/train/loss" not in run.data.metrics
    assert all(math.isfinite(v) and v < 1 for v in pruned.intermediate_values.values())


def test_wilcoxon_without_folds_is_refused(tmp_path, capsys):
    sweep = run_sweep(tmp_path, name="nofolds", losses=("batch_hard",), extra=["pruner=wilcoxon"])
    assert sweep.exit_code == 2
    err = capsys.readouterr().err
    assert "pruner wilcoxon" in err and "folds >= 2" in err
