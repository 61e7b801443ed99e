"""``tripletlab evaluate`` end to end: a tiny digits sweep's final run and a training checkpoint,
re-tested into new MLflow runs (real SQLite store, real Optuna journal, real weights files)."""

from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from experiments.models.image import build_model
from experiments.tracking.store import prepare_store
from experiments.train.loop import read_checkpoint, save_checkpoint
from helpers.sweep_fixture import working_directory
from tripletlab.cli import main as cli_main

TRAIN = [
    "train",
    "epochs=1",
    "model.embedding_dim=16",
    "batch.p=8",
    "batch.k=4",
    "dataset.max_per_class=40",
    "optimizer.warmup_fraction=0",
    "device=cpu",
]


def _runs(uri: str, experiment: str, role: str) -> list:
    client = MlflowClient(tracking_uri=uri)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    return client.search_runs([experiment_id], filter_string=f"tags.`tripletlab.role` = '{role}'")


def _test_metrics(run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if k.startswith("test/")}


def _evaluate(root, *args) -> int:
    with working_directory(root):
        return cli_main(["evaluate", *args])


def test_a_sweep_final_run_is_re_evaluated_to_the_same_test_metrics(tiny_sweep, capsys):
    final = _runs(tiny_sweep.tracking_uri, tiny_sweep.experiment_name, "final")[0]
    client = MlflowClient(tracking_uri=tiny_sweep.tracking_uri)
    assert [a.path for a in client.list_artifacts(final.info.run_id, "model")] == ["model/weights.pt"]
    assert _evaluate(tiny_sweep.root, final.info.run_id, "--tracking-uri", tiny_sweep.tracking_uri) == 0
    out = capsys.readouterr().out
    [evaluation] = [
        r
        for r in _runs(tiny_sweep.tracking_uri, tiny_sweep.experiment_name, "evaluate")
        if r.data.tags["tripletlab.source_run"] == final.info.run_id
    ]
    assert evaluation.info.status == "FINISHED" and evaluation.info.run_id != final.info.run_id
    expected = _test_metrics(final)
    assert {"test/map_at_r", "test/precision_at_1", "test/nmi", "test/uniformity"} <= set(expected)
    assert _test_metrics(evaluation) == pytest.approx(expected, abs=1e-6)
    assert evaluation.data.params["loss.name"] == final.data.params["loss.name"]
    assert f"test/map_at_r {final.data.metrics['test/map_at_r']:.6g}" in out


def test_a_checkpoint_alone_is_re_evaluated_to_its_run_test_metrics(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with working_directory(tmp_path):
        assert cli_main([*TRAIN, "train.checkpoint_dir=checkpoints", "--tracking-uri", uri]) == 0
    [trained] = _runs(uri, "tripletlab", "train")
    checkpoint = tmp_path / "checkpoints" / trained.info.run_id / "last.pt"
    config = read_checkpoint(checkpoint)["config"]
    assert config["model"]["embedding_dim"] == 16 and config["loss"]["name"] == "batch_hard"
    capsys.readouterr()
    assert _evaluate(tmp_path, str(checkpoint), "--tracking-uri", uri) == 0
    [evaluation] = _runs(uri, "tripletlab", "evaluate")
    assert evaluation.data.tags["tripletlab.source_checkpoint"] == str(checkpoint.resolve())
    assert _test_metrics(evaluation) == pytest.approx(_test_metrics(trained), abs=1e-6)
    # the data override reaches the evaluation: a different seeded test half gives other metrics
    assert _evaluate(tmp_path, str(checkpoint), "dataset.max_per_class=20", "--tracking-uri", uri) == 0
    other = [r for r in _runs(uri, "tripletlab", "evaluate") if r.info.run_id != evaluation.info.run_id]
    assert other[0].data.params["dataset.max_per_class"] == "20"
    assert other[0].data.metrics["test/map_at_r"] != evaluation.data.metrics["test/map_at_r"]


def _error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_an_unknown_run_id_is_one_clear_line(tmp_path, capsys):
    uri = prepare_store(f"sqlite:///{tmp_path / 'mlflow.db'}")  # an existing store: no set-up lines
    capsys.readouterr()
    assert _evaluate(tmp_path, "0123456789abcdef0123456789abcdef", "--tracking-uri", uri) == 2
    assert "no MLflow run '0123456789abcdef0123456789abcdef'" in _error(capsys)


def test_a_run_without_weights_is_one_clear_line(tiny_sweep, capsys):
    trial = _runs(tiny_sweep.tracking_uri, tiny_sweep.experiment_name, "trial")[0]
    assert _evaluate(tiny_sweep.root, trial.info.run_id, "--tracking-uri", tiny_sweep.tracking_uri) == 2
    assert "logged no model weights (model/weights.pt)" in _error(capsys)


def test_a_checkpoint_without_config_or_file_is_one_clear_line(tmp_path, capsys):
    model = build_model("cnn", 1, (8, 8), 16)
    save_checkpoint(tmp_path / "old.pt", model, torch.optim.SGD(model.parameters(), lr=0.1), epoch=1)
    assert _evaluate(tmp_path, str(tmp_path / "old.pt")) == 2
    assert "carries no config" in _error(capsys)
    assert _evaluate(tmp_path, str(tmp_path / "missing.pt")) == 2
    assert "does not exist" in _error(capsys)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    assert _evaluate(tmp_path, str(tmp_path / "junk.pt")) == 2
    assert "not a readable checkpoint" in _error(capsys)


def test_overrides_that_would_change_the_model_are_refused(tmp_path, capsys):
    assert _evaluate(tmp_path, "some-run", "model.embedding_dim=8", "loss.margin=0.1") == 2
    assert "loss.margin, model.embedding_dim would change the trained model" in _error(capsys)
