"""The evaluation benchmark runs end to end in quick mode and writes its report."""

import json

from benchmarks import bench_eval


def test_quick_benchmark_writes_report(tmp_path):
    report = bench_eval.main(["--quick", "--cases", "400x5,400x40", "--out", str(tmp_path)])
    tag = report["device"]
    saved = json.loads((tmp_path / f"eval-{tag}.json").read_text())
    markdown = (tmp_path / f"eval-{tag}.md").read_text()
    assert saved["torch"] and saved["git_commit"] and saved["date"]
    assert [(c["n"], c["classes"]) for c in saved["cases"]] == [(400, 5), (400, 40)]
    for case in saved["cases"]:
        assert case["median_seconds"]["tripletlab"] > 0
        assert 0 < case["metrics"]["map_at_r"] < 1
        # same numbers as pytorch-metric-learning on the same inputs
        assert all(diff < 1e-6 for diff in case["max_abs_diff"].values())
        assert set(case["speedup"]) >= {"pml-faiss", "pml-torch"}
    assert "| 400 | 40 |" in markdown


def test_pml_skipped_where_its_knn_is_too_large(tmp_path):
    report = bench_eval.main(
        ["--quick", "--cases", "400x5", "--pml-max-neighbours", "1000", "--out", str(tmp_path)]
    )
    case = report["cases"][0]
    assert set(case["median_seconds"]) == {"tripletlab"}
    assert set(case["skipped"]) >= {"pml-faiss", "pml-torch"}
    assert "neighbours" in case["skipped"]["pml-torch"]
    markdown = (tmp_path / f"eval-{report['device']}.md").read_text()
    assert "| 400 | 5 | " in markdown and "skipped" in markdown
