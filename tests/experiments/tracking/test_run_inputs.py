"""MLflow as its users expect: each run's dataset splits as dataset inputs (the UI's Dataset column)
and system metrics sampled while it trains; read back through ``MlflowClient``."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from mlflow import MlflowClient

from experiments.config import load_config
from experiments.tracking.dataset_inputs import dataset_inputs, log_dataset_inputs
from experiments.tracking.store import get_or_create_experiment
from experiments.tracking.system_metrics import SWITCH
from experiments.train.run import run_experiment

TINY = [
    "epochs=1",
    "dataset.max_per_class=24",
    "batch.p=4",
    "batch.k=4",
    "model.embedding_dim=8",
    "device=cpu",
]
DIGITS_INFO = {
    "dataset": "digits",
    "source": "scikit-learn load_digits",
    "split": "class-disjoint",
    "seed": 0,
    "max_per_class": 0,
    "train_classes": [0, 1, 3],
    "val_classes": [2],
    "test_classes": [5, 6],
    "counts": {"train": 300, "val": 90, "test": 200},
}


def contexts(run) -> dict[str, object]:
    return {
        tag.value: d.dataset
        for d in run.inputs.dataset_inputs
        for tag in d.tags
        if tag.key == "mlflow.data.context"
    }


def test_one_input_per_split_with_counts_and_a_digest_of_its_definition(tmp_path):
    inputs = dataset_inputs("digits", "", DIGITS_INFO)
    by_context = {i.tags[0].value: i.dataset for i in inputs}
    assert list(by_context) == ["train", "validation", "test"]
    assert {d.name for d in by_context.values()} == {"digits"}
    assert json.loads(by_context["test"].profile) == {
        "num_rows": 200,
        "num_classes": 2,
        "split": "class-disjoint",
    }
    assert json.loads(by_context["train"].source) == {"origin": "scikit-learn load_digits"}
    assert len({d.digest for d in by_context.values()}) == 3
    again = dataset_inputs("digits", "", DIGITS_INFO)
    assert [i.dataset.digest for i in again] == [i.dataset.digest for i in inputs]  # same data, same digest
    reseeded = dataset_inputs("digits", "", {**DIGITS_INFO, "seed": 1})
    assert all(a.dataset.digest != b.dataset.digest for a, b in zip(reseeded, inputs))
    local = dataset_inputs("folder", str(tmp_path), {**DIGITS_INFO, "counts": {"test": 4, "gallery": 9}})
    assert [i.tags[0].value for i in local] == ["test", "gallery"]
    assert local[0].dataset.source_type == "local"
    assert json.loads(local[0].dataset.source) == {"uri": str(tmp_path.resolve())}


def test_sweep_runs_carry_their_dataset_splits(tiny_sweep, tmp_path):
    client = MlflowClient(tracking_uri=tiny_sweep.tracking_uri)
    experiment = client.get_experiment_by_name(tiny_sweep.experiment_name)
    finals = client.search_runs([experiment.experiment_id], "tags.`tripletlab.role` = 'final'")
    assert len(finals) == len(tiny_sweep.losses) * tiny_sweep.seeds
    for run in finals:
        splits = contexts(run)
        assert set(splits) == {"train", "validation", "test"}
        assert {d.name for d in splits.values()} == {"digits"}
        split = json.loads(
            Path(client.download_artifacts(run.info.run_id, "split.json", str(tmp_path))).read_text()
        )
        for context, part in (("train", "train"), ("validation", "val"), ("test", "test")):
            assert json.loads(splits[context].profile)["num_rows"] == split["counts"][part]
    # runs with one seed trained and tested on the same data: one digest per split across losses
    by_seed = {}
    for run in finals:
        digests = tuple(sorted(d.digest for d in contexts(run).values()))
        by_seed.setdefault(run.data.tags["tripletlab.seed"], set()).add(digests)
    assert all(len(d) == 1 for d in by_seed.values()) and len(by_seed) == tiny_sweep.seeds
    # parent rows show their dataset too: every split any of their children used
    for parent in client.search_runs([experiment.experiment_id], "tags.`tripletlab.role` = 'parent'"):
        children = [r for r in finals if r.data.tags["mlflow.parentRunId"] == parent.info.run_id]
        assert {d.dataset.digest for d in parent.inputs.dataset_inputs} >= {
            d.digest for r in children for d in contexts(r).values()
        }


def test_runs_logging_the_same_dataset_at_once_all_get_it(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = get_or_create_experiment("inputs", uri)
    runs = [client.create_run(experiment).info.run_id for _ in range(6)]
    inputs = dataset_inputs("digits", "", DIGITS_INFO)
    with ThreadPoolExecutor(6) as pool:
        list(pool.map(lambda run_id: log_dataset_inputs(MlflowClient(uri), [run_id], inputs), runs))
    for run_id in runs:
        assert len(client.get_run(run_id).inputs.dataset_inputs) == 3


@pytest.mark.parametrize("switch", ["true", "false"])
def test_system_metrics_are_sampled_unless_switched_off(tmp_path, monkeypatch, switch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRIPLETLAB_PROGRESS", "0")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.1")
    monkeypatch.setenv(SWITCH, switch)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_experiment(load_config(None, TINY), tracking_uri=uri, experiment_name="system")
    metrics = MlflowClient(uri).get_run(result.run_id).data.metrics
    system = {k for k in metrics if k.startswith("system/")}
    if switch == "true":
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= system
        assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100 * 64
        assert metrics["system/system_memory_usage_megabytes"] > 0
    else:
        assert system == set()
