"""The ranking by test MAP@R with its noise floor and paired decisions, as display tables and text
lines (the report's "Is the difference real?" section and the output of ``tripletlab analyze``)."""

from __future__ import annotations

import math

import pandas as pd

from sweeps.table import p_cell

from .paired import ALPHA, POWER, decision, decision_line


def _points(value: float, sign: bool = False) -> str:
    if value is None or math.isnan(value):
        return "n/a"
    return f"{100 * value:+.1f}" if sign else f"{100 * value:.1f}"


def ranking_lines(noise: pd.DataFrame, decisions: pd.DataFrame, delta: float) -> list[str]:
    """The losses best first, each with its spread over seeds and query-bootstrap half-width, then
    one decision line per pair."""
    lines = []
    for rank, (loss, row) in enumerate(noise.sort_values("mean", ascending=False).iterrows(), start=1):
        half = row["query_half_width"]
        query = "" if math.isnan(half) else f", query bootstrap ±{_points(half)}"
        rerun = (
            f", sd {_points(row['rerun_sd'])} over {int(row['reruns'])} runs of a seed"
            if row["reruns"]
            else ""
        )
        lines.append(
            f"{rank}. {loss}: MAP@R {_points(row['mean'])} (sd {_points(row['sd'])} over "
            f"{int(row['seeds'])} seeds, range {_points(row['min'])}-{_points(row['max'])}"
            f"{rerun}{query})"
        )
    lines += [decision_line(row, delta) for _, row in decisions.iterrows()]
    return lines


def noise_table(noise: pd.DataFrame) -> pd.DataFrame:
    """The noise floor as display strings, in points of MAP@R, best loss first."""
    noise = noise.sort_values("mean", ascending=False)
    return pd.DataFrame(
        {
            "seeds": noise["seeds"],
            "MAP@R %": [_points(v) for v in noise["mean"]],
            "sd over seeds": [_points(v) for v in noise["sd"]],
            "range over seeds": [
                f"{_points(lo)}-{_points(hi)}" for lo, hi in zip(noise["min"], noise["max"])
            ],
            "sd at a fixed seed (reruns)": [
                f"{_points(sd)} ({n} runs)" if n else "not rerun"
                for sd, n in zip(noise["rerun_sd"], noise["reruns"])
            ],
            "query bootstrap ± (per run, 95%)": [_points(v) for v in noise["query_half_width"]],
        },
        index=noise.index,
    )


def decision_table(decisions: pd.DataFrame, delta: float) -> pd.DataFrame:
    """The paired comparisons as display strings, one row per pair."""
    out = pd.DataFrame(
        index=pd.Index([f"{a} vs {b}" for a, b in zip(decisions["loss"], decisions["other"])], name="pair")
    )
    out["seeds"] = decisions["pairs"].to_numpy()
    out["ΔMAP@R (points)"] = [_points(v, sign=True) for v in decisions["diff_mean"]]
    out["95% CI"] = [
        "n/a" if math.isnan(lo) else f"[{_points(lo)}, {_points(hi)}]"
        for lo, hi in zip(decisions["diff_ci_low"], decisions["diff_ci_high"])
    ]
    out["p (paired t)"] = [p_cell(p) for p in decisions["p_t"]]
    out["p (Wilcoxon)"] = [p_cell(p) for p in decisions["p_wilcoxon"]]
    out[f"seeds for {100 * delta:g} point"] = [
        "n/a" if math.isnan(n) else ("∞" if math.isinf(n) else f"{n:.0f}") for n in decisions["seeds_needed"]
    ]
    out["decision"] = [decision(row, delta) for _, row in decisions.iterrows()]
    return out


def decisions_note(delta: float) -> str:
    return (
        "Paired by seed (same split, same test queries). ΔMAP@R: mean difference, first loss minus "
        "second, with its Student-t 95% interval; p: two-sided paired t-test and Wilcoxon signed-rank "
        f"test. Resolved: the t-test rejects at {ALPHA:g}. Seeds needed: the paired t-test's sample size "
        f"to detect a {100 * delta:g}-point difference with {POWER:.0%} power, given the observed sd of "
        "the differences. sd at a fixed seed: pooled over the final runs repeated by `tripletlab rerun`, "
        "each with its reruns. Query bootstrap: the mean half-width of the runs' 95% "
        "percentile-bootstrap intervals over test queries."
    )
