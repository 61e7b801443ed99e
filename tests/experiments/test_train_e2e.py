"""``tripletlab train`` and ``run_experiment`` end to end on tiny digits, with a real SQLite MLflow
store: finished, failed, killed and pruned runs, reproducibility, checkpoints and clear errors."""

import gzip
import io
import struct
import zipfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

from experiments.config import load_config
from experiments.models.image import build_model
from experiments.tracking.store import prepare_store
from experiments.train.loop import read_checkpoint
from experiments.train.run import NonFiniteLossError, run_experiment
from losses import STAT_NAMES
from tripletlab.cli import main as cli_main

TINY = [
    "epochs=2",
    "dataset.max_per_class=24",
    "batch.p=4",
    "batch.k=4",
    "model.embedding_dim=16",
    "device=cpu",
]


@dataclass
class Store:
    """A test's view of the shared store: its own MLflow experiment."""

    uri: str
    experiment: str

    def runs(self):
        client = MlflowClient(self.uri)
        experiment = client.get_experiment_by_name(self.experiment)
        return client.search_runs([experiment.experiment_id]) if experiment else []

    def run(self, cfg, **kwargs):
        return run_experiment(cfg, tracking_uri=self.uri, experiment_name=self.experiment, **kwargs)

    def train(self, *args):
        return cli_main(["train", "--tracking-uri", self.uri, "--experiment", self.experiment, *args])


@pytest.fixture(scope="module")
def module_store(tmp_path_factory):
    """One SQLite store per module (creating and migrating one costs seconds)."""
    return prepare_store(f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}")


@pytest.fixture
def store(module_store, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRIPLETLAB_PROGRESS", "0")
    return Store(module_store, request.node.name)


def assert_none_running(store):
    assert [r.info.run_id for r in store.runs() if r.info.status == "RUNNING"] == []


def test_train_command_logs_a_finished_run(store, tmp_path, capsys):
    assert store.train(*TINY) == 0
    assert "test  precision_at_1" in capsys.readouterr().out
    (run,) = store.runs()
    client = MlflowClient(store.uri)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["tripletlab.role"] == "train" and tags["tripletlab.loss"] == "batch_hard"
    assert tags["tripletlab.dataset"] == "digits" and tags["tripletlab.split"] == "standard"
    assert tags["tripletlab.device"] == "cpu" and tags["tripletlab.seed"] == "0"
    assert tags["tripletlab.version.torch"] == version("torch")
    assert "tripletlab.git_commit" in tags and "tripletlab.error" not in tags
    params = run.data.params
    assert params["batch.p"] == "4" and params["loss.name"] == "batch_hard" and "loss.margin" in params
    assert params["data.classes_with_replacement"] == "0"
    for key in [
        "train/loss",
        "val/map_at_r",
        "val/precision_at_1",
        "val/r_precision",
        "epoch_seconds",
        *(f"train/{s}" for s in STAT_NAMES),
    ]:
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2], key
    for key in [
        "test/map_at_r",
        "test/precision_at_1",
        "test/r_precision",
        "test/recall_at_8",
        "test/nmi",
        "test/alignment",
        "test/uniformity",
        "test/intra_class_distance",
        "test/inter_class_distance",
        "test/easy_fraction",
        "test/semi_hard_fraction",
        "test/hard_fraction",
        "val/best_map_at_r",
        "train_seconds",
    ]:
        assert key in run.data.metrics, key
    metrics = run.data.metrics
    assert 0.0 <= metrics["test/map_at_r"] <= 1.0
    assert metrics["test/easy_fraction"] + metrics["test/semi_hard_fraction"] + metrics[
        "test/hard_fraction"
    ] == pytest.approx(1.0)
    assert not any(k.startswith("test/verification_") for k in metrics)  # digits: not an identity dataset
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert artifacts.is_relative_to(tmp_path / "mlartifacts")
    assert load_config(str(artifacts / "config.yaml"), []).batch.p == 4
    with np.load(artifacts / "embeddings" / "test.npz") as npz:
        assert npz["embeddings"].shape == (len(npz["labels"]), 16)
        assert np.allclose(np.linalg.norm(npz["embeddings"], axis=1), 1.0, atol=1e-5)
    assert (artifacts / "metrics.json").is_file() and (artifacts / "split.json").is_file()


