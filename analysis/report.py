"""The sweep report: figures (PNG + SVG), the comparison table, one self-contained HTML file (figures
embedded as base64) and a Markdown version, written to a directory and logged as artifacts of the
sweep's summary run (tag ``tripletlab.role=summary``) so they show in the MLflow UI.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from mlflow import MlflowClient

from experiments.eval.embedding_quality import DIFFICULTY_REFERENCE
from sweeps.markdown import frame_markdown
from sweeps.tracking import ROLE_TAG

from .budget import budget_curves, budget_figure, crossing_note, crossings
from .colors import loss_colors
from .comparison import comparison_table, format_table
from .convergence import convergence_figure, convergence_histories
from .cost import cost_figure
from .crossmodal import joint_projection_figure, recall_table
from .decisions import decision_table, decisions_note, noise_table, ranking_lines
from .embeddings import (
    PROJECTION_POINTS,
    distance_figure,
    load_test_embeddings,
    projection_figure,
    triplet_quality_figure,
)
from .geometry import GEOMETRY_NOTE, correlation_table, geometry_correlations, geometry_histories
from .geometry import PANELS as GEOMETRY_PANELS
from .load import BASELINE_LOSS, Sweep
from .noise import noise_floor, per_seed, query_scores, rerun_spread, run_intervals
from .paired import DETECT_POINTS, paired_comparisons
from .per_class import class_comparisons, class_map_at_r, class_table
from .tuning import IMPORTANCE_EVALUATOR, trials_table, tuning_figure

REPORT_ARTIFACT_DIR = "report"
RECALL_NOTE = (
    "Paired test set: Recall@K is the share of queries whose own caption (or image) ranks in the "
    "top K of the other modality; mean over the final seeds; chance R@1 is 1 / number of test "
    "pairs."
)
CLASS_NOTE = (
    "Per-class MAP@R: the mean AP@R of each test class's queries, averaged over the final seeds "
    "(all classes in per_class_map_at_r.csv). Each pair is compared over the classes both losses "
    "have: the classes where the first is ahead, paired t-test and Wilcoxon p-values over classes, "
    "and the classes with the largest differences."
)
CAPTIONS = {
    "convergence": "Convergence of the final runs per loss: validation MAP@R, normalised training loss, "
    "active-triplet and margin-violation fractions (mean and min-max band over seeds).",
    "embedding_projection": "2-D projection of the test embeddings of each loss's best final run, "
    "coloured by class.",
    "pair_distances": "Positive- and negative-pair distances on the test classes, with the overlap area of "
    "the two densities (lower is better).",
    "triplet_quality": "Easy / semi-hard / hard test-triplet fractions, measured in "
    f"{DIFFICULTY_REFERENCE}, and alignment vs uniformity per final run.",
    "crossmodal_projection": "Images and their captions projected together from each loss's best final run: "
    "circles are images, triangles captions, colours classes.",
    "tuning": f"Optuna optimisation history, hyperparameter importances ({IMPORTANCE_EVALUATOR}), and "
    "validation MAP@R against the margin and the mining strategy for the margin-based losses.",
    "geometry": "Embedding geometry of the final runs on the validation split, per epoch: alignment, "
    "uniformity, intra- and inter-class distance and their ratio, spectral decay ρ (mean and "
    "min-max band over seeds).",
    "cost": "Cost per loss: test MAP@R against the total compute time of its trials and final runs, and the "
    "time per training step with the loss and mining's part (forward and backward on one training "
    "batch) and its peak memory.",
    "budget": "Expected best validation MAP@R after n trials per loss (Dodge et al. 2019), from the Optuna "
    "history (pruned trials at their last report), with a ±1 sd band; an X marks where two "
    "losses' curves cross.",
}


@dataclass
class Decisions:
    """The "Is the difference real?" section: noise floor, paired comparisons, ranking lines, and
    the same pairs compared class by class."""

    noise: pd.DataFrame
    comparisons: pd.DataFrame
    lines: list[str]
    delta: float
    classes: pd.DataFrame


@dataclass
class Report:
    """What :func:`build_report` wrote."""

    directory: Path
    html: Path
    markdown: Path
    table: pd.DataFrame
    figures: dict[str, Path] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    run_id: str | None = None
    decisions: Decisions | None = None


def _save(fig: Figure, directory: Path, name: str) -> Path:
    fig.savefig(directory / f"{name}.svg")
    png = directory / f"{name}.png"
    fig.savefig(png, dpi=110)
    return png


def build_figures(
    sweep: Sweep, directory: Path, notes: list[str], points: int = PROJECTION_POINTS, seed: int = 0
) -> tuple[dict[str, Path], dict[str, float]]:
    """Write every figure the sweep's data allows; returns the PNG paths and the distance overlaps."""
    colors = loss_colors(sweep.losses)
    figures, overlaps = {}, {}
    history = convergence_histories(sweep)
    if history.empty:
        notes.append("no per-epoch history in the final runs: convergence figure skipped")
    else:
        figures["convergence"] = _save(
            convergence_figure(history, sweep.losses, colors), directory, "convergence"
        )
    geometry = geometry_histories(sweep)
    if geometry.empty:
        notes.append("no per-epoch validation geometry in the final runs: geometry figure skipped")
    else:
        figures["geometry"] = _save(
            convergence_figure(
                geometry, sweep.losses, colors, GEOMETRY_PANELS, "Embedding geometry on the validation split"
            ),
            directory,
            "geometry",
        )
    embeddings = load_test_embeddings(sweep, notes)
    if embeddings:
        figures["embedding_projection"] = _save(
            projection_figure(embeddings, colors, points, seed), directory, "embedding_projection"
        )
        joint = joint_projection_figure(embeddings, colors, points, seed)
        if joint is not None:
            figures["crossmodal_projection"] = _save(joint, directory, "crossmodal_projection")
        fig, overlaps = distance_figure(embeddings, colors, seed=seed)
        figures["pair_distances"] = _save(fig, directory, "pair_distances")
    else:
        notes.append("no run has embeddings/test.npz: projection and distance figures skipped")
    if not sweep.role("final").empty:
        figures["triplet_quality"] = _save(
            triplet_quality_figure(sweep, colors), directory, "triplet_quality"
        )
    figures["tuning"] = _save(tuning_figure(sweep, colors, notes), directory, "tuning")
    return figures, overlaps


