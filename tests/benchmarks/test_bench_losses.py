"""The loss benchmark's quick mode: every registry loss gets timed, with ratios to PML and the floor."""

import json

from benchmarks import bench_losses
from losses import list_losses


def test_quick_run_reports_every_loss(tmp_path):
    assert bench_losses.main(["--quick", "--device", "cpu", "--threads", "1", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "losses-cpu.json").read_text())
    assert report["device"]["type"] == "cpu" and report["torch"] and report["git_commit"]
    rows = report["results"]
    assert {r["name"] for r in rows} >= set(list_losses())
    with_pml = {c.label for c in bench_losses.built_in_cases() if c.pml is not None}
    assert {
        "batch_hard",
        "semi_hard",
        "batch_all",
        "multi_similarity",
        "multi_similarity[miner=False]",
        "circle",
    } <= with_pml
    for r in rows:
        assert r["ours_ms"] > 0 and r["floor_ms"] > 0 and r["ratio_floor"] > 0
        assert (r["ratio_pml"] is not None and r["ratio_pml"] > 0) == (r["loss"] in with_pml)
    markdown = (tmp_path / "losses-cpu.md").read_text()
    assert "ours / PML" in markdown and report["git_commit"] in markdown