def test_auto_batch_p_is_logged_as_the_resolved_value(store, tmp_path):
    """batch.p=0 (the default) trains on every class of digits' 10 and records P=10, not 0."""
    result = store.run(
        load_config(None, ["epochs=1", "dataset.max_per_class=24", "model.embedding_dim=8", "device=cpu"]),
        evaluate_test=False,
    )
    run = MlflowClient(store.uri).get_run(result.run_id)
    assert run.data.params["batch.p"] == "10" and run.data.params["batch.k"] == "4"
    artifacts = Path(run.info.artifact_uri.removeprefix("file://"))
    assert load_config(str(artifacts / "config.yaml"), []).batch.p == 10


def test_same_seed_gives_identical_metrics(store):
    cfg = load_config(None, TINY)
    first = store.run(cfg)
    second = store.run(cfg)
    strip = lambda history: [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]  # noqa: E731
    assert strip(first.history) == strip(second.history)
    assert first.test_metrics == second.test_metrics
    other = store.run(load_config(None, [*TINY, "seed=1"]), evaluate_test=False)
    assert strip(other.history) != strip(first.history) and other.test_metrics is None


def test_training_beats_the_untrained_network(store):
    cfg = load_config(None, ["epochs=3", "dataset.max_per_class=60", "device=cpu"])
    result = store.run(cfg)
    from experiments.data.device_data import DeviceImages
    from experiments.data.registry import load_dataset
    from experiments.eval.run_metrics import embed_split, validation_metrics

    test = load_dataset(cfg.dataset, cfg.seed).test
    untrained = build_model("auto", 1, (8, 8), cfg.model.embedding_dim, True, cfg.seed)
    baseline = validation_metrics(*embed_split(untrained, DeviceImages(test, "cpu"), 512))
    assert result.test_metrics["map_at_r"] > baseline["map_at_r"] + 0.2


def _failed(store, match):
    (run,) = store.runs()
    assert run.info.status == "FAILED"
    assert match in run.data.tags["tripletlab.error"]
    return run


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optimiser.lr=0.1"], "unknown config key 'optimiser.lr'"),
        (["loss.margn=0.1"], "unknown parameter(s) margn for loss 'batch_hard'"),
    ],
)
def test_config_errors_are_clear_and_start_no_run(store, capsys, overrides, message):
    assert store.train(*TINY, *overrides) == 2
    assert message in capsys.readouterr().err
    assert_none_running(store)


def _write_idx(path: Path, magic: int, dims: tuple[int, ...], values: np.ndarray) -> None:
    header = struct.pack(">" + "i" * (1 + len(dims)), magic, *dims)
    path.write_bytes(gzip.compress(header + values.astype(np.uint8).tobytes()))


def test_data_errors_fail_the_run_with_the_reason(store, tmp_path, capsys):
    base = [*TINY, "dataset.name=fashion-mnist"]
    assert store.train(*base, f"dataset.path={tmp_path / 'missing'}") == 2
    assert "does not exist" in capsys.readouterr().err
    _failed(store, "does not exist")

    folder = tmp_path / "fmnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 40), ("t10k", 20)):
        _write_idx(
            folder / f"{prefix}-images-idx3-ubyte.gz", 1234, (n, 28, 28), rng.integers(0, 255, n * 784)
        )
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, (n,), np.arange(n) % 10)
    assert store.train(*base, f"dataset.path={folder}") == 2
    assert "expected IDX magic number 2051, found 1234" in capsys.readouterr().err
    assert sum(r.info.status == "FAILED" for r in store.runs()) == 2
    assert_none_running(store)


def test_more_classes_per_batch_than_training_classes(store, capsys):
    assert store.train(*TINY, "dataset.split=class-disjoint", "batch.p=5") == 2
    assert "batch.p=5 exceeds the 3 classes" in capsys.readouterr().err
    _failed(store, "batch.p=5")


