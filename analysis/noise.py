"""The noise floor of a sweep: how far test MAP@R moves between final seeds, and within one run when
its test queries are resampled.

Noise studies of deep-learning comparisons (e.g. Picard 2021; Bouthillier et al., MLSys 2021) find
the spread over seeds as large as many published gaps between methods. Per loss this module gives
the spread over the final seeds (sd, min-max), the spread at a fixed seed where ``tripletlab
rerun`` repeated a final run (nondeterministic kernels), and the mean half-width of the per-run
percentile bootstrap over test queries (:mod:`analysis.query_scores`); the paired comparisons
(:mod:`analysis.paired`) are read against them.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sweeps.statistics import BOOTSTRAP_RESAMPLES, bootstrap_interval
from sweeps.tracking import RERUN_OF_TAG, RERUN_ROLE

from .comparison import seed_values
from .load import Sweep, load_embeddings
from .query_scores import average_precision_at_r

METRIC = "map_at_r"


def per_seed(sweep: Sweep, metric: str = METRIC) -> dict[str, pd.Series]:
    """``{loss: per-seed test metric}`` of every loss with a finished final run."""
    finals = sweep.role("final")
    return {
        loss: values
        for loss in sweep.losses
        if not (values := seed_values(finals[finals["loss"] == loss], metric)).empty
    }


def query_scores(sweep: Sweep, notes: list[str]) -> pd.DataFrame:
    """AP@R of every test query of every final run with test embeddings: columns ``run_id``,
    ``loss``, ``seed``, ``label`` and ``ap`` (queries without a same-class reference left out)."""
    frames, missing = [], set()
    for _, run in sweep.role("final").iterrows():
        arrays = load_embeddings(sweep, run["run_id"])
        if arrays is None:
            missing.add(run["loss"])
            continue
        ap = average_precision_at_r(
            arrays["embeddings"], arrays["labels"], arrays.get("ref_embeddings"), arrays.get("ref_labels")
        )
        keep = ~np.isnan(ap)
        frames.append(
            pd.DataFrame(
                {
                    "run_id": run["run_id"],
                    "loss": run["loss"],
                    "seed": run["seed"],
                    "label": np.asarray(arrays["labels"])[keep],
                    "ap": ap[keep],
                }
            )
        )
    for loss in sorted(missing):
        notes.append(
            f"{loss}: final runs without embeddings/test.npz have no query-bootstrap interval "
            "or per-class results"
        )
    columns = ["run_id", "loss", "seed", "label", "ap"]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def run_intervals(
    sweep: Sweep, scores: pd.DataFrame, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0
) -> pd.DataFrame:
    """One row per final run in ``scores`` (:func:`query_scores`): ``run_id``, ``loss``, ``seed``,
    ``queries``, ``map_at_r`` (as logged), ``map_at_r_from_queries`` (mean per-query AP@R) and the
    query bootstrap's ``query_ci_low`` / ``query_ci_high``."""
    logged = sweep.role("final").set_index("run_id").get(f"metrics.test/{METRIC}", pd.Series(dtype=float))
    rows = []
    for (run_id, loss, run_seed), own in scores.groupby(["run_id", "loss", "seed"], sort=False):
        low, high = bootstrap_interval(own["ap"], resamples, seed=seed)
        rows.append(
            {
                "run_id": run_id,
                "loss": loss,
                "seed": run_seed,
                "queries": len(own),
                "map_at_r": logged.get(run_id, math.nan),
                "map_at_r_from_queries": float(own["ap"].mean()),
                "query_ci_low": low,
                "query_ci_high": high,
            }
        )
    return pd.DataFrame(
        rows,
        columns=[
            "run_id",
            "loss",
            "seed",
            "queries",
            "map_at_r",
            "map_at_r_from_queries",
            "query_ci_low",
            "query_ci_high",
        ],
    )


def rerun_spread(sweep: Sweep, metric: str = METRIC) -> pd.DataFrame:
    """Per loss (index) with reruns (``tripletlab rerun``): ``reruns`` (runs of one seed, the final run
    included, summed over the repeated seeds) and ``rerun_sd``, the pooled sd of test MAP@R within a seed."""
    column, runs = f"metrics.test/{metric}", sweep.role(RERUN_ROLE)
    rows = []
    if column in runs and len(runs):
        finals = sweep.role("final").set_index("run_id")
        for loss, own in runs.groupby("loss"):
            variances, count = [], 0
            for original, group in own.groupby(f"tags.{RERUN_OF_TAG}"):
                values = group[column].dropna().tolist()
                if original in finals.index and pd.notna(finals.loc[original, column]):
                    values.append(finals.loc[original, column])
                if len(values) > 1:
                    variances.append(float(np.var(values, ddof=1)))
                    count += len(values)
            if variances:
                rows.append({"loss": loss, "reruns": count, "rerun_sd": math.sqrt(float(np.mean(variances)))})
    return pd.DataFrame(rows, columns=["loss", "reruns", "rerun_sd"]).set_index("loss")


def noise_floor(
    values: dict[str, pd.Series], intervals: pd.DataFrame, reruns: pd.DataFrame | None = None
) -> pd.DataFrame:
    """Per loss (index): ``seeds``, ``mean``, ``sd`` (over seeds), ``min``, ``max`` of test MAP@R,
    ``query_half_width``, the mean half-width of its runs' query-bootstrap intervals, and from
    ``reruns`` (:func:`rerun_spread`) ``reruns`` and ``rerun_sd`` (0 and NaN without)."""
    rows = []
    for loss, series in values.items():
        own = intervals[intervals["loss"] == loss]
        half = ((own["query_ci_high"] - own["query_ci_low"]) / 2).mean() if len(own) else math.nan
        rows.append(
            {
                "loss": loss,
                "seeds": len(series),
                "mean": float(series.mean()),
                "sd": float(series.std(ddof=1)) if len(series) > 1 else math.nan,
                "min": float(series.min()),
                "max": float(series.max()),
                "query_half_width": float(half),
            }
        )
    columns = ["loss", "seeds", "mean", "sd", "min", "max", "query_half_width"]
    table = pd.DataFrame(rows, columns=columns).set_index("loss")
    if reruns is None:
        reruns = pd.DataFrame(columns=["reruns", "rerun_sd"])
    table["reruns"] = reruns["reruns"].reindex(table.index).fillna(0).astype(int)
    table["rerun_sd"] = reruns["rerun_sd"].reindex(table.index).astype(float)
    return table