def build_budget(sweep: Sweep, directory: Path, figures: dict[str, Path]) -> str:
    """The budget figure, ``budget_curves.csv`` and ``budget_crossings.csv``; returns a sentence on
    whether the curves cross."""
    curves = budget_curves(trials_table(sweep))
    crossed = crossings(curves)
    curves.to_csv(directory / "budget_curves.csv", index=False)
    crossed.to_csv(directory / "budget_crossings.csv", index=False)
    figures["budget"] = _save(budget_figure(curves, crossed, loss_colors(sweep.losses)), directory, "budget")
    return crossing_note(crossed)


def build_decisions(
    sweep: Sweep, directory: Path, notes: list[str], pairing: str, baseline: str, delta: float, seed: int
) -> Decisions:
    """Noise floor, paired comparisons and per-class results of test MAP@R; writes
    ``noise_floor.csv``, ``run_intervals.csv``, ``paired_comparisons.csv``,
    ``per_class_map_at_r.csv`` and ``class_comparisons.csv``."""
    values = per_seed(sweep)
    scores = query_scores(sweep, notes)
    intervals = run_intervals(sweep, scores, seed=seed)
    noise = noise_floor(values, intervals, rerun_spread(sweep))
    comparisons = paired_comparisons(values, pairing, baseline, delta)
    per_class = class_map_at_r(scores)
    classes = class_comparisons(per_class, comparisons)
    intervals.to_csv(directory / "run_intervals.csv", index=False)
    noise.to_csv(directory / "noise_floor.csv")
    comparisons.to_csv(directory / "paired_comparisons.csv", index=False)
    per_class.to_csv(directory / "per_class_map_at_r.csv")
    classes.to_csv(directory / "class_comparisons.csv", index=False)
    return Decisions(noise, comparisons, ranking_lines(noise, comparisons, delta), delta, classes)


