"""The comparison table: per loss, test metrics as mean and 95% t-interval over the final seeds.

As in "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020): P@1, R-precision and MAP@R
on the held-out classes, each the mean over seeds with a Student-t confidence interval
``mean +- t_{0.975, n-1} * s / sqrt(n)`` (``s`` the sample standard deviation;
:func:`sweeps.statistics.t_interval`). A cross-validated sweep (``folds`` > 1) shows the metrics
of the folds' concatenated embeddings, marked "concat.", and the MAP@R of the separated per-fold
models (their mean) in a column of its own. The metrics and their labels are
``experiments.eval.retrieval.HEADLINE_METRICS``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from experiments.eval.retrieval import HEADLINE_METRICS

from .markdown import markdown_lines

__all__ = ["markdown_table", "p_cell", "percent_cell", "short_value", "write_table"]
MAP_AT_R = HEADLINE_METRICS["map_at_r"]


def short_value(value) -> str:
    """A hyperparameter value for the tables and the progress lines: floats, and numbers given as text
    (as MLflow logs params), to 4 significant digits; anything else as it is."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def percent_cell(mean: float, low: float, high: float) -> str:
    """``mean [low, high]`` in %, the interval clipped to the metric's range [0, 100]."""
    if math.isnan(mean):
        return "n/a"
    if math.isnan(low):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} [{max(0.0, 100 * low):.1f}, {min(100.0, 100 * high):.1f}]"


def p_cell(p: float, digits: int = 2) -> str:
    """A p-value to ``digits`` significant digits, ``—`` where there is none (NaN: too few pairs)."""
    return "—" if math.isnan(p) else f"{p:.{digits}g}"


def markdown_table(table: pd.DataFrame) -> str:
    """The table as GitHub Markdown: metrics in percent, ``mean [95% CI]``."""
    folds = "separated_map_at_r_mean" in table.columns
    kind = " concat." if folds else ""
    header = [
        "loss",
        *(f"{label}{kind} (%)" for label in HEADLINE_METRICS.values()),
        *([f"{MAP_AT_R} separated (%)"] if folds else []),
        f"val {MAP_AT_R} (%)",
        "trials c/p/f",
        "seeds",
        "compute (s)",
        "tuned hyperparameters",
    ]
    rows = []
    for _, row in table.iterrows():
        cells = [f"`{row['loss']}`"]
        cells += [
            percent_cell(row[f"{m}_mean"], row[f"{m}_ci_low"], row[f"{m}_ci_high"]) for m in HEADLINE_METRICS
        ]
        if folds:
            cells.append(
                percent_cell(
                    row["separated_map_at_r_mean"],
                    row["separated_map_at_r_ci_low"],
                    row["separated_map_at_r_ci_high"],
                )
            )
        best = row["best_val_map_at_r"]
        cells.append("n/a" if math.isnan(best) else f"{100 * best:.1f}")
        cells.append(f"{row['trials_complete']}/{row['trials_pruned']}/{row['trials_failed']}")
        cells.append(str(row["seeds"]))
        cells.append(f"{row['compute_seconds']:.0f}")
        cells.append(row["best_params"] or "-")
        rows.append(cells)
    return "\n".join(markdown_lines(header, rows)) + "\n"


def write_table(table: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """Write ``comparison.csv`` and ``comparison.md`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "comparison.csv", out_dir / "comparison.md"
    table.to_csv(csv_path, index=False)
    md_path.write_text(markdown_table(table))
    return csv_path, md_path
