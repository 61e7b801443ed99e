"""The end-to-end sweep benchmark runs a real (tiny) sweep and reports its wall time and trials."""

import json
import shutil

from benchmarks import bench_sweep


def test_quick_sweep_benchmark_writes_report(tmp_path):
    report = bench_sweep.main(["--config", "quick", "trials=2", "seeds=1", "--out", str(tmp_path)])
    saved = json.loads(next(tmp_path.glob("sweep-*.json")).read_text())
    assert saved["exit_status"] == 0 and saved["wall_seconds"] > 0
    assert saved["torch"] and saved["git_commit"] and saved["date"]
    assert set(saved["trials"]) == {"quick/batch_hard", "quick/multi_similarity"}
    for counts in saved["trials"].values():
        assert counts["complete"] + counts["pruned"] == 2 and counts["fail"] == 0
    markdown = next(tmp_path.glob("sweep-*.md")).read_text()
    assert "wall time" in markdown and "| complete |" in markdown
    if shutil.which("nvidia-smi") is None:
        assert report["gpu_utilisation"] is None and "not measured" in markdown
