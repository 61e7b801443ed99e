"""Paired comparisons that decide: is loss A really better than loss B, and how many seeds would tell?

Final runs of two losses that share a seed share the split and the test queries, so the comparison
is paired by seed: ``d_s = MAP@R_A(s) - MAP@R_B(s)``. Each pair gets the mean difference with its
Student-t 95% interval, the two-sided paired t-test and the Wilcoxon signed-rank test (exact for
small samples). The seeds needed to detect a difference ``delta`` (default 1 point of MAP@R) with
80% power are the smallest ``n`` for which the paired t-test at level ``alpha`` rejects with that
probability when the true mean difference is ``delta`` and the spread is the observed ``sd(d)``:
``P(|T| > t_{1-alpha/2, n-1}) >= power`` with ``T`` noncentral t, ``n - 1`` degrees of freedom and
noncentrality ``delta * sqrt(n) / sd(d)`` (Cohen 1988, ch. 2). The sd comes from few seeds, so the
count is an estimate (printed with ``~``).
"""

from __future__ import annotations

import math
from itertools import combinations

import pandas as pd
from scipy import stats

from sweeps.statistics import t_interval, wilcoxon_p_value

from .comparison import paired_p_value

DETECT_POINTS = 1.0  # the difference to detect, in points of MAP@R (0.01)
POWER = 0.8
ALPHA = 0.05
MAX_SEEDS = 100_000  # beyond this the difference is, for practical purposes, not detectable
PAIRINGS = ("all", "baseline")


def t_test_power(n: int, delta: float, sd: float, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with ``n`` pairs when the differences have mean ``delta``
    and standard deviation ``sd``."""
    if n < 2:
        return math.nan
    df = n - 1
    critical = stats.t.ppf(1 - alpha / 2, df)
    if sd == 0:
        return 1.0 if delta != 0 else alpha
    noncentrality = abs(delta) * math.sqrt(n) / sd
    return float(stats.nct.sf(critical, df, noncentrality) + stats.nct.cdf(-critical, df, noncentrality))


def seeds_needed(sd: float, delta: float, power: float = POWER, alpha: float = ALPHA) -> float:
    """The smallest number of paired seeds (at least 2) whose paired t-test detects ``delta`` with
    ``power``; NaN when ``sd`` is unknown, ``inf`` past :data:`MAX_SEEDS`."""
    if not 0 < power < 1 or not 0 < alpha < 1:
        raise ValueError(f"power and alpha must be in (0, 1), got {power} and {alpha}")
    if delta == 0:
        raise ValueError("delta must be non-zero: no number of seeds detects a zero difference")
    if sd is None or math.isnan(sd):
        return math.nan
    if t_test_power(2, delta, sd, alpha) >= power:
        return 2
    low, high = 2, 4  # power rises with n: double until enough, then bisect
    while t_test_power(high, delta, sd, alpha) < power:
        low, high = high, 2 * high
        if high > MAX_SEEDS:
            return math.inf
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if t_test_power(middle, delta, sd, alpha) < power else (low, middle)
    return high


def compare(
    values: pd.Series,
    other: pd.Series,
    delta: float = DETECT_POINTS / 100,
    power: float = POWER,
    alpha: float = ALPHA,
) -> dict:
    """The paired comparison of two per-seed series (index: seed): ``pairs``, ``diff_mean``,
    ``diff_ci_low``, ``diff_ci_high``, ``diff_sd``, ``p_t``, ``p_wilcoxon``, ``resolved`` (the
    t-test rejects at ``alpha``) and ``seeds_needed`` to detect ``delta``."""
    both = pd.concat([values, other], axis=1, join="inner").dropna()
    d = (both.iloc[:, 0] - both.iloc[:, 1]).to_numpy()
    mean, low, high = t_interval(d, 1 - alpha)
    sd = float(d.std(ddof=1)) if d.size >= 2 else math.nan
    p_t, pairs = paired_p_value(values, other)
    if pairs >= 2 and math.isnan(p_t):  # identical differences: no spread, the sign decides
        p_t = 1.0 if mean == 0 else 0.0
    return {
        "pairs": pairs,
        "diff_mean": mean,
        "diff_ci_low": low,
        "diff_ci_high": high,
        "diff_sd": sd,
        "p_t": p_t,
        "p_wilcoxon": wilcoxon_p_value(d) if d.size else math.nan,
        "resolved": bool(pairs >= 2 and p_t < alpha),
        "seeds_needed": seeds_needed(sd, delta, power, alpha),
    }


def ranking(per_seed: dict[str, pd.Series]) -> list[str]:
    """Losses by mean MAP@R over their seeds, best first (ties by name)."""
    return sorted(
        per_seed, key=lambda loss: (-per_seed[loss].mean() if len(per_seed[loss]) else math.inf, loss)
    )


def paired_comparisons(
    per_seed: dict[str, pd.Series],
    pairing: str = "all",
    baseline: str | None = None,
    delta: float = DETECT_POINTS / 100,
    power: float = POWER,
    alpha: float = ALPHA,
) -> pd.DataFrame:
    """One row per pair (``loss``, ``other``), the better-ranked loss first: every pair of losses
    (``pairing="all"``) or every loss against ``baseline``; columns of :func:`compare`."""
    if pairing not in PAIRINGS:
        raise ValueError(f"unknown pairing {pairing!r}; choose one of {', '.join(PAIRINGS)}")
    order = ranking(per_seed)
    if pairing == "all":
        pairs = list(combinations(order, 2))
    else:
        pairs = [(loss, baseline) for loss in order if loss != baseline] if baseline in per_seed else []
    rows = [
        {"loss": a, "other": b, **compare(per_seed[a], per_seed[b], delta, power, alpha)} for a, b in pairs
    ]
    columns = [
        "loss",
        "other",
        "pairs",
        "diff_mean",
        "diff_ci_low",
        "diff_ci_high",
        "diff_sd",
        "p_t",
        "p_wilcoxon",
        "resolved",
        "seeds_needed",
    ]
    return pd.DataFrame(rows, columns=columns)


def decision(row, delta: float = DETECT_POINTS / 100) -> str:
    """The verdict of one comparison, e.g. ``not resolved, ~9 seeds needed``."""
    if row["pairs"] < 2:
        return f"undecided: {row['pairs']} shared seed(s), a paired test needs 2"
    if row["resolved"]:
        return f"resolved ({row['pairs']} seeds)"
    needed = row["seeds_needed"]
    if math.isinf(needed):
        return f"not resolved, over {MAX_SEEDS} seeds needed"
    if needed > row["pairs"]:
        return f"not resolved, ~{needed:.0f} seeds needed"
    return (
        f"not resolved; {row['pairs']} seeds detect {100 * delta:g} point, "
        "so a real difference is likely smaller"
    )


def decision_line(row, delta: float = DETECT_POINTS / 100) -> str:
    """``batch_hard vs triplet: +0.8 [-0.4, 2.0], p=0.18: not resolved, ~9 seeds needed`` (points of
    MAP@R)."""
    if math.isnan(row["diff_mean"]):
        return f"{row['loss']} vs {row['other']}: no shared seed"
    interval = (
        ""
        if math.isnan(row["diff_ci_low"])
        else f" [{100 * row['diff_ci_low']:.1f}, {100 * row['diff_ci_high']:.1f}]"
    )
    p = "" if math.isnan(row["p_t"]) else f", p={row['p_t']:.2g}"
    return (
        f"{row['loss']} vs {row['other']}: {100 * row['diff_mean']:+.1f}{interval}{p}: {decision(row, delta)}"
    )