def build_report(
    sweep: Sweep,
    directory: Path,
    points: int = PROJECTION_POINTS,
    seed: int = 0,
    baseline: str = BASELINE_LOSS,
    log_to_mlflow: bool = True,
    pairing: str = "all",
    detect_points: float = DETECT_POINTS,
) -> Report:
    """Write figures, tables, ``report.html`` and ``report.md`` to ``directory``; log them to MLflow.

    ``pairing`` ("all" or "baseline") picks the paired comparisons; ``detect_points`` is the MAP@R
    difference, in points, the seeds-needed estimate is for."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    notes: list[str] = []
    figures, overlaps = build_figures(sweep, directory, notes, points, seed)
    decisions = build_decisions(sweep, directory, notes, pairing, baseline, detect_points / 100, seed)
    decisions.lines.append(build_budget(sweep, directory, figures))
    table = comparison_table(sweep, baseline)
    correlations = geometry_correlations(sweep)
    correlations.to_csv(directory / "geometry_correlations.csv")
    table["pair_distance_overlap"] = [overlaps.get(loss, math.nan) for loss in table.index]
    if not sweep.role("final").empty:
        figures["cost"] = _save(cost_figure(table, loss_colors(sweep.losses)), directory, "cost")
    table.to_csv(directory / "comparison_table.csv")
    if baseline not in table.index:
        notes.append(f"no {baseline!r} baseline in this sweep: no paired tests (choose one with --baseline)")
    shown = format_table(table, baseline)
    shown["pair-distance overlap"] = [
        "n/a" if math.isnan(v) else f"{v:.3f}" for v in table["pair_distance_overlap"]
    ]
    report = Report(
        directory,
        directory / "report.html",
        directory / "report.md",
        table,
        figures,
        notes,
        decisions=decisions,
    )
    recalls = recall_table(sweep)
    if not recalls.empty:
        recalls.to_csv(directory / "crossmodal_recall.csv")
    geometry = correlation_table(correlations)
    blocks = _blocks(shown, figures, notes, baseline, recalls, decisions, geometry)
    report.html.write_text(_html(sweep, blocks), encoding="utf-8")
    report.markdown.write_text(_markdown(sweep, blocks), encoding="utf-8")
    if log_to_mlflow:
        report.run_id = log_report(sweep, directory)
    return report


def log_report(sweep: Sweep, directory: Path) -> str:
    """Log ``directory`` under ``report/`` of the sweep's summary run (created when there is none)."""
    client = MlflowClient(tracking_uri=sweep.tracking_uri)
    summaries = sweep.runs[sweep.runs["role"] == "summary"]
    if len(summaries):
        run_id = summaries.sort_values("start_time").iloc[-1]["run_id"]
    else:
        run_id = client.create_run(
            sweep.experiment_id, run_name="analysis", tags={ROLE_TAG: "summary"}
        ).info.run_id
        client.set_terminated(run_id)
    client.log_artifacts(run_id, str(directory), artifact_path=REPORT_ARTIFACT_DIR)
    return run_id