def test_exception_in_training_fails_the_run(store):
    def explode(epoch, metrics):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        store.run(load_config(None, TINY), on_epoch=explode)
    run = _failed(store, "RuntimeError: boom")
    assert "loss.margin" in run.data.params


def test_non_finite_loss(store):
    with pytest.raises(NonFiniteLossError, match="lower optimizer.lr"):
        store.run(load_config(None, [*TINY, "optimizer.lr=1e30", "optimizer.warmup_fraction=0"]))
    _failed(store, "NonFiniteLossError")


def test_pruned_run_finishes_early(store):
    seen = []
    result = store.run(
        load_config(None, [*TINY, "epochs=3"]),
        tags={"tripletlab.role": "trial"},
        on_epoch=lambda epoch, metrics: seen.append((epoch, metrics["val/map_at_r"])) or True,
    )
    assert result.pruned and len(result.history) == 1 and seen[0][0] == 1
    assert result.val_metrics["map_at_r"] == seen[0][1]
    (run,) = store.runs()
    assert run.info.status == "FINISHED"
    assert run.data.tags["tripletlab.stopped"] == "pruned" and run.data.tags["tripletlab.role"] == "trial"


def test_keyboard_interrupt_kills_the_run(store):
    def interrupt(epoch, metrics):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        store.run(load_config(None, TINY), on_epoch=interrupt)
    (run,) = store.runs()
    assert run.info.status == "KILLED"


def test_parent_run_and_checkpoints(store, tmp_path):
    client = MlflowClient(store.uri)
    parent = store.run(load_config(None, [*TINY, "epochs=1"]), evaluate_test=False)
    cfg = load_config(
        None, [*TINY, f"train.checkpoint_dir={tmp_path / 'ckpt'}", "train.early_stopping_patience=1"]
    )
    child = store.run(cfg, parent_run_id=parent.run_id, log_embeddings=False)
    run = client.get_run(child.run_id)
    assert run.data.tags["mlflow.parentRunId"] == parent.run_id
    assert "embeddings" not in [a.path for a in client.list_artifacts(child.run_id)]
    folder = tmp_path / "ckpt" / child.run_id
    model = build_model("auto", 1, (8, 8), 16, True, seed=123)
    last, best = read_checkpoint(folder / "last.pt"), read_checkpoint(folder / "best.pt")
    model.load_state_dict(last["model"])
    assert last["epoch"] == len(child.history) and best["epoch"] >= 1


def test_identity_dataset_gets_verification_metrics(store, tmp_path):
    rng = np.random.default_rng(0)
    archive = tmp_path / "faces.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for subject in range(1, 9):
            face = rng.integers(0, 255, (20, 16))
            for k in range(1, 5):
                buffer = io.BytesIO()
                noisy = np.clip(face + rng.normal(0, 20, face.shape), 0, 255).astype(np.uint8)
                Image.fromarray(noisy).save(buffer, format="PPM")  # grey images are written as P5 PGM
                zf.writestr(f"att_faces/s{subject}/{k}.pgm", buffer.getvalue())
    cfg = load_config(
        "orl-faces",
        [
            "epochs=1",
            "batch.p=2",
            "batch.k=4",
            "model.embedding_dim=8",
            f"dataset.path={archive}",
            "device=cpu",
        ],
    )
    result = store.run(cfg)
    assert 0.0 <= result.test_metrics["verification_roc_auc"] <= 1.0
    assert "test/verification_accuracy" in store.runs()[0].data.metrics


def test_class_centre_loss_on_a_class_disjoint_split(store):
    """triplet_center gets num_classes/embedding_dim from the data and model, its centres from the
    seed, and dense labels although the training digits are a subset of 0..9."""
    cfg = load_config(None, [*TINY, "loss.name=triplet_center", "dataset.split=class-disjoint", "batch.p=3"])
    first, second = (store.run(cfg, evaluate_test=False) for _ in range(2))
    strip = lambda history: [{k: v for k, v in h.items() if k != "epoch_seconds"} for h in history]  # noqa: E731
    assert strip(first.history) == strip(second.history)
    params = MlflowClient(store.uri).get_run(first.run_id).data.params
    assert (params["loss.num_classes"], params["loss.embedding_dim"]) == ("3", "16")
