"""`tripletlab analyze`: figures, comparison table and report of a real tiny sweep.

The end-to-end tests analyse a copy of the shared ``tiny_sweep`` (real training, real MLflow
SQLite store, real Optuna journal); values are checked against MLflow read independently through
``MlflowClient``. Numerical helpers are checked against brute-force loops, closed forms and SciPy.
"""

from __future__ import annotations

import base64
import io
import math
import os
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout
from html import escape
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import pytest
from matplotlib import image as mpimg
from mlflow import MlflowClient
from scipy import stats

from analysis.comparison import comparison_table, paired_p_value
from analysis.convergence import normalise_train_loss
from analysis.embeddings import overlap_area, pair_distances, subsample
from analysis.load import load_sweep
from analysis.report import build_report
from experiments.eval.embedding_quality import DIFFICULTY_REFERENCE
from helpers.analysis_fixture import build_logged_sweep, copy_store
from helpers.sweep_fixture import working_directory
from sweeps.statistics import t_interval
from sweeps.tracking import find_experiment
from tripletlab.cli import main as cli_main

FIGURES = (
    "convergence",
    "embedding_projection",
    "pair_distances",
    "triplet_quality",
    "tuning",
    "budget",
    "geometry",
    "cost",
)
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_cli(args: list[str], cwd: Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with working_directory(cwd), redirect_stdout(out), redirect_stderr(err):
        code = cli_main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def analysed(tiny_sweep, tmp_path_factory):
    """A copy of the tiny sweep, one final run of its first loss repeated by ``tripletlab rerun``,
    analysed once by ``tripletlab analyze`` (default experiment).

    The command runs in a fresh process: MLflow caches artifact locations by run id within a
    process, so in this one the copy's runs would still resolve to the original's artifacts.
    """
    assert tiny_sweep.exit_code == 0
    root = tmp_path_factory.mktemp("analysed") / "sweep"
    uri = copy_store(tiny_sweep.root, root)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRIPLETLAB_PROGRESS": "0"}
    rerun = subprocess.run(
        [
            sys.executable,
            "-m",
            "tripletlab.cli",
            "rerun",
            "--loss",
            tiny_sweep.losses[0],
            "--times",
            "1",
            "--tracking-uri",
            uri,
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tripletlab.cli",
            "analyze",
            "--tracking-uri",
            uri,
            "--baseline",
            tiny_sweep.losses[0],
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return {
        "root": root,
        "uri": uri,
        "sweep": tiny_sweep,
        "report": root / "runs" / tiny_sweep.name / "report",
        "stdout": done.stdout,
    }


def final_runs(client: MlflowClient, experiment: str) -> list:
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs(
        [exp.experiment_id], "tags.`tripletlab.role` = 'final' and attributes.status = 'FINISHED'"
    )


# ---------- end to end on the tiny sweep ----------


def test_every_figure_is_a_decodable_png_and_an_svg(analysed):
    for name in FIGURES:
        png = analysed["report"] / f"{name}.png"
        data = png.read_bytes()
        assert data[:8] == PNG_SIGNATURE, name
        assert len(data) > 20_000, f"{name}.png is suspiciously small ({len(data)} bytes)"
        pixels = mpimg.imread(png)
        assert pixels.shape[0] >= 400 and pixels.shape[1] >= 600, (name, pixels.shape)
        assert pixels[..., :3].std() > 0.05, f"{name}.png is (nearly) blank"
        svg = (analysed["report"] / f"{name}.svg").read_text()
        assert "<svg" in svg and "</svg>" in svg


def test_projection_is_umap_by_default(analysed):
    svg = (analysed["report"] / "embedding_projection.svg").read_text()
    assert "<!-- UMAP 1 (a.u.) -->" in svg and "t-SNE" not in svg


def test_table_has_one_row_per_loss_with_the_values_logged_in_mlflow(analysed):
    sweep = analysed["sweep"]
    table = pd.read_csv(analysed["report"] / "comparison_table.csv", index_col="loss")
    assert sorted(table.index) == sorted(sweep.losses)
    client = MlflowClient(tracking_uri=analysed["uri"])
    finals = final_runs(client, sweep.experiment_name)
    exp = client.get_experiment_by_name(sweep.experiment_name)
    parents = {
        r.data.tags["tripletlab.loss"]: r
        for r in client.search_runs([exp.experiment_id], "tags.`tripletlab.role` = 'parent'")
    }
    by_seed = {}
    for loss in sweep.losses:
        own = [r for r in finals if r.data.tags["tripletlab.loss"] == loss]
        assert table.loc[loss, "seeds"] == sweep.seeds == len(own)
        for metric in ("precision_at_1", "r_precision", "map_at_r"):
            values = [r.data.metrics[f"test/{metric}"] for r in own]
            assert table.loc[loss, f"{metric}_mean"] == pytest.approx(np.mean(values), abs=1e-12)
            assert table.loc[loss, f"{metric}_mean"] == pytest.approx(
                parents[loss].data.metrics[f"final/test/{metric}_mean"], abs=1e-9
            )
            lo, hi = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
            assert table.loc[loss, f"{metric}_ci_low"] == pytest.approx(lo)
            assert table.loc[loss, f"{metric}_ci_high"] == pytest.approx(hi)
        assert table.loc[loss, "trials_complete"] == parents[loss].data.metrics["trials_complete"]
        assert table.loc[loss, "trials_pruned"] == parents[loss].data.metrics["trials_pruned"]
        children = [
            r
            for r in client.search_runs([exp.experiment_id], f"tags.`tripletlab.loss` = '{loss}'")
            if r.data.tags["tripletlab.role"] in ("trial", "final")
        ]
        assert table.loc[loss, "wall_clock_s"] == pytest.approx(
            sum(r.info.end_time - r.info.start_time for r in children) / 1000
        )
        assert table.loc[loss, "wall_clock_s"] > 0
        by_seed[loss] = {r.data.tags["tripletlab.seed"]: r.data.metrics["test/map_at_r"] for r in own}
    baseline, other = sweep.losses[0], sweep.losses[1]
    seeds = sorted(by_seed[baseline])
    expected = stats.ttest_rel(
        [by_seed[other][s] for s in seeds], [by_seed[baseline][s] for s in seeds]
    ).pvalue
    assert table.loc[other, "p_value"] == pytest.approx(expected)
    assert math.isnan(table.loc[baseline, "p_value"])


def test_paired_decisions_noise_floor_and_classes_match_mlflow_and_scipy(analysed, tmp_path):
    sweep = analysed["sweep"]
    client = MlflowClient(tracking_uri=analysed["uri"])
    finals = final_runs(client, sweep.experiment_name)
    by_seed = {
        loss: pd.Series(
            {
                r.data.tags["tripletlab.seed"]: r.data.metrics["test/map_at_r"]
                for r in finals
                if r.data.tags["tripletlab.loss"] == loss
            }
        ).sort_index()
        for loss in sweep.losses
    }
    noise = pd.read_csv(analysed["report"] / "noise_floor.csv", index_col="loss")
    for loss, values in by_seed.items():
        assert noise.loc[loss, "sd"] == pytest.approx(values.std(ddof=1))
        assert noise.loc[loss, "seeds"] == sweep.seeds
    # the rerun repeats the first loss's first final seed; training on the CPU is deterministic
    exp = client.get_experiment_by_name(sweep.experiment_name)
    [rerun] = client.search_runs([exp.experiment_id], "tags.`tripletlab.role` = 'rerun'")
    [original] = [r for r in finals if r.info.run_id == rerun.data.tags["tripletlab.rerun_of"]]
    assert original.data.tags["tripletlab.loss"] == sweep.losses[0]
    assert (
        original.data.tags["tripletlab.seed"]
        == rerun.data.tags["tripletlab.seed"]
        == min(by_seed[sweep.losses[0]].index)
    )
    assert rerun.data.metrics["test/map_at_r"] == original.data.metrics["test/map_at_r"]
    assert noise.loc[sweep.losses[0], "reruns"] == 2 and noise.loc[sweep.losses[0], "rerun_sd"] == 0
    assert noise.loc[sweep.losses[1], "reruns"] == 0
    [pair] = pd.read_csv(analysed["report"] / "paired_comparisons.csv").to_dict("records")
    first, second = pair["loss"], pair["other"]
    assert by_seed[first].mean() >= by_seed[second].mean()  # the better-ranked loss comes first
    d = by_seed[first] - by_seed[second]
    assert pair["diff_mean"] == pytest.approx(d.mean()) and pair["pairs"] == sweep.seeds
    assert pair["p_t"] == pytest.approx(stats.ttest_rel(by_seed[first], by_seed[second]).pvalue)
    assert pair["p_wilcoxon"] == pytest.approx(stats.wilcoxon(d).pvalue)
    # the per-query AP@R recomputed from each run's test embeddings averages to the logged MAP@R
    intervals = pd.read_csv(analysed["report"] / "run_intervals.csv")
    assert len(intervals) == len(finals)
    np.testing.assert_allclose(intervals["map_at_r_from_queries"], intervals["map_at_r"], atol=1e-5)
    assert (intervals["query_ci_low"] < intervals["map_at_r"]).all()
    assert (intervals["map_at_r"] < intervals["query_ci_high"]).all()
    line = f"{first} vs {second}: {100 * d.mean():+.1f} ["
    assert line in analysed["stdout"] and line in (analysed["report"] / "report.md").read_text()
    assert "Is the difference real?" in (analysed["report"] / "report.html").read_text()
    # per-class MAP@R covers every test class, and the pair's class comparison agrees with it
    per_class = pd.read_csv(analysed["report"] / "per_class_map_at_r.csv", index_col="class")
    run_id = finals[0].info.run_id
    labels = np.load(client.download_artifacts(run_id, "embeddings/test.npz", str(tmp_path)))["labels"]
    assert sorted(per_class.index) == sorted(set(labels.tolist()))
    assert ((per_class >= 0) & (per_class <= 1)).all().all()
    [by_class] = pd.read_csv(analysed["report"] / "class_comparisons.csv").to_dict("records")
    assert (by_class["loss"], by_class["other"]) == (first, second)
    assert by_class["better"] == int((per_class[first] > per_class[second]).sum())


def test_geometry_is_logged_per_epoch_and_correlated_with_map_at_r(analysed):
    sweep = analysed["sweep"]
    client = MlflowClient(tracking_uri=analysed["uri"])
    finals = final_runs(client, sweep.experiment_name)
    for run in finals:
        history = client.get_metric_history(run.info.run_id, "val/spectral_decay")
        assert [m.step for m in history] == [1] and history[0].value > 0  # the tiny sweep trains 1 epoch
    correlations = pd.read_csv(analysed["report"] / "geometry_correlations.csv", index_col="quantity")
    ratio = [r.data.metrics["val/distance_ratio"] for r in finals]
    test = [r.data.metrics["test/map_at_r"] for r in finals]
    expected = stats.spearmanr(ratio, test)
    assert correlations.loc["distance_ratio", "rho_test"] == pytest.approx(expected.statistic)
    assert correlations.loc["distance_ratio", "runs_test"] == len(finals)
    assert correlations.loc["spectral_decay", "runs_val"] == sweep.trials * len(sweep.losses)


def test_budget_curves_come_from_the_optuna_history(analysed):
    import optuna
    from optuna.storages.journal import JournalFileBackend

    sweep = analysed["sweep"]
    journal = analysed["root"] / "runs" / sweep.name / "optuna.journal"
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(journal)))
    curves = pd.read_csv(analysed["report"] / "budget_curves.csv")
    for loss in sweep.losses:
        study = optuna.load_study(study_name=f"{sweep.name}/{loss}", storage=storage)
        values = [t.value for t in study.trials]
        own = curves[curves["loss"] == loss]
        assert own["n"].tolist() == list(range(1, sweep.trials + 1))
        assert own["expected"].iloc[0] == pytest.approx(np.mean(values))
        assert own["expected"].iloc[-1] <= max(values) and own["expected"].is_monotonic_increasing
    crossed = pd.read_csv(analysed["report"] / "budget_crossings.csv")
    assert ("overtakes" if len(crossed) else "No budget curves cross") in analysed["stdout"]


def test_html_embeds_every_figure_and_markdown_links_them(analysed):
    html = (analysed["report"] / "report.html").read_text()
    markdown = (analysed["report"] / "report.md").read_text()
    for name in FIGURES:
        encoded = base64.b64encode((analysed["report"] / f"{name}.png").read_bytes()).decode()
        assert f"data:image/png;base64,{encoded}'" in html, name
        assert f"]({name}.png)" in markdown
    assert "src='http" not in html and ".png'" not in html  # self-contained
    for loss in analysed["sweep"].losses:
        assert loss in html and f"| {loss} |" in markdown
    assert "PED-ANOVA" in html
    # the triplet-difficulty figure says in which geometry every loss was measured
    assert DIFFICULTY_REFERENCE in markdown and escape(DIFFICULTY_REFERENCE) in html


def test_report_is_logged_to_the_sweeps_summary_run(analysed):
    client = MlflowClient(tracking_uri=analysed["uri"])
    exp = client.get_experiment_by_name(analysed["sweep"].experiment_name)
    [summary] = client.search_runs([exp.experiment_id], "tags.`tripletlab.role` = 'summary'")
    assert summary.info.run_id in analysed["stdout"]
    # read the run's artifact location from the store; listing through this process's cache would
    # resolve the run id to the original sweep's artifacts (see ``analysed``)
    logged = Path(urlparse(summary.info.artifact_uri).path) / "report"
    assert logged.is_relative_to(analysed["root"])
    for name in ("report.html", "report.md", *(f"{n}.png" for n in FIGURES)):
        assert (logged / name).read_bytes() == (analysed["report"] / name).read_bytes(), name
    original = Path(
        urlparse(
            summary.info.artifact_uri.replace(analysed["root"].as_uri(), analysed["sweep"].root.as_uri())
        ).path
    )
    assert not (original / "report").exists()  # the shared sweep is untouched


def test_default_experiment_is_the_most_recent_sweep(analysed):
    client = MlflowClient(tracking_uri=analysed["uri"])
    assert find_experiment(client, None).name == analysed["sweep"].experiment_name
    later = client.create_experiment("a-later-sweep")
    run = client.create_run(later, tags={"tripletlab.role": "parent", "tripletlab.loss": "triplet"})
    client.set_terminated(run.info.run_id)
    client.create_experiment("not-a-sweep")
    assert find_experiment(client, None).name == "a-later-sweep"


# ---------- bad input ----------


def test_unknown_experiment_is_one_line_listing_the_available_ones(analysed):
    code, _, err = run_cli(
        ["analyze", "--experiment", "no-such-sweep", "--tracking-uri", analysed["uri"]], analysed["root"]
    )
    assert code == 2
    assert err.count("\n") == 1 and "unknown experiment 'no-such-sweep'" in err
    assert analysed["sweep"].experiment_name in err


def test_experiment_without_finished_runs_is_one_line(analysed):
    client = MlflowClient(tracking_uri=analysed["uri"])
    exp = client.create_experiment("still-running")
    client.create_run(exp, tags={"tripletlab.role": "trial", "tripletlab.loss": "triplet"})  # left RUNNING
    code, _, err = run_cli(
        ["analyze", "--experiment", "still-running", "--tracking-uri", analysed["uri"]], analysed["root"]
    )
    assert code == 2 and err.count("\n") == 1
    assert "no finished trial or final runs" in err


def test_rerun_of_an_unknown_loss_or_seed_is_one_line(analysed):
    sweep = ["--experiment", analysed["sweep"].experiment_name, "--tracking-uri", analysed["uri"]]
    code, _, err = run_cli(["rerun", "--loss", "no_such_loss", *sweep], analysed["root"])
    assert code == 2 and err.count("\n") == 1 and "no finished final run of loss 'no_such_loss'" in err
    loss = analysed["sweep"].losses[1]
    code, _, err = run_cli(["rerun", "--loss", loss, "--seed", "99", *sweep], analysed["root"])
    assert code == 2 and "no final run with seed 99" in err


def test_missing_store_is_one_line(tmp_path):
    code, _, err = run_cli(["analyze", "--tracking-uri", f"sqlite:///{tmp_path / 'absent.db'}"], tmp_path)
    assert code == 2 and "no MLflow store" in err and err.count("\n") == 1
    assert not (tmp_path / "absent.db").exists()


@pytest.fixture
def without_umap(monkeypatch):
    """``import umap`` fails, as where umap-learn is missing: t-SNE, and no numba compilation here."""
    monkeypatch.setitem(sys.modules, "umap", None)


@pytest.fixture(scope="module")
def logged_sweep(tmp_path_factory):
    """A sweep logged directly (no training) in which ``batch_hard`` has no embeddings artifact."""
    return build_logged_sweep(
        tmp_path_factory.mktemp("logged"),
        losses=("triplet", "batch_hard", "multi_similarity"),
        seeds=(0, 1, 2),
        trials=4,
        embeddings_for=("triplet", "multi_similarity"),
    )


def test_run_without_embeddings_skips_its_panels_and_says_so(logged_sweep, without_umap, tmp_path):
    sweep = load_sweep(logged_sweep.name, logged_sweep.tracking_uri, logged_sweep.storage)
    report = build_report(sweep, tmp_path / "report", points=60)
    assert any("batch_hard" in note and "embeddings/test.npz" in note for note in report.notes)
    assert "batch_hard" in (tmp_path / "report" / "report.html").read_text().split("<h2>Notes</h2>")[1]
    assert set(FIGURES) == set(report.figures)
    assert "<!-- t-SNE 1 (a.u.) -->" in (tmp_path / "report" / "embedding_projection.svg").read_text()
    assert math.isnan(report.table.loc["batch_hard", "pair_distance_overlap"])
    assert 0 <= report.table.loc["triplet", "pair_distance_overlap"] <= 1
    # the summary run is created (this sweep has none) and carries the report
    client = MlflowClient(tracking_uri=logged_sweep.tracking_uri)
    assert client.get_run(report.run_id).data.tags["tripletlab.role"] == "summary"
    assert "report/report.html" in {a.path for a in client.list_artifacts(report.run_id, "report")}


def test_baseline_pairing_and_detect_option(logged_sweep, without_umap, tmp_path):
    sweep = load_sweep(logged_sweep.name, logged_sweep.tracking_uri)
    report = build_report(
        sweep, tmp_path / "report", points=60, log_to_mlflow=False, pairing="baseline", detect_points=2.0
    )
    pairs = report.decisions.comparisons
    assert sorted(pairs["loss"]) == ["batch_hard", "multi_similarity"] and set(pairs["other"]) == {"triplet"}
    assert "seeds for 2 point" in (tmp_path / "report" / "report.md").read_text()
    ranked = [line.split(". ", 1)[1].split(":")[0] for line in report.decisions.lines[:3]]
    assert " over 3 seeds" in report.decisions.lines[0]
    # the fixture's quality rises with the loss index
    assert ranked == ["multi_similarity", "batch_hard", "triplet"]
    assert any("batch_hard" in note and "query-bootstrap" in note for note in report.notes)


def test_cost_columns_are_the_final_runs_means(logged_sweep):
    sweep = load_sweep(logged_sweep.name, logged_sweep.tracking_uri)
    table = comparison_table(sweep)
    client = MlflowClient(tracking_uri=logged_sweep.tracking_uri)
    exp = client.get_experiment_by_name(logged_sweep.name)
    for loss in logged_sweep.losses:
        runs = client.search_runs(
            [exp.experiment_id], f"tags.`tripletlab.role` = 'final' and tags.`tripletlab.loss` = '{loss}'"
        )
        for column, key in (
            ("step_ms", "cost/step_ms"),
            ("loss_ms", "cost/loss_ms"),
            ("loss_peak_mb", "cost/loss_peak_mb"),
        ):
            assert table.loc[loss, column] == pytest.approx(np.mean([r.data.metrics[key] for r in runs]))


def test_paired_test_against_the_triplet_baseline(logged_sweep):
    sweep = load_sweep(logged_sweep.name, logged_sweep.tracking_uri)
    table = comparison_table(sweep)
    finals = sweep.role("final")
    base = finals[finals["loss"] == "triplet"].set_index("seed")["metrics.test/map_at_r"].sort_index()
    for loss in ("batch_hard", "multi_similarity"):
        own = finals[finals["loss"] == loss].set_index("seed")["metrics.test/map_at_r"].sort_index()
        assert table.loc[loss, "p_value"] == pytest.approx(stats.ttest_rel(own, base).pvalue)
        assert table.loc[loss, "map_at_r_diff"] == pytest.approx((own - base).mean())
        assert table.loc[loss, "pairs"] == 3


# ---------- numerical helpers against independent oracles ----------


def test_pair_distances_match_a_brute_force_loop():
    rng = np.random.default_rng(1)
    emb, labels = rng.normal(size=(13, 4)), rng.integers(0, 3, 13)
    pos, neg = [], []
    for i in range(13):
        for j in range(i + 1, 13):
            (pos if labels[i] == labels[j] else neg).append(math.dist(emb[i], emb[j]))
    got_pos, got_neg = pair_distances(emb, labels)
    np.testing.assert_allclose(got_pos, pos, atol=1e-9)
    np.testing.assert_allclose(got_neg, neg, atol=1e-9)


def test_overlap_area_matches_the_closed_form_for_two_gaussians():
    rng = np.random.default_rng(2)
    shift = 1.0
    a, b = rng.normal(0, 1, 200_000), rng.normal(shift, 1, 200_000)
    expected = 2 * stats.norm.cdf(-shift / 2)  # overlap of N(0,1) and N(shift,1)
    assert overlap_area(a, b, bins=80) == pytest.approx(expected, abs=0.02)
    assert overlap_area(a, a) == pytest.approx(1.0)
    assert overlap_area(np.array([0.0, 0.1]), np.array([5.0, 5.1])) == 0.0


def test_t_interval_and_paired_p_value_match_scipy():
    values = [0.61, 0.64, 0.59, 0.66]
    mean, lo, hi = t_interval(values)
    assert (lo, hi) == pytest.approx(stats.t.interval(0.95, 3, loc=np.mean(values), scale=stats.sem(values)))
    assert mean == pytest.approx(np.mean(values))
    assert math.isnan(t_interval([0.5])[1])
    a = pd.Series([0.7, 0.72, 0.69, 0.75], index=["0", "1", "2", "3"])
    b = pd.Series([0.66, 0.70, 0.69, 0.70, 0.9], index=["0", "1", "2", "3", "4"])  # seed 4 has no pair
    diff = (a - b[a.index]).to_numpy()
    t = diff.mean() / (diff.std(ddof=1) / math.sqrt(4))
    p, pairs = paired_p_value(a, b)
    assert pairs == 4 and p == pytest.approx(2 * stats.t.sf(abs(t), 3))
    assert math.isnan(paired_p_value(a[:1], b)[0])


def test_train_loss_is_normalised_by_its_first_epoch_per_run():
    history = pd.DataFrame(
        {
            "run_id": ["a", "a", "b", "b", "a"],
            "key": ["train/loss"] * 4 + ["val/map_at_r"],
            "step": [2, 1, 1, 2, 1],
            "value": [1.0, 4.0, 0.5, 0.25, 0.3],
        }
    )
    out = normalise_train_loss(history)
    assert out["value"].tolist() == [0.25, 1.0, 1.0, 0.5, 0.3]


def test_subsample_keeps_every_class_and_the_budget():
    labels = np.repeat(np.arange(7), [300, 5, 100, 100, 100, 1, 394])
    keep = subsample(labels, 100, seed=3)
    assert len(keep) == 100 and len(set(keep)) == 100
    assert set(labels[keep]) == set(range(7))
    np.testing.assert_array_equal(keep, subsample(labels, 100, seed=3))
    assert len(subsample(labels[:50], 100)) == 50
