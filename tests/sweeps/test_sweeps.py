"""End-to-end sweeps on digits: real training, a real Optuna storage and a real MLflow SQLite store."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import optuna
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from optuna.trial import TrialState

from experiments.config import from_dict
from experiments.train.tasks import build_run_model
from helpers.sweep_fixture import TINY_LOSSES, run_sweep, sweep_args, working_directory
from sweeps.config import load_sweep_config
from sweeps.context import SweepContext
from sweeps.storage import open_storage
from sweeps.study import make_pruner
from tripletlab.cli import main as cli_main


def _runs(sweep, role=None, parent=None):
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    experiment = client.get_experiment_by_name(sweep.experiment_name)
    filters = [f"tags.`tripletlab.role` = '{role}'"] if role else []
    if parent:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent}'")
    return client.search_runs(
        [experiment.experiment_id], filter_string=" and ".join(filters), max_results=1000
    )


def _study(sweep, loss):
    return optuna.load_study(study_name=f"{sweep.name}/{loss}", storage=open_storage(sweep.storage))


def test_each_loss_gets_its_budget_and_a_parent_with_trial_and_final_children(tiny_sweep):
    assert tiny_sweep.exit_code == 0
    parents = {r.data.tags["tripletlab.loss"]: r for r in _runs(tiny_sweep, "parent")}
    assert set(parents) == set(TINY_LOSSES)
    for loss, parent in parents.items():
        study = _study(tiny_sweep, loss)
        assert [t.state for t in study.trials] == [TrialState.COMPLETE] * tiny_sweep.trials
        trials = _runs(tiny_sweep, "trial", parent.info.run_id)
        finals = _runs(tiny_sweep, "final", parent.info.run_id)
        numbers = sorted(int(r.data.tags["optuna.trial_number"]) for r in trials)
        assert numbers == list(range(tiny_sweep.trials))
        assert {r.data.tags["tripletlab.trial_state"] for r in trials} == {"complete"}
        assert all(r.data.tags["optuna.study_name"] == f"{tiny_sweep.name}/{loss}" for r in trials)
        # tuning never sees the test classes
        assert all("test/map_at_r" not in r.data.metrics for r in trials)
        assert sorted(int(r.data.tags["tripletlab.seed"]) for r in finals) == [1, 2]
        best = study.best_trial
        assert all(r.data.params[f"{k}"] == str(v) for r in finals for k, v in best.params.items())
        assert parent.info.status == "FINISHED" and parent.info.run_name == loss
        params, metrics = parent.data.params, parent.data.metrics
        assert {f"best.{k}" for k in best.params} <= set(params)
        assert metrics["best_val_map_at_r"] == pytest.approx(best.value)
        assert (metrics["trials_complete"], metrics["trials_pruned"], metrics["trials_failed"]) == (3, 0, 0)
        tests = [r.data.metrics["test/map_at_r"] for r in finals]
        assert metrics["final/test/map_at_r_mean"] == pytest.approx(sum(tests) / len(tests))
        assert (
            metrics["final/test/map_at_r_ci_low"]
            < metrics["final/test/map_at_r_mean"]
            < metrics["final/test/map_at_r_ci_high"]
        )


def test_comparison_table_files_and_summary_run(tiny_sweep):
    table = pd.read_csv(tiny_sweep.output_dir / "comparison.csv")
    assert list(table["loss"]) == list(TINY_LOSSES)
    assert (table["seeds"] == 2).all() and (table["trials_complete"] == 3).all()
    assert (
        (table["map_at_r_ci_low"] <= table["map_at_r_mean"])
        & (table["map_at_r_mean"] <= table["map_at_r_ci_high"])
    ).all()
    assert table["precision_at_1_mean"].between(0, 1).all() and (table["compute_seconds"] > 0).all()
    markdown = (tiny_sweep.output_dir / "comparison.md").read_text()
    assert all(f"`{loss}`" in markdown for loss in TINY_LOSSES)
    assert "trials: 3" in (tiny_sweep.output_dir / "sweep.yaml").read_text()
    [summary] = _runs(tiny_sweep, "summary")
    client = MlflowClient(tracking_uri=tiny_sweep.tracking_uri)
    assert {a.path for a in client.list_artifacts(summary.info.run_id)} == {
        "comparison.csv",
        "comparison.md",
        "sweep.yaml",
    }


def test_rerunning_resumes_without_going_past_the_budget(tiny_sweep):
    again = run_sweep(tiny_sweep.root, name=tiny_sweep.name)
    assert again.exit_code == 0
    for loss in TINY_LOSSES:
        assert len(_study(again, loss).trials) == tiny_sweep.trials
    assert len(_runs(again, "parent")) == len(TINY_LOSSES) and len(_runs(again, "summary")) == 1
    assert len(_runs(again, "trial")) == len(TINY_LOSSES) * tiny_sweep.trials
    assert len(_runs(again, "final")) == len(TINY_LOSSES) * tiny_sweep.seeds


def test_a_changed_space_under_the_same_name_is_refused_before_training(tiny_sweep, capsys):
    with working_directory(tiny_sweep.root):
        code = cli_main(sweep_args(tiny_sweep.name, extra=["loss_overrides.batch_hard.margin=0.3"]))
    assert code == 2
    assert "already exists with another search space" in capsys.readouterr().err
    assert len(_study(tiny_sweep, "batch_hard").trials) == tiny_sweep.trials


def test_failed_and_pruned_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    sweep = run_sweep(
        tmp_path,
        name="broken",
        extra=[
            "trials=2",
            "seeds=1",
            "loss_overrides.multi_similarity.optimizer.lr=1.0e+30",
            "pruner={name: threshold, lower: 2.0}",
        ],
    )
    assert sweep.exit_code == 0
    failed = _study(sweep, "multi_similarity").trials
    assert [t.state for t in failed] == [TrialState.FAIL] * 2
    assert all(
        "non-finite" in t.user_attrs["fail_reason"] or "NaN" in t.user_attrs["fail_reason"] for t in failed
    )
    pruned = _study(sweep, "batch_hard").trials
    assert [t.state for t in pruned] == [TrialState.PRUNED] * 2 and all(t.intermediate_values for t in pruned)
    states = {
        (r.data.tags["tripletlab.loss"], r.data.tags["tripletlab.trial_state"]) for r in _runs(sweep, "trial")
    }
    assert states == {("multi_similarity", "failed"), ("batch_hard", "pruned")}
    assert all(
        "tripletlab.error" in r.data.tags
        for r in _runs(sweep, "trial")
        if r.data.tags["tripletlab.loss"] == "multi_similarity"
    )
    assert _runs(sweep, "final") == []  # nothing completed, so nothing to retrain
    table = pd.read_csv(sweep.output_dir / "comparison.csv")
    assert table.set_index("loss").loc["multi_similarity", "trials_failed"] == 2
    assert table.set_index("loss").loc["batch_hard", "trials_pruned"] == 2
    assert math.isnan(table.set_index("loss").loc["batch_hard", "map_at_r_mean"])


def test_sqlite_rdb_storage_with_heartbeat(tmp_path):
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    sweep = run_sweep(
        tmp_path, name="rdb", losses=("batch_hard",), extra=["trials=2", "seeds=1"], storage=storage
    )
    assert sweep.exit_code == 0
    rdb = open_storage(storage, heartbeat_interval=60, grace_period=600)
    assert isinstance(rdb, optuna.storages.RDBStorage) and rdb.get_heartbeat_interval() == 60
    study = optuna.load_study(study_name="rdb/batch_hard", storage=rdb)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert not (tmp_path / "runs" / "rdb" / "optuna.journal").exists()
    assert len(_runs(sweep, "final")) == 1


PLUGIN = '''
import torch
from losses import MetricLoss, register_loss
from losses.params import HyperParam


@register_loss("toy_contrastive")
class ToyContrastive(MetricLoss):
    """Contrastive loss (Hadsell et al. 2006) with margin m, for the plugin sweep test."""

    hyperparams = (HyperParam("margin", float, 0.5, "negative margin", low=0.0, high=2.0, search=(0.1, 1.0)),)
    paper = "Hadsell et al. 2006"

    def __init__(self, margin=0.5):
        super().__init__()
        self.margin = margin

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        d = torch.cdist(embeddings, embeddings)
        same = labels[:, None] == labels[None, :]
        off = ~torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos = d[same & off].pow(2)
        neg = (self.margin - d[~same]).clamp(min=0).pow(2)
        return torch.cat([pos, neg]).mean()
'''


def test_a_plugin_loss_is_swept_by_naming_it(tmp_path):
    plugin = tmp_path / "toy_plugin.py"
    plugin.write_text(PLUGIN)
    sweep = run_sweep(
        tmp_path,
        name="plugin",
        losses=("toy_contrastive",),
        extra=["trials=2", "seeds=1", f"plugins=[{plugin}]"],
    )
    assert sweep.exit_code == 0
    study = _study(sweep, "toy_contrastive")
    assert [t.state for t in study.trials] == [TrialState.COMPLETE] * 2
    assert all(0.1 <= t.params["loss.margin"] <= 1.0 for t in study.trials)
    assert len(_runs(sweep, "final")) == 1


def test_every_final_run_logs_weights_that_rebuild_its_model(tiny_sweep):
    client = MlflowClient(tracking_uri=tiny_sweep.tracking_uri)
    finals = _runs(tiny_sweep, "final")
    assert len(finals) == len(TINY_LOSSES) * tiny_sweep.seeds
    for run in finals:
        assert [a.path for a in client.list_artifacts(run.info.run_id, "model")] == ["model/weights.pt"]
    with tempfile.TemporaryDirectory() as tmp:
        run_id = finals[0].info.run_id
        config = Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text()
        cfg = from_dict(yaml.safe_load(config))
        weights = client.download_artifacts(run_id, "model/weights.pt", tmp)
        state = torch.load(weights, weights_only=True)
    model = build_run_model(cfg, (1, 8, 8))  # digits: 8x8 grey
    model.load_state_dict(state)  # every tensor fits the network the config rebuilds
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert _runs(tiny_sweep, "trial") and all(
        not client.list_artifacts(r.info.run_id, "model") for r in _runs(tiny_sweep, "trial")
    )


def _sweep(*overrides: str):
    return load_sweep_config("quick", list(overrides))


def test_folds_default_to_one_and_bad_fold_settings_are_refused():
    assert _sweep().folds == 1 and "folds: 4" in _sweep("folds=4").to_yaml()
    with pytest.raises(ValueError, match="'folds' must be an integer >= 1"):
        _sweep("folds=0")
    with pytest.raises(ValueError, match="pruner wilcoxon .* needs folds >= 2"):
        _sweep("pruner=wilcoxon")
    with pytest.raises(ValueError, match="one of median, hyperband, threshold, wilcoxon, none"):
        _sweep("pruner=wilcox")


def test_pruners_over_folds(tmp_path):
    def pruner(*overrides):
        return make_pruner(SweepContext(_sweep(*overrides), "", "", tmp_path))

    wilcoxon = pruner("folds=4", "pruner={name: wilcoxon, p_threshold: 0.2}")
    assert isinstance(wilcoxon, optuna.pruners.WilcoxonPruner) and wilcoxon._p_threshold == 0.2
    with pytest.raises(ValueError, match="pruner 'wilcoxon'"):
        pruner("folds=4", "pruner={name: wilcoxon, patience: 2}")
    hyperband = pruner("folds=3", "epochs=2", "pruner=hyperband")  # steps run over the epochs of every fold
    assert hyperband._max_resource == 6


def test_folds_on_a_split_that_trains_on_the_test_classes_fail_before_any_study(tmp_path, capsys):
    sweep = run_sweep(tmp_path, name="standard-folds", losses=("batch_hard",), extra=["folds=2"])
    assert sweep.exit_code == 2
    assert "use dataset.split=class-disjoint" in capsys.readouterr().err
    assert not Path(sweep.storage).exists()


def test_parent_runs_are_tagged_with_the_split_the_trials_train_on(tmp_path):
    """A sweep config that leaves ``dataset.split`` out trains on the experiment config's default
    split; its parent and summary runs must carry that split, not another default."""
    from experiments.config import ExperimentConfig
    from sweeps.tracking import _identity

    sweep = load_sweep_config(
        None, ["name=no-split", "losses=[batch_hard]", "experiment.dataset.name=digits"]
    )
    assert "split" not in sweep.experiment.get("dataset", {})
    ctx = SweepContext(sweep, str(tmp_path / "journal"), "sqlite:///mlflow.db", tmp_path)
    trained_on = from_dict(sweep.experiment).dataset.split
    assert trained_on == ExperimentConfig().dataset.split
    for role in ("parent", "summary"):
        assert _identity(ctx, role)["tripletlab.split"] == trained_on
