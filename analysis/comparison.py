"""The comparison table: test metrics over the final seeds, per loss, against the triplet baseline.

Following the "Metric Learning Reality Check" protocol (Musgrave et al., ECCV 2020), each loss is
reported as the mean and 95% interval over its final seeds of P@1, R-precision and MAP@R on the
class-disjoint test set. The interval is Student's t (``mean +- t_{0.975, n-1} * s / sqrt(n)``); the
test against the ``triplet`` baseline is a two-sided paired t-test over the seeds both losses share.
"""

from __future__ import annotations

import math

import pandas as pd

from experiments.eval.retrieval import HEADLINE_METRICS
from sweeps.statistics import paired_t_p_value, t_interval
from sweeps.table import p_cell, percent_cell, short_value
from sweeps.tracking import TRIAL_STATE_TAG

from .cost import cost_columns
from .load import BASELINE_LOSS, Sweep

PAIRED_METRIC = "map_at_r"


def paired_p_value(values: pd.Series, baseline: pd.Series) -> tuple[float, int]:
    """:func:`sweeps.statistics.paired_t_p_value` over the seeds (index) both series share, NaNs
    dropped: ``(p, pairs)``."""
    both = pd.concat([values, baseline], axis=1, join="inner").dropna()
    return paired_t_p_value(both.iloc[:, 0], both.iloc[:, 1]), len(both)


def seed_values(finals: pd.DataFrame, metric: str) -> pd.Series:
    """``test/<metric>`` per seed (index), the mean where a seed has several runs."""
    column = f"metrics.test/{metric}"
    if column not in finals:
        return pd.Series(dtype=float)
    values = finals[["seed", column]].dropna()
    return values.groupby("seed")[column].mean()


def _tuned_params(parent: pd.Series | None) -> str:
    if parent is None:
        return ""
    prefix = "params.best."
    best = {k[len(prefix) :]: v for k, v in parent.items() if k.startswith(prefix) and pd.notna(v)}
    return ", ".join(f"{k}={short_value(v)}" for k, v in sorted(best.items()))


def comparison_table(sweep: Sweep, baseline: str = BASELINE_LOSS) -> pd.DataFrame:
    """One row per loss: ``<metric>_mean|_ci_low|_ci_high`` for P@1, R-precision, MAP@R, ``seeds``,
    ``tuned``, ``trials_complete``, ``trials_pruned``, ``wall_clock_s`` and, vs ``baseline``,
    ``map_at_r_diff`` and ``p_value`` (paired t-test on MAP@R, ``pairs`` seeds), and the cost columns
    ``step_ms``, ``loss_ms`` and ``loss_peak_mb`` (:mod:`analysis.cost`)."""
    finals, parents = sweep.role("final"), sweep.role("parent")
    trials = sweep.runs[sweep.runs["role"] == "trial"]
    base_values = seed_values(finals[finals["loss"] == baseline], PAIRED_METRIC)
    rows = []
    for loss in sweep.losses:
        own = finals[finals["loss"] == loss]
        parent_rows = parents[parents["loss"] == loss]
        parent = parent_rows.iloc[-1] if len(parent_rows) else None
        row = {"loss": loss, "seeds": int(own["seed"].nunique())}
        for metric in HEADLINE_METRICS:
            interval = t_interval(seed_values(own, metric))
            row[f"{metric}_mean"], row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = interval
        row["tuned"] = _tuned_params(parent)
        state_column = f"tags.{TRIAL_STATE_TAG}"
        states = (
            trials.loc[trials["loss"] == loss, state_column]
            if state_column in trials
            else pd.Series(dtype=str)
        )
        row["trials_complete"] = int((states == "complete").sum())
        row["trials_pruned"] = int((states == "pruned").sum())
        row["wall_clock_s"] = _wall_clock(sweep, loss)
        values = seed_values(own, PAIRED_METRIC)
        if loss == baseline or base_values.empty:
            row["map_at_r_diff"], row["p_value"], row["pairs"] = math.nan, math.nan, 0
        else:
            shared = values.index.intersection(base_values.index)
            row["map_at_r_diff"] = (
                float((values[shared] - base_values[shared]).mean()) if len(shared) else math.nan
            )
            row["p_value"], row["pairs"] = paired_p_value(values, base_values)
        rows.append(row)
    table = pd.DataFrame(rows).set_index("loss")
    return table.join(cost_columns(finals))


def _wall_clock(sweep: Sweep, loss: str) -> float:
    """Seconds the loss's trial and final runs took, summed (parent runs span the whole sweep)."""
    children = sweep.runs[(sweep.runs["loss"] == loss) & sweep.runs["role"].isin(["trial", "final"])]
    return float((children["end_time"] - children["start_time"]).dt.total_seconds().sum())


def format_table(table: pd.DataFrame, baseline: str = BASELINE_LOSS) -> pd.DataFrame:
    """The table as display strings: ``mean [low, high]`` cells in %, p-values, durations."""
    out = pd.DataFrame(index=table.index)
    for metric, label in HEADLINE_METRICS.items():
        out[f"{label} % (95% CI)"] = [
            percent_cell(*cells)
            for cells in table[[f"{metric}_mean", f"{metric}_ci_low", f"{metric}_ci_high"]].itertuples(
                index=False
            )
        ]
    out["seeds"] = table["seeds"]
    out[f"Δ{HEADLINE_METRICS[PAIRED_METRIC]} vs {baseline} (points)"] = [
        ("—" if math.isnan(d) else f"{100 * d:+.1f}") for d in table["map_at_r_diff"]
    ]
    out["p (paired t)"] = [p_cell(p, 3) for p in table["p_value"]]
    out["tuned hyperparameters"] = table["tuned"]
    out["trials (complete / pruned)"] = [
        f"{c} / {p}" for c, p in table[["trials_complete", "trials_pruned"]].itertuples(index=False)
    ]
    out["wall clock"] = [_duration(s) for s in table["wall_clock_s"]]
    out["ms / step"] = [_number(v) for v in table["step_ms"]]
    out["loss + mining ms"] = [_number(v) for v in table["loss_ms"]]
    out["loss + mining peak MB"] = [_number(v) for v in table["loss_peak_mb"]]
    return out


def _number(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.3g}"


def _duration(seconds: float) -> str:
    if math.isnan(seconds):
        return "n/a"
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"
