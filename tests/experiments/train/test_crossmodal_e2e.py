"""Cross-modal training end to end: digits with measured captions, two towers, a real MLflow store."""

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient

from experiments.config import load_config
from experiments.train.run import run_experiment


@pytest.fixture(scope="module")
def crossmodal_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("crossmodal")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    cfg = load_config("experiments/configs/digits-crossmodal.yaml", ["epochs=2", "batch.p=10", "batch.k=4"])
    return uri, run_experiment(cfg, tracking_uri=uri, experiment_name="cm")


def test_image_to_text_retrieval_beats_chance_by_far(crossmodal_run):
    _, result = crossmodal_run
    m = result.test_metrics
    assert m["image_to_text_recall_at_1"] > 10 * m["image_to_text_chance_recall_at_1"]
    assert m["text_to_image_recall_at_10"] > 10 * 10 * m["image_to_text_chance_recall_at_1"]
    assert 1 <= m["image_to_text_median_rank"] < 800 / 4
    assert 0 < m["map_at_r"] <= 1


def test_run_records_both_modalities(crossmodal_run, tmp_path):
    uri, result = crossmodal_run
    client = MlflowClient(uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["tripletlab.task"] == "cross-modal"
    assert "test/text_to_image_recall_at_5" in run.data.metrics
    assert [m.step for m in client.get_metric_history(result.run_id, "val/map_at_r")] == [1, 2]
    path = mlflow.artifacts.download_artifacts(
        run_id=result.run_id, artifact_path="embeddings/test.npz", dst_path=str(tmp_path), tracking_uri=uri
    )
    npz = np.load(path)
    n_test = round(1 / result.test_metrics["image_to_text_chance_recall_at_1"])
    assert 850 < n_test < 950  # half of each digit class tests
    assert npz["embeddings"].shape == npz["ref_embeddings"].shape == (n_test, 64)
    np.testing.assert_array_equal(npz["labels"], npz["ref_labels"])


def test_single_modality_loss_trains_on_concatenated_modalities(tmp_path):
    cfg = load_config(
        "experiments/configs/digits-crossmodal.yaml", ["epochs=1", "loss.name=batch_hard", "batch.k=4"]
    )
    result = run_experiment(cfg, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment_name="cm")
    assert result.test_metrics["image_to_text_recall_at_10"] > 0
    assert np.isfinite(result.history[0]["train/loss"])


def test_backbone_options_are_refused_not_ignored(tmp_path):
    """The paired image tower is the small CNN: model.freeze_bn and a crop are errors, and the run says so."""
    cfg = load_config(
        "experiments/configs/digits-crossmodal.yaml",
        [
            "epochs=1",
            "model.name=resnet18",
            "model.freeze_bn=true",
            "dataset.image_size=32",
            "dataset.crop_size=28",
        ],
    )
    with pytest.raises(
        ValueError, match=r"model\.freeze_bn, dataset\.crop_size are not supported .*remove them"
    ):
        run_experiment(cfg, tracking_uri=f"sqlite:///{tmp_path / 'm.db'}", experiment_name="cm")
