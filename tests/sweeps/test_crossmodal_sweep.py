"""A tiny cross-modal sweep and its analysis, end to end on real storage and a real MLflow store."""

import sys

import pandas as pd
from mlflow.tracking import MlflowClient

from tripletlab.cli import main


def test_crossmodal_sweep_and_report(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "umap", None)  # t-SNE: no numba compilation in this test
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "runs"
    code = main(
        [
            "sweep",
            "--config",
            "sweeps/configs/crossmodal.yaml",
            "--tracking-uri",
            uri,
            "--output-dir",
            str(out),
            "losses=[cross_modal_triplet,info_nce,batch_hard]",
            "trials=2",
            "seeds=1",
            "epochs=1",
            "batch.k=4",
        ]
    )
    assert code == 0
    table = pd.read_csv(out / "crossmodal" / "comparison.csv")
    assert set(table["loss"]) == {"cross_modal_triplet", "info_nce", "batch_hard"}

    assert (
        main(["analyze", "--experiment", "crossmodal", "--tracking-uri", uri, "--output-dir", str(out)]) == 0
    )
    report = out / "crossmodal" / "report"
    recall = pd.read_csv(report / "crossmodal_recall.csv", index_col="loss")
    assert set(recall.index) == {"cross_modal_triplet", "info_nce", "batch_hard"}
    assert (recall["image→text R@10 (%)"] > recall["chance R@1 (%)"]).all()
    assert (report / "crossmodal_projection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    html = (report / "report.html").read_text()
    assert "Cross-modal retrieval" in html and "id='crossmodal_projection'" in html

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("crossmodal")
    finals = client.search_runs([experiment.experiment_id], "tags.`tripletlab.role` = 'final'")
    assert len(finals) == 3
    assert all("test/image_to_text_recall_at_1" in r.data.metrics for r in finals)
