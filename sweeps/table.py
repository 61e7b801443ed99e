"""The comparison table: per loss, test metrics as mean and 95% t-interval over the final seeds.

As in "A Metric Learning Reality Check" (Musgrave et al., ECCV 2020): P@1, R-precision and MAP@R
on the held-out classes, each the mean over seeds with a Student-t confidence interval
``mean +- t_{0.975, n-1} * s / sqrt(n)`` (``s`` the sample standard deviation). A cross-validated
sweep (``folds`` > 1) shows the metrics of the folds' concatenated embeddings, marked "concat.",
and the MAP@R of the separated per-fold models (their mean) in a column of its own.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pandas as pd
from scipy import stats

TABLE_METRICS = ("precision_at_1", "r_precision", "map_at_r")
METRIC_LABELS = {"precision_at_1": "P@1", "r_precision": "R-precision", "map_at_r": "MAP@R"}


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the Student-t interval; the bounds are NaN for fewer than 2 values."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = [float(v) for v in values]
    if not values:
        return math.nan, math.nan, math.nan
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def short_value(value) -> str:
    """A hyperparameter value for the table and the progress lines: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def percent_cell(mean: float, low: float, high: float) -> str:
    """``mean [low, high]`` in %, the interval clipped to the metric's range [0, 100]."""
    if math.isnan(mean):
        return "n/a"
    if math.isnan(low):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} [{max(0.0, 100 * low):.1f}, {min(100.0, 100 * high):.1f}]"


def markdown_table(table: pd.DataFrame) -> str:
    """The table as GitHub Markdown: metrics in percent, ``mean [95% CI]``."""
    folds = "separated_map_at_r_mean" in table.columns
    kind = " concat." if folds else ""
    header = ["loss", *(f"{METRIC_LABELS[m]}{kind} (%)" for m in TABLE_METRICS),
              *(["MAP@R separated (%)"] if folds else []), "val MAP@R (%)",
              "trials c/p/f", "seeds", "compute (s)", "tuned hyperparameters"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for _, row in table.iterrows():
        cells = [f"`{row['loss']}`"]
        cells += [percent_cell(row[f"{m}_mean"], row[f"{m}_ci_low"], row[f"{m}_ci_high"]) for m in TABLE_METRICS]
        if folds:
            cells.append(percent_cell(row["separated_map_at_r_mean"], row["separated_map_at_r_ci_low"],
                                      row["separated_map_at_r_ci_high"]))
        cells.append("n/a" if math.isnan(row["best_val_map_at_r"]) else f"{100 * row['best_val_map_at_r']:.1f}")
        cells.append(f"{row['trials_complete']}/{row['trials_pruned']}/{row['trials_failed']}")
        cells.append(str(row["seeds"]))
        cells.append(f"{row['compute_seconds']:.0f}")
        cells.append(row["best_params"] or "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, out_dir: Path) -> tuple[Path, Path]:
    """Write ``comparison.csv`` and ``comparison.md`` into ``out_dir``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "comparison.csv", out_dir / "comparison.md"
    table.to_csv(csv_path, index=False)
    md_path.write_text(markdown_table(table))
    return csv_path, md_path
