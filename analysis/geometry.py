"""Embedding geometry over training: per epoch on the validation split (alignment, uniformity,
intra- and inter-class distance and their ratio, spectral decay rho; see
:mod:`experiments.eval.geometry`), and how each relates to retrieval across the sweep's runs.

The relation is Spearman's rank correlation of each quantity's last validated value with the run's
MAP@R: the test MAP@R across the final runs, and the validation MAP@R of the same epoch across the
trials (trials are never tested on the held-out classes).
"""

from __future__ import annotations

import math

import pandas as pd
from scipy import stats

from experiments.eval.geometry import GEOMETRY_KEYS

from .load import Sweep, final_run_histories

PANELS = (
    ("val/alignment", "Alignment (Wang & Isola 2020)", "E ||f(x) - f(x+)||², lower is better"),
    ("val/uniformity", "Uniformity (Wang & Isola 2020)", "log E exp(-2 ||f(x) - f(y)||²)"),
    ("val/intra_class_distance", "Intra-class distance", "mean distance, same class"),
    ("val/inter_class_distance", "Inter-class distance", "mean distance, other classes"),
    ("val/distance_ratio", "Intra / inter distance", "ratio, lower separates better"),
    ("val/spectral_decay", "Spectral decay ρ (Roth et al. 2020)", "KL(uniform || singular values)"),
)


def geometry_histories(sweep: Sweep) -> pd.DataFrame:
    """Per-epoch validation geometry of the final runs, with their ``loss`` column."""
    return final_run_histories(sweep, [key for key, _, _ in PANELS])


def _spearman(x: pd.Series, y: pd.Series) -> tuple[float, float, int]:
    both = pd.concat([x, y], axis=1).dropna()
    if len(both) < 3 or both.iloc[:, 0].nunique() < 2 or both.iloc[:, 1].nunique() < 2:
        return math.nan, math.nan, len(both)
    result = stats.spearmanr(both.iloc[:, 0], both.iloc[:, 1])
    return float(result.statistic), float(result.pvalue), len(both)


def geometry_correlations(sweep: Sweep) -> pd.DataFrame:
    """Per geometry quantity (index): Spearman ``rho_test``, ``p_test``, ``runs_test`` against test
    MAP@R over the final runs and ``rho_val``, ``p_val``, ``runs_val`` against validation MAP@R
    over the trials."""
    finals = sweep.role("final")
    trials = sweep.role("trial")
    rows = []
    for key in GEOMETRY_KEYS:
        column = f"metrics.val/{key}"
        row = {"quantity": key}
        for suffix, runs, target in (
            ("test", finals, "metrics.test/map_at_r"),
            ("val", trials, "metrics.val/map_at_r"),
        ):
            found = (
                _spearman(runs[column], runs[target])
                if column in runs and target in runs
                else (math.nan, math.nan, 0)
            )
            row[f"rho_{suffix}"], row[f"p_{suffix}"], row[f"runs_{suffix}"] = found
        rows.append(row)
    return pd.DataFrame(rows).set_index("quantity")


def correlation_table(correlations: pd.DataFrame) -> pd.DataFrame:
    """The correlations as display strings: ``rho (p, runs)``."""

    def cell(rho, p, n):
        return f"n/a ({int(n)} runs)" if math.isnan(rho) else f"{rho:+.2f} (p={p:.2g}, {int(n)} runs)"

    def cells(suffix: str) -> list[str]:
        columns = [f"rho_{suffix}", f"p_{suffix}", f"runs_{suffix}"]
        return [cell(*v) for v in correlations[columns].itertuples(index=False)]

    return pd.DataFrame(
        {
            "Spearman ρ with test MAP@R (final runs)": cells("test"),
            "Spearman ρ with val MAP@R (trials)": cells("val"),
        },
        index=correlations.index,
    )


GEOMETRY_NOTE = (
    "Geometry of the validation embeddings at each run's last validated epoch, on at most 2000 "
    "points: rank-correlated with test MAP@R across the final runs and with the same epoch's "
    "validation MAP@R across the trials (trials are not tested)."
)
