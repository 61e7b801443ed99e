"""Cost per loss: what a loss costs to train, beside what it scores.

From the final runs: ``cost/step_ms`` (wall time per training step, validation left out), and
``cost/loss_ms`` / ``cost/loss_peak_mb``, the loss and its mining alone on one training batch
(:mod:`experiments.train.loss_cost`). The figure sets test MAP@R against the total compute time of the
loss's trials and final runs, and shows the step time with the loss's share of it.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

COST_METRICS = {"step_ms": "cost/step_ms", "loss_ms": "cost/loss_ms", "loss_peak_mb": "cost/loss_peak_mb"}


def cost_columns(finals: pd.DataFrame) -> pd.DataFrame:
    """Per loss (index): the mean over its final runs of each of :data:`COST_METRICS` (NaN if not logged)."""
    out = pd.DataFrame(index=pd.Index(sorted(finals["loss"].dropna().unique()), name="loss"))
    for column, key in COST_METRICS.items():
        logged = f"metrics.{key}"
        out[column] = finals.groupby("loss")[logged].mean() if logged in finals else math.nan
    return out


def cost_figure(table: pd.DataFrame, colors: dict) -> Figure:
    """Test MAP@R (mean, 95% interval over seeds) against total compute time, and time per step with
    the loss and mining's part, one colour per loss; from :func:`analysis.comparison.comparison_table`."""
    fig = Figure(figsize=(12, 4.8), layout="constrained")
    tradeoff, steps = fig.subplots(1, 2)
    for loss, row in table.iterrows():
        low, high = row["map_at_r_ci_low"], row["map_at_r_ci_high"]
        mean = row["map_at_r_mean"]
        error = None if math.isnan(low) else [[100 * (mean - low)], [100 * (high - mean)]]
        tradeoff.errorbar(
            row["wall_clock_s"] / 60,
            100 * mean,
            yerr=error,
            fmt="o",
            ms=8,
            capsize=4,
            color=colors[loss],
            label=loss,
        )
    tradeoff.set(
        title="Test MAP@R against total compute",
        xlabel="trials + final runs, summed (minutes)",
        ylabel="test MAP@R (%), mean and 95% CI over seeds",
    )
    tradeoff.grid(alpha=0.3)
    tradeoff.legend(fontsize=8)
    losses = list(table.index)
    x = np.arange(len(losses))
    palette = [colors[loss] for loss in losses]
    steps.bar(x, table["step_ms"].fillna(0), color=palette, alpha=0.45, label="training step")
    steps.bar(
        x,
        table["loss_ms"].fillna(0),
        width=0.4,
        color=palette,
        edgecolor="black",
        label="loss + mining (forward and backward)",
    )
    for i, mb in enumerate(table["loss_peak_mb"]):
        if not math.isnan(mb):
            steps.annotate(
                f"{mb:.3g} MB",
                (i, table["loss_ms"].iloc[i]),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
                fontsize=7,
            )
    steps.set_xticks(x, losses, rotation=30)
    steps.set(
        title="Time per training step (label: peak memory of loss + mining)",
        ylabel="milliseconds",
        xlabel="loss",
    )
    steps.legend(fontsize=8)
    fig.suptitle("Cost per loss, from the final runs")
    return fig
