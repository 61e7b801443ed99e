"""The training benchmark's quick mode on tiny Fashion-MNIST IDX and Omniglot npz files."""

import json

import numpy as np

from benchmarks.bench_train import METHODS, main
from benchmarks.toy_data import write_fashion_mnist, write_omniglot


def test_quick_mode_writes_both_reports(tmp_path):
    rng = np.random.default_rng(0)
    write_fashion_mnist(tmp_path / "fmnist", rng)
    write_omniglot(tmp_path / "omniglot.npz", rng)
    out = tmp_path / "results"
    assert (
        main(
            [
                "--quick",
                "--fashion-mnist",
                str(tmp_path / "fmnist"),
                "--omniglot",
                str(tmp_path / "omniglot.npz"),
                "--workers",
                "0",
                "--threads",
                "1",
                "--device",
                "cpu",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads((out / "train-cpu-quick.json").read_text())
    assert report["epochs"] == 1 and set(report["datasets"]) == {"fashion-mnist", "omniglot"}
    for result in report["datasets"].values():
        for method in METHODS:
            assert len(result[method]["seconds_per_epoch"]) == 1
            assert result[method]["images_per_second"] > 0
            assert 0.0 <= result[method]["map_at_r"] <= 1.0
        assert result["speedup_vs_pml"] > 0
    markdown = (out / "train-cpu-quick.md").read_text()
    assert "| tripletlab |" in markdown and "| untrained |" in markdown and "## omniglot (P=" in markdown
