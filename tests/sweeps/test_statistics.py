"""The statistics, the Markdown tables and the metric labels that the sweep, the analysis and the
benchmarks share, each checked against an independent oracle (SciPy's own interval, tests and
bootstrap), and checks that no copy of them comes back."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from experiments.eval.retrieval import HEADLINE_METRICS
from sweeps.markdown import frame_markdown, markdown_lines
from sweeps.statistics import bootstrap_interval, paired_t_p_value, t_interval, wilcoxon_p_value

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("losses", "experiments", "sweeps", "analysis", "benchmarks", "tripletlab")


@pytest.mark.parametrize("confidence", [0.8, 0.95, 0.99])
@pytest.mark.parametrize("n", [2, 3, 7])
def test_t_interval_is_scipys_student_t_interval(n, confidence):
    values = np.random.default_rng(n).normal(0.6, 0.03, n)
    mean, low, high = t_interval(values, confidence)
    expected = stats.t.interval(confidence, n - 1, loc=values.mean(), scale=stats.sem(values))
    assert mean == pytest.approx(values.mean())
    assert (low, high) == pytest.approx(expected)


def test_t_interval_without_enough_values_and_with_a_bad_confidence():
    assert all(math.isnan(v) for v in t_interval([]))
    mean, low, high = t_interval([0.4])
    assert mean == 0.4 and math.isnan(low) and math.isnan(high)
    assert t_interval([0.5, 0.5, 0.5]) == (0.5, 0.5, 0.5)
    with pytest.raises(ValueError, match="confidence"):
        t_interval([0.1, 0.2], confidence=95)


def test_paired_t_p_value_is_scipys_ttest_rel():
    rng = np.random.default_rng(3)
    a = rng.normal(0.6, 0.02, 6)
    b = a - rng.normal(0.01, 0.01, 6)
    assert paired_t_p_value(a, b) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert paired_t_p_value(pd.Series(a), pd.Series(b)) == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert math.isnan(paired_t_p_value(a[:1], b[:1]))  # one pair
    assert math.isnan(paired_t_p_value(a, a - 0.01))  # every difference the same: no spread
    with pytest.raises(ValueError, match="same length"):
        paired_t_p_value(a, b[:-1])


def test_wilcoxon_p_value_is_scipys_signed_rank_test():
    d = np.random.default_rng(4).normal(0.005, 0.01, 9)
    assert wilcoxon_p_value(d) == pytest.approx(stats.wilcoxon(d).pvalue)
    assert math.isnan(wilcoxon_p_value([0.0, 0.0, 0.0]))


def test_bootstrap_interval_agrees_with_scipys_percentile_bootstrap():
    x = np.random.default_rng(6).exponential(0.3, 400)
    low, high = bootstrap_interval(x, resamples=4000, confidence=0.9, seed=2)
    reference = stats.bootstrap(
        (x,),
        np.mean,
        n_resamples=4000,
        confidence_level=0.9,
        method="percentile",
        rng=np.random.default_rng(9),
    ).confidence_interval
    assert low == pytest.approx(reference.low, abs=0.004) and high == pytest.approx(reference.high, abs=0.004)
    assert bootstrap_interval(x, resamples=250, seed=1) == bootstrap_interval(x, resamples=250, seed=1)


def test_markdown_lines_align_and_escape():
    lines = markdown_lines(["loss", "MAP@R", "note"], [["triplet", 0.5, "a|b"]], "lr")
    assert lines == ["| loss | MAP@R | note |", "|---|---:|---|", "| triplet | 0.5 | a\\|b |"]
    with pytest.raises(ValueError, match="align"):
        markdown_lines(["a"], [], "c")


def test_frame_markdown_puts_the_index_first():
    table = pd.DataFrame({"seeds": ["3"]}, index=pd.Index(["triplet"], name="loss"))
    assert frame_markdown(table) == "| loss | seeds |\n|---|---|\n| triplet | 3 |"


def test_short_value_formats_values_and_params_logged_as_text_alike():
    from sweeps.table import short_value

    assert short_value(0.00123456) == short_value("0.00123456") == "0.001235"
    assert short_value(8) == short_value("8") == "8"
    assert short_value("semi-hard") == "semi-hard" and short_value(True) == "True"


def test_p_cell():
    from sweeps.table import p_cell

    assert (p_cell(0.012345), p_cell(0.012345, 3), p_cell(math.nan)) == ("0.012", "0.0123", "—")


def test_every_table_labels_the_metrics_from_headline_metrics():
    from analysis.comparison import format_table
    from benchmarks.bench_reference import METRICS, SHORT
    from benchmarks.pml_names import PML_NAMES
    from sweeps.table import markdown_table

    assert set(PML_NAMES) == set(HEADLINE_METRICS)
    assert [SHORT[m] for m in METRICS] == list(HEADLINE_METRICS.values())
    row = {
        "loss": "triplet",
        "best_val_map_at_r": 0.5,
        "trials_complete": 1,
        "trials_pruned": 0,
        "trials_failed": 0,
        "seeds": 2,
        "compute_seconds": 1.0,
        "best_params": "",
        **{f"{m}_{s}": 0.5 for m in HEADLINE_METRICS for s in ("mean", "ci_low", "ci_high")},
    }
    header = markdown_table(pd.DataFrame([row])).splitlines()[0]
    assert [f"{label} (%)" for label in HEADLINE_METRICS.values()] == header.split(" | ")[1:4]
    table = pd.DataFrame(
        [
            {
                **row,
                "map_at_r_diff": 0.0,
                "p_value": 0.5,
                "tuned": "",
                "wall_clock_s": 1.0,
                "step_ms": 1.0,
                "loss_ms": 1.0,
                "loss_peak_mb": 1.0,
            }
        ]
    ).set_index("loss")
    shown = format_table(table, "triplet")
    assert [f"{label} % (95% CI)" for label in HEADLINE_METRICS.values()] == list(shown.columns[:3])


def _sources():
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            yield path.relative_to(ROOT).as_posix(), ast.parse(path.read_text(encoding="utf-8"))


# One definition each: the shared helpers and where they live. bench_losses.py still carries a copy of
# git_commit of its own, to go when it imports experiments.tracking.provenance's like the other benchmarks.
DECLARED_ONCE = {
    "t_interval": "sweeps/statistics.py",
    "paired_t_p_value": "sweeps/statistics.py",
    "wilcoxon_p_value": "sweeps/statistics.py",
    "bootstrap_interval": "sweeps/statistics.py",
    "markdown_lines": "sweeps/markdown.py",
    "frame_markdown": "sweeps/markdown.py",
    "git_commit": "experiments/tracking/provenance.py",
    "parse_override": "experiments/config.py",
    "parse_overrides": "experiments/config.py",
    "resolve_config_path": "experiments/config.py",
    "read_yaml_mapping": "experiments/config.py",
    "existing_store_uri": "experiments/tracking/store.py",
    "sqlite_file": "experiments/tracking/store.py",
    "find_experiment": "sweeps/tracking.py",
    "sweep_experiments": "sweeps/tracking.py",
    "short_value": "sweeps/table.py",
    "p_cell": "sweeps/table.py",
    "open_storage": "sweeps/storage.py",
    "default_storage": "sweeps/storage.py",
    "write_report": "benchmarks/reporting.py",
    "utc_now": "benchmarks/reporting.py",
}


def test_shared_helpers_are_defined_once():
    found = {}
    for path, tree in _sources():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in DECLARED_ONCE:
                found.setdefault(node.name, []).append(path)
    assert found == {name: [path] for name, path in DECLARED_ONCE.items()}


def test_metric_labels_and_statistical_tests_are_not_written_again():
    """The labels are only in HEADLINE_METRICS; SciPy's paired tests only in sweeps/statistics.py."""
    labels = set(HEADLINE_METRICS.values())
    copies = []
    for path, tree in _sources():
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and node.value in labels
                and path != "experiments/eval/retrieval.py"
            ):
                copies.append(f"{path}:{node.lineno} {node.value!r}")
            if (
                isinstance(node, ast.Attribute)
                and node.attr in ("ttest_rel", "wilcoxon", "bootstrap")
                and path != "sweeps/statistics.py"
            ):
                copies.append(f"{path}:{node.lineno} stats.{node.attr}")
    assert copies == []
