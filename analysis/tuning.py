"""Figure 3, tuning: Optuna optimisation history, parameter importances, and for the margin-based
(triplet-family) losses the validation MAP@R against the margin and the mining strategy.

Importances use Optuna's PED-ANOVA evaluator (Watanabe et al., IJCAI 2023; Optuna 5's default for
``get_param_importances``), passed explicitly so the figure names the evaluator it really used.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from sweeps.tracking import TRIAL_STATE_TAG

from .load import Sweep

IMPORTANCE_EVALUATOR = "PED-ANOVA"
MARGIN_PARAM = "loss.margin"
MINING_PARAM = "loss.mining"
TRIAL_VALUE = "metrics.val/best_map_at_r"


def trials_table(sweep: Sweep) -> pd.DataFrame:
    """Columns ``loss``, ``number``, ``state`` (complete / pruned / failed), ``value``,
    ``param.<config key>``.

    From the Optuna studies when loaded (pruned trials take their last reported value), else from
    the MLflow trial runs (tags ``optuna.trial_number``, ``tripletlab.trial_state``, metric
    ``val/best_map_at_r``, params ``loss.<name>``).
    """
    rows = []
    if sweep.studies:
        for loss, study in sweep.studies.items():
            for t in study.get_trials(deepcopy=False):
                if t.state == optuna.trial.TrialState.RUNNING or t.state == optuna.trial.TrialState.WAITING:
                    continue
                value = (
                    t.value
                    if t.value is not None
                    else (
                        t.intermediate_values[max(t.intermediate_values)]
                        if t.intermediate_values
                        else math.nan
                    )
                )
                state = t.state.name.lower().replace("fail", "failed")
                rows.append(
                    {
                        "loss": loss,
                        "number": t.number,
                        "state": state,
                        "value": value,
                        **{f"param.{k}": v for k, v in t.params.items()},
                    }
                )
    else:
        trials = sweep.runs[sweep.runs["role"] == "trial"]
        for _, run in trials.iterrows():
            number = run.get("tags.optuna.trial_number")
            rows.append(
                {
                    "loss": run["loss"],
                    "number": int(number) if pd.notna(number) else math.nan,
                    "state": run.get(f"tags.{TRIAL_STATE_TAG}") or "complete",
                    "value": run.get(TRIAL_VALUE, math.nan),
                    **{
                        f"param.{k[len('params.') :]}": v
                        for k, v in run.items()
                        if k.startswith("params.loss.") and pd.notna(v)
                    },
                }
            )
    table = pd.DataFrame(rows, columns=["loss", "number", "state", "value"] if not rows else None)
    return table.sort_values(["loss", "number"]).reset_index(drop=True)


def param_importances(sweep: Sweep, notes: list[str]) -> dict[str, dict[str, float]]:
    """``{loss: {param: importance}}`` by PED-ANOVA; losses where it cannot run get a note."""
    out = {}
    for loss in sweep.losses:
        study = sweep.studies.get(loss)
        if study is None:
            notes.append(f"{loss}: no Optuna study loaded (pass --storage), parameter importances skipped")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[loss] = optuna.importance.get_param_importances(
                    study, evaluator=optuna.importance.PedAnovaImportanceEvaluator()
                )
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            notes.append(f"{loss}: parameter importances unavailable ({exc})")
    return out


def history_axes(ax, trials: pd.DataFrame, losses: list[str], colors: dict) -> None:
    """Trial values (dots; pruned: hollow at their last report) and the best-so-far line per loss."""
    for loss in losses:
        own = trials[trials["loss"] == loss].dropna(subset=["value"])
        if own.empty:
            continue
        done = own[own["state"] == "complete"]
        pruned = own[own["state"] == "pruned"]
        ax.scatter(done["number"], done["value"], color=colors[loss], s=18)
        ax.scatter(pruned["number"], pruned["value"], facecolors="none", edgecolors=colors[loss], s=18)
        if not done.empty:
            ax.step(done["number"], done["value"].cummax(), where="post", color=colors[loss], label=loss)
    ax.set(
        title="Optimisation history (line: best so far)",
        xlabel="trial number",
        ylabel="validation MAP@R (objective)",
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], marker="o", ls="", color="0.3", label="complete"),
        Line2D([], [], marker="o", ls="", mfc="none", color="0.3", label="pruned (last report)"),
    ]
    ax.legend(handles=handles, fontsize=7, loc="lower right")


def importance_axes(ax, importances: dict[str, dict[str, float]], colors: dict) -> None:
    """Grouped horizontal bars: one group per hyperparameter, one bar per loss."""
    params = sorted({p for imp in importances.values() for p in imp})
    if not params:
        ax.text(0.5, 0.5, "no parameter importances available", ha="center", transform=ax.transAxes)
    height = 0.8 / max(1, len(importances))
    for i, (loss, imp) in enumerate(importances.items()):
        y = np.arange(len(params)) + i * height - 0.4 + height / 2
        ax.barh(y, [imp.get(p, 0.0) for p in params], height=height, color=colors[loss], label=loss)
    ax.set_yticks(np.arange(len(params)), params)
    ax.invert_yaxis()
    ax.set(
        title=f"Hyperparameter importance (evaluator: {IMPORTANCE_EVALUATOR})",
        xlabel="normalised importance (sums to 1 per loss)",
        ylabel="hyperparameter",
    )
    if importances:
        ax.legend(fontsize=7, loc="lower right")


def margin_axes(ax, trials: pd.DataFrame, colors: dict) -> None:
    """Validation MAP@R of complete trials against the margin, for every loss that tunes one."""
    column = f"param.{MARGIN_PARAM}"
    done = trials[(trials["state"] == "complete")] if column in trials else trials.iloc[0:0]
    done = done.dropna(subset=[column, "value"]) if column in done else done
    for loss, own in done.groupby("loss"):
        ax.scatter(own[column].astype(float), own["value"], color=colors[loss], label=loss, s=20)
    if done.empty:
        ax.text(0.5, 0.5, "no trial tuned a margin", ha="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=7)
    ax.set(
        title="Triplet family: metric vs margin",
        xlabel="margin m (distance units)",
        ylabel="validation MAP@R",
    )
    ax.grid(alpha=0.3)


def mining_axes(ax, trials: pd.DataFrame, colors: dict) -> None:
    """Validation MAP@R of complete trials per mining strategy (one jittered column per loss)."""
    column = f"param.{MINING_PARAM}"
    done = (
        trials[trials["state"] == "complete"].dropna(subset=[column, "value"])
        if column in trials
        else trials.iloc[0:0]
    )
    if done.empty:
        ax.text(0.5, 0.5, "no trial tuned a mining strategy", ha="center", transform=ax.transAxes)
    strategies = sorted(done[column].astype(str).unique()) if not done.empty else []
    losses = sorted(done["loss"].unique()) if not done.empty else []
    rng = np.random.default_rng(0)
    width = 0.7 / max(1, len(losses))
    for i, loss in enumerate(losses):
        own = done[done["loss"] == loss]
        x = np.array([strategies.index(str(s)) for s in own[column]]) - 0.35 + width * (i + 0.5)
        jitter = rng.uniform(-width / 4, width / 4, len(x))
        ax.scatter(x + jitter, own["value"], color=colors[loss], label=loss, s=20)
        means = own.groupby(own[column].astype(str))["value"].mean()
        for s, m in means.items():
            xs = strategies.index(s) - 0.35 + width * (i + 0.5)
            ax.hlines(m, xs - width / 2.5, xs + width / 2.5, color=colors[loss], lw=2)
    ax.set_xticks(range(len(strategies)), strategies)
    ax.set(
        title="Triplet family: metric vs mining strategy (bar: mean)",
        xlabel="mining strategy",
        ylabel="validation MAP@R",
    )
    if losses:
        ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")


def tuning_figure(sweep: Sweep, colors: dict, notes: list[str]) -> Figure:
    """The 2x2 tuning figure."""
    trials = trials_table(sweep)
    fig = Figure(figsize=(12, 8.5), layout="constrained")
    axes = fig.subplots(2, 2)
    history_axes(axes[0, 0], trials, sweep.losses, colors)
    importance_axes(axes[0, 1], param_importances(sweep, notes), colors)
    margin_axes(axes[1, 0], trials, colors)
    mining_axes(axes[1, 1], trials, colors)
    source = "Optuna storage" if sweep.studies else "MLflow trial runs (no Optuna storage loaded)"
    fig.suptitle(f"Hyperparameter tuning on the validation classes, from the {source}")
    return fig
