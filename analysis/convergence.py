"""Figure 1, convergence: per loss and epoch, mean over the final seeds with a min-max band.

Panels: validation MAP@R; training loss divided by its first-epoch value (losses live on different
scales); the fraction of active (non-zero) triplets; the fraction violating the margin.
"""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from .load import Sweep, final_run_histories

PANELS = (
    ("val/map_at_r", "Validation MAP@R", "MAP@R (fraction)"),
    ("train/loss", "Training loss, normalised", "loss / first-epoch loss"),
    ("train/active_fraction", "Active triplets", "fraction of triplets"),
    ("train/margin_violation_fraction", "Margin violations", "fraction of triplets"),
)


def convergence_histories(sweep: Sweep) -> pd.DataFrame:
    """Per-epoch histories of the final runs, with their ``loss`` column."""
    return final_run_histories(sweep, [key for key, _, _ in PANELS])


def normalise_train_loss(history: pd.DataFrame) -> pd.DataFrame:
    """Divide each run's ``train/loss`` by its first-epoch value (left as is when that is 0)."""
    out = history.copy()
    is_loss = out["key"] == "train/loss"
    if not is_loss.any():
        return out
    first = out[is_loss].sort_values("step").groupby("run_id")["value"].first()
    scale = out.loc[is_loss, "run_id"].map(first).where(lambda s: s != 0, 1.0)
    out.loc[is_loss, "value"] = out.loc[is_loss, "value"] / scale
    return out


def convergence_figure(
    history: pd.DataFrame,
    losses: list[str],
    colors: dict,
    panels=PANELS,
    title: str = "Convergence of the final runs",
) -> Figure:
    """A figure of ``panels`` (key, title, y label), two per row (three past four panels); missing
    metrics leave a note in their panel."""
    history = normalise_train_loss(history)
    cols = 2 if len(panels) <= 4 else 3
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(5.5 * cols, 3.75 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    seeds = history.groupby("loss")["run_id"].nunique()
    for ax, (key, panel_title, ylabel) in zip(axes.flat, panels):
        data = history[history["key"] == key]
        for loss in losses:
            runs = data[data["loss"] == loss]
            if runs.empty:
                continue
            by_epoch = runs.groupby("step")["value"]
            mean = by_epoch.mean()
            ax.plot(mean.index, mean.values, marker="o", ms=3, color=colors[loss], label=loss)
            ax.fill_between(
                mean.index, by_epoch.min().values, by_epoch.max().values, color=colors[loss], alpha=0.2
            )
        if data.empty:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
        ax.set(title=panel_title, xlabel="epoch", ylabel=ylabel)
        ax.grid(alpha=0.3)
        epochs = sorted(history["step"].unique())
        if len(epochs) <= 12:
            ax.set_xticks(epochs)
            ax.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", title="loss")
    if not len(seeds):
        n = "0"
    else:
        n = f"{seeds.min()}" if seeds.min() == seeds.max() else f"{seeds.min()}-{seeds.max()}"
    fig.suptitle(f"{title} (line: mean, band: min-max over {n} seeds)")
    return fig
