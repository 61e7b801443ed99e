"""The reference benchmark (PML's textbook pipeline against tripletlab's defaults) at toy size."""

import json

import numpy as np
import pytest
import torch

from benchmarks.bench_reference import METRICS, SIDES, TextbookNet, main, pml_accuracy
from experiments.eval.retrieval import retrieval_metrics


def _omniglot(path, rng, classes=16, drawers=4):
    """An Omniglot-layout npz whose classes differ in where the ink is."""
    images = np.ones((classes, drawers, 105, 105), dtype=bool)  # True = background
    for c in range(classes):
        row, col = divmod(c, 4)
        images[c, :, row * 26 : row * 26 + 20, col * 26 : col * 26 + 20] = rng.random((drawers, 20, 20)) > 0.7
    np.savez(path, images=images, labels=np.arange(classes * drawers).reshape(classes, drawers) // drawers)


def test_pml_accuracy_agrees_with_tripletlab_metrics():
    """Two independent implementations of P@1, R-precision and MAP@R give the same numbers."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(60) % 6
    embeddings = torch.randn(60, 8, generator=generator) + torch.nn.functional.one_hot(labels, 8).float()
    normalized = torch.nn.functional.normalize(embeddings, dim=1)
    ours = retrieval_metrics(normalized, labels, ks=(1,), with_nmi=False)
    theirs = pml_accuracy(embeddings, labels)
    assert theirs["precision_at_1"] == pytest.approx(float(ours["precision_at_1"]), abs=1e-6)
    assert theirs["r_precision"] == pytest.approx(float(ours["r_precision"]), abs=1e-6)
    assert theirs["mean_average_precision_at_r"] == pytest.approx(float(ours["map_at_r"]), abs=1e-6)


def test_textbook_net_is_the_described_network():
    net = TextbookNet(1)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128]
    assert sum(isinstance(m, torch.nn.MaxPool2d) for m in net.modules()) == 2
    assert net(torch.zeros(2, 1, 28, 28)).shape == (2, 64)


def test_toy_run_writes_both_sides_and_the_ratio(tmp_path):
    _omniglot(tmp_path / "omniglot.npz", np.random.default_rng(0))
    out = tmp_path / "results"
    assert (
        main(
            [
                "--omniglot",
                str(tmp_path / "omniglot.npz"),
                "--fashion-mnist",
                "",
                "--seeds",
                "2",
                "--epochs",
                "1",
                "--threads",
                "1",
                "--out",
                str(out),
                "--override",
                "batch.p=4",
                "--override",
                "batch.k=4",
                "--tag",
                "toy",
            ]
        )
        == 0
    )
    report = json.loads((out / "reference-cpu-toy.json").read_text())
    assert report["overrides"] == ["batch.p=4", "batch.k=4"]
    (result,) = report["datasets"].values()
    assert result["split"] == "class-disjoint" and result["test_classes"] == 8
    for side in SIDES:
        for metric in METRICS:
            values = result[side][metric]["values"]
            assert len(values) == 2 and all(0.0 <= v <= 1.0 for v in values)
            assert result[side][metric]["mean"] == pytest.approx(np.mean(values))
    for metric in METRICS:
        assert result["ratio"][metric] == pytest.approx(
            result["tripletlab"][metric]["mean"] / result["pml"][metric]["mean"]
        )
    markdown = (out / "reference-cpu-toy.md").read_text()
    assert "| pml |" in markdown and "| tripletlab / pml |" in markdown and "batch.p=4" in markdown