def _header(sweep: Sweep) -> list[tuple[str, str]]:
    runs = sweep.runs
    logged = runs.get("tags.tripletlab.dataset", pd.Series(dtype=str))
    datasets = ", ".join(sorted(logged.dropna().unique())) or "unknown"
    finals = sweep.role("final")
    return [
        ("Experiment", sweep.name),
        ("Dataset", datasets),
        ("Losses", ", ".join(sweep.losses)),
        ("Runs", f"{len(sweep.role('trial'))} finished trials, {len(finals)} finished final runs"),
        ("Tracking URI", sweep.tracking_uri),
        ("Optuna storage", sweep.storage or "not loaded"),
        ("Generated", datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
    ]


def _table_note(baseline: str) -> str:
    return (
        "Test-split metrics, in %: mean and Student-t 95% interval over the final seeds "
        f"(clipped to [0, 100]). p: two-sided paired t-test of MAP@R against the {baseline} baseline, "
        "paired by seed (— when fewer than two shared seeds). Wall clock: the loss's trial and final "
        "runs, summed. ms / step: wall time per training step in the final runs (validation left out); "
        "loss + mining: one forward and backward of the loss alone on a training batch, its time and "
        "peak memory (mean over final runs). "
        "Pair-distance overlap: see the distance figure (lower separates classes better)."
    )


@dataclass(frozen=True)
class Block:
    """One piece of the report, written the same way to HTML and Markdown: a ``heading`` (``value``
    its text, ``level``), a ``table`` (a DataFrame of display values), a ``text`` paragraph, a
    ``code`` block (lines), a ``figure`` (``name``, ``value`` the PNG path) or a ``list`` of notes.
    ``name`` is the HTML id of a heading or the class of a table."""

    kind: str
    value: Any
    name: str = ""
    level: int = 2


def _blocks(
    table: pd.DataFrame,
    figures: dict[str, Path],
    notes: list[str],
    baseline: str,
    recalls: pd.DataFrame,
    decisions: Decisions,
    geometry: pd.DataFrame,
) -> list[Block]:
    """The report's body, in order, below its title and header."""
    blocks = [
        Block("heading", "Comparison"),
        Block("table", table, "comparison"),
        Block("text", _table_note(baseline)),
        Block("heading", "Is the difference real?", "decisions"),
        Block("code", decisions.lines),
        Block("heading", "Noise floor", level=3),
        Block("table", noise_table(decisions.noise), "noise"),
        Block("heading", "Paired comparisons", level=3),
        Block("table", decision_table(decisions.comparisons, decisions.delta), "paired"),
        Block("text", decisions_note(decisions.delta)),
        Block("heading", "Per-class results", level=3),
        Block("table", class_table(decisions.classes), "per-class"),
        Block("text", CLASS_NOTE),
        Block("heading", "Embedding geometry and retrieval"),
        Block("table", geometry, "geometry"),
        Block("text", GEOMETRY_NOTE),
    ]
    if not recalls.empty:
        blocks += [
            Block("heading", "Cross-modal retrieval"),
            Block("table", recalls, "recall"),
            Block("text", RECALL_NOTE),
        ]
    blocks += [Block("figure", png, name) for name, png in figures.items()]
    if notes:
        blocks += [Block("heading", "Notes"), Block("list", notes)]
    return blocks


def _html_block(block: Block) -> str:
    if block.kind == "heading":
        anchor = f" id='{block.name}'" if block.name else ""
        return f"<h{block.level}{anchor}>{html.escape(block.value)}</h{block.level}>"
    if block.kind == "table":
        return block.value.to_html(escape=True, classes=block.name)
    if block.kind == "text":
        return f"<p>{html.escape(block.value)}</p>"
    if block.kind == "code":
        return "<pre class='ranking'>" + html.escape("\n".join(block.value)) + "</pre>"
    if block.kind == "figure":
        data = base64.b64encode(block.value.read_bytes()).decode("ascii")
        return (
            f"<figure id='{block.name}'><img alt='{block.name}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(CAPTIONS[block.name])}</figcaption></figure>"
        )
    return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in block.value) + "</ul>"


def _markdown_block(block: Block) -> list[str]:
    if block.kind == "heading":
        return ["#" * block.level + " " + block.value, ""]
    if block.kind == "table":
        return [frame_markdown(block.value), ""]
    if block.kind == "text":
        return [block.value, ""]
    if block.kind == "code":
        return ["```", *block.value, "```", ""]
    if block.kind == "figure":
        return [f"![{block.name}]({block.value.name})", "", CAPTIONS[block.name], ""]
    return [*(f"- {item}" for item in block.value), ""]


def _html(sweep: Sweep, blocks: list[Block]) -> str:
    head = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in _header(sweep))
    body = [
        f"<h1>tripletlab sweep report: {html.escape(sweep.name)}</h1>",
        f"<table class='meta'>{head}</table>",
        *(_html_block(block) for block in blocks),
    ]
    style = (
        "body{font-family:sans-serif;max-width:1300px;margin:auto;padding:1em}"
        "table{border-collapse:collapse;font-size:0.9em}td,th{border:1px solid #ccc;padding:3px 6px}"
        "img{max-width:100%}figure{margin:1.5em 0}figcaption{color:#444}"
    )
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(sweep.name)} report</title>"
        f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
    )


def _markdown(sweep: Sweep, blocks: list[Block]) -> str:
    lines = [f"# tripletlab sweep report: {sweep.name}", ""]
    lines += [f"- **{k}**: {v}" for k, v in _header(sweep)]
    lines.append("")
    for block in blocks:
        lines += _markdown_block(block)
    return "\n".join(lines)
