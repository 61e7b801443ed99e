"""The statistics of a comparison, one implementation each, for the sweep's table and the analysis.

- :func:`t_interval`: the mean with its Student-t confidence interval,
  ``mean +- t_{(1+c)/2, n-1} * s / sqrt(n)`` (``s`` the sample standard deviation), as "A Metric
  Learning Reality Check" (Musgrave et al., ECCV 2020) reports each metric over seeds;
- :func:`paired_t_p_value` and :func:`wilcoxon_p_value`: the two-sided paired t-test and Wilcoxon
  signed-rank test (exact for small samples) of paired values;
- :func:`bootstrap_interval`: the percentile bootstrap (Efron & Tibshirani 1993) of a mean.

Each returns NaN where its sample cannot give an answer instead of raising or warning.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 1000
_RESAMPLES_PER_BLOCK = 100  # bounds the (resamples, values) index block in memory


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def t_interval(values, confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)`` of the Student-t interval (unclipped); all NaN for no values, the bounds
    NaN for fewer than two."""
    _check_confidence(confidence)
    x = np.asarray(values, dtype=float).ravel()
    if x.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(x.mean())
    if x.size < 2:
        return mean, math.nan, math.nan
    half = float(stats.t.ppf(0.5 + confidence / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return mean, mean - half, mean + half


def paired_t_p_value(values, other) -> float:
    """Two-sided paired t-test of two equally long samples (pair ``i`` is ``values[i], other[i]``);
    NaN with fewer than two pairs, or when every difference is the same (no spread to test)."""
    x, y = np.asarray(values, dtype=float).ravel(), np.asarray(other, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    d = x - y
    if d.size < 2 or np.allclose(d, d[0]):
        return math.nan
    return float(stats.ttest_rel(x, y).pvalue)


def wilcoxon_p_value(differences) -> float:
    """Two-sided Wilcoxon signed-rank p-value of paired differences; NaN with no non-zero difference."""
    d = np.asarray(differences, dtype=float).ravel()
    if np.count_nonzero(d) == 0:
        return math.nan
    return float(stats.wilcoxon(d).pvalue)


def bootstrap_interval(
    values, resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (NaNs dropped); NaN for fewer than 2."""
    _check_confidence(confidence)
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    if x.size < 2:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    blocks = [
        x[rng.integers(0, x.size, (min(_RESAMPLES_PER_BLOCK, resamples - done), x.size))].mean(1)
        for done in range(0, resamples, _RESAMPLES_PER_BLOCK)
    ]
    tail = (1 - confidence) / 2
    low, high = np.quantile(np.concatenate(blocks), [tail, 1 - tail])
    return float(low), float(high)
