"""Performance against tuning budget: the expected best validation MAP@R after n trials, per loss.

Dodge et al., "Show Your Work: Improved Reporting of Experimental Results" (EMNLP 2019): with the N
trial values of a loss sorted, ``v_(1) <= ... <= v_(N)``, the best of n trials drawn with replacement
has expectation ``sum_i v_(i) * ((i/N)^n - ((i-1)/N)^n)``. A crossing of two losses' curves means
their ranking depends on the tuning budget. Trials are the Optuna history: complete trials at their
objective and pruned ones at their last report (a lower bound); failed trials carry no value.
"""

from __future__ import annotations

from itertools import combinations

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def expected_max(values, n_max: int) -> tuple[np.ndarray, np.ndarray]:
    """Expected maximum of n draws with replacement from ``values`` and its standard deviation, for
    n = 1..n_max."""
    v = np.sort(np.asarray(values, dtype=float))
    if v.size == 0:
        raise ValueError("expected_max needs at least one value")
    n = np.arange(1, n_max + 1)[:, None]
    cdf = np.arange(1, v.size + 1) / v.size
    weights = cdf[None, :] ** n - np.concatenate([[0.0], cdf[:-1]])[None, :] ** n  # P(max = v_(i))
    mean = weights @ v
    variance = np.maximum(weights @ v**2 - mean**2, 0.0)
    return mean, np.sqrt(variance)


def budget_curves(trials: pd.DataFrame) -> pd.DataFrame:
    """Columns ``loss``, ``n``, ``expected``, ``sd``: one row per loss and budget n = 1..its trials,
    from :func:`analysis.tuning.trials_table`."""
    rows = []
    usable = trials[trials["state"].isin(["complete", "pruned"])].dropna(subset=["value"])
    for loss, own in usable.groupby("loss", sort=False):
        mean, sd = expected_max(own["value"], len(own))
        rows += [
            {"loss": loss, "n": n, "expected": m, "sd": s} for n, (m, s) in enumerate(zip(mean, sd), start=1)
        ]
    return pd.DataFrame(rows, columns=["loss", "n", "expected", "sd"])


def crossings(curves: pd.DataFrame) -> pd.DataFrame:
    """Where two losses' curves cross: ``loss``, ``other``, ``n`` (linear interpolation between
    budgets), ``expected`` there, ``leader_before`` and ``leader_after``."""
    rows = []
    by_loss = {loss: own.set_index("n")["expected"] for loss, own in curves.groupby("loss", sort=False)}
    for a, b in combinations(by_loss, 2):
        shared = by_loss[a].index.intersection(by_loss[b].index)
        diff = by_loss[a][shared] - by_loss[b][shared]
        signed = diff[np.sign(diff) != 0]
        for (n0, d0), (n1, d1) in zip(signed.items(), list(signed.items())[1:]):
            if np.sign(d0) == np.sign(d1):
                continue
            x = n0 + (n1 - n0) * d0 / (d0 - d1)
            at = float(np.interp(x, shared, by_loss[a][shared]))
            rows.append(
                {
                    "loss": a,
                    "other": b,
                    "n": float(x),
                    "expected": at,
                    "leader_before": a if d0 > 0 else b,
                    "leader_after": a if d1 > 0 else b,
                }
            )
    return pd.DataFrame(rows, columns=["loss", "other", "n", "expected", "leader_before", "leader_after"])


def budget_figure(curves: pd.DataFrame, crossed: pd.DataFrame, colors: dict) -> Figure:
    """Expected best validation MAP@R against the number of trials (band: +-1 sd), crossings marked."""
    fig = Figure(figsize=(9, 5.5), layout="constrained")
    ax = fig.subplots()
    for loss, own in curves.groupby("loss", sort=False):
        ax.plot(own["n"], own["expected"], marker="o", ms=3, color=colors[loss], label=loss)
        ax.fill_between(
            own["n"], own["expected"] - own["sd"], own["expected"] + own["sd"], color=colors[loss], alpha=0.15
        )
    for _, row in crossed.iterrows():
        ax.plot(row["n"], row["expected"], marker="X", ms=11, color="black", ls="")
        ax.annotate(
            f"{row['leader_after']} overtakes {row['leader_before']}\nat n≈{row['n']:.1f}",
            (row["n"], row["expected"]),
            textcoords="offset points",
            xytext=(6, -22),
            fontsize=7,
        )
    if curves.empty:
        ax.text(0.5, 0.5, "no complete or pruned trials", ha="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8, title="loss (band: ±1 sd)", title_fontsize=8, loc="lower right")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set(
        xlabel="tuning budget n (trials)",
        ylabel="expected best validation MAP@R",
        title="Expected best validation MAP@R after n trials (Dodge et al. 2019); X: curves cross",
    )
    ax.grid(alpha=0.3)
    return fig


def crossing_note(crossed: pd.DataFrame) -> str:
    """One sentence on whether the ranking depends on the budget."""
    if crossed.empty:
        return "No budget curves cross: the validation ranking is the same at every tuning budget."
    parts = [
        f"{r['leader_after']} overtakes {r['leader_before']} at n≈{r['n']:.1f}" for _, r in crossed.iterrows()
    ]
    return "The validation ranking depends on the tuning budget: " + "; ".join(parts) + "."
