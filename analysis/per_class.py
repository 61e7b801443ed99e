"""Per-class results: MAP@R of each test class per loss, and where two losses differ most.

A class's MAP@R is the mean AP@R of its queries (Musgrave et al., ECCV 2020, per class), averaged
over the final seeds. Two losses are then compared paired by class: the classes with the largest
differences, and a two-sided paired t-test and Wilcoxon signed-rank test over all shared classes
(is one loss better on most classes, or on a few?).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sweeps.statistics import paired_t_p_value, wilcoxon_p_value
from sweeps.table import p_cell

TOP_CLASSES = 5


def class_map_at_r(scores: pd.DataFrame) -> pd.DataFrame:
    """Per-class MAP@R, classes (index) by losses (columns): the mean AP@R of the class's queries in
    each run, then the mean over the loss's runs; from :func:`analysis.noise.query_scores`."""
    if scores.empty:
        return pd.DataFrame()
    per_run = scores.groupby(["loss", "run_id", "label"])["ap"].mean()
    table = per_run.groupby(["label", "loss"]).mean().unstack("loss")
    table.index.name = "class"
    return table


def class_comparison(table: pd.DataFrame, loss: str, other: str, top: int = TOP_CLASSES) -> dict:
    """``loss`` against ``other`` over the classes both have: ``classes``, ``better`` (classes where
    ``loss`` is ahead), ``p_t``, ``p_wilcoxon`` and ``largest`` (the ``top`` classes with the largest
    absolute differences, as ``[(class, difference)]``)."""
    both = table[[loss, other]].dropna()
    d = (both[loss] - both[other]).to_numpy()
    p_t = paired_t_p_value(both[loss], both[other])
    order = np.argsort(-np.abs(d), kind="stable")[:top]
    return {
        "classes": len(d),
        "better": int((d > 0).sum()),
        "p_t": p_t,
        "p_wilcoxon": wilcoxon_p_value(d) if len(d) else math.nan,
        "largest": [(both.index[i], float(d[i])) for i in order],
    }


def class_comparisons(table: pd.DataFrame, pairs: pd.DataFrame, top: int = TOP_CLASSES) -> pd.DataFrame:
    """:func:`class_comparison` for each (``loss``, ``other``) row of ``pairs`` that the table covers."""
    rows = [
        {"loss": a, "other": b, **class_comparison(table, a, b, top)}
        for a, b in zip(pairs["loss"], pairs["other"])
        if {a, b} <= set(table.columns)
    ]
    return pd.DataFrame(rows, columns=["loss", "other", "classes", "better", "p_t", "p_wilcoxon", "largest"])


def class_table(comparisons: pd.DataFrame) -> pd.DataFrame:
    """The per-class comparisons as display strings (differences in points of MAP@R)."""
    pairs = [f"{a} vs {b}" for a, b in zip(comparisons["loss"], comparisons["other"])]
    out = pd.DataFrame(index=pd.Index(pairs, name="pair"))
    out["classes where first is ahead"] = [
        f"{b} / {n}" for b, n in zip(comparisons["better"], comparisons["classes"])
    ]
    out["p (paired t over classes)"] = [p_cell(p) for p in comparisons["p_t"]]
    out["p (Wilcoxon over classes)"] = [p_cell(p) for p in comparisons["p_wilcoxon"]]
    out["largest differences (class: points)"] = [
        ", ".join(f"{c}: {100 * d:+.1f}" for c, d in largest) for largest in comparisons["largest"]
    ]
    return out
