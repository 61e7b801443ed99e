"""The training benchmark's quick mode on tiny Fashion-MNIST IDX and Omniglot npz files."""
import gzip
import json
import struct

import numpy as np

from benchmarks.bench_train import METHODS, main


def _write_idx(path, magic, dims, values):
    header = struct.pack(">" + "i" * (1 + len(dims)), magic, *dims)
    path.write_bytes(gzip.compress(header + values.astype(np.uint8).tobytes()))


def _fashion(folder, rng):
    folder.mkdir()
    for prefix, n in (("train", 160), ("t10k", 80)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 60, (n, 28, 28)) + labels[:, None, None] * 19  # class-dependent brightness
        _write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", 2051, (n, 28, 28), images)
        _write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", 2049, (n,), labels)


def _omniglot(path, rng):
    classes, drawers = 16, 4
    images = rng.random((classes, drawers, 105, 105)) > 0.1  # True = background
    np.savez(path, images=images, labels=np.arange(classes * drawers).reshape(classes, drawers) // drawers)


def test_quick_mode_writes_both_reports(tmp_path):
    rng = np.random.default_rng(0)
    _fashion(tmp_path / "fmnist", rng)
    _omniglot(tmp_path / "omniglot.npz", rng)
    out = tmp_path / "results"
    assert main(["--quick", "--fashion-mnist", str(tmp_path / "fmnist"), "--omniglot", str(tmp_path / "omniglot.npz"),
                 "--workers", "0", "--threads", "1", "--device", "cpu", "--out", str(out)]) == 0
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
