"""Paired decisions, seeds needed, per-query AP@R and the query bootstrap, each against an independent
oracle: Monte Carlo simulation, the normal-approximation sample size, brute-force enumeration and
loops, SciPy, and the project's own retrieval metrics; the expected-max budget curves
and the per-class comparisons. The report's use of them is tested end to end
in test_analysis.py."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.budget import budget_curves, crossing_note, crossings, expected_max
from analysis.load import Sweep
from analysis.noise import noise_floor, rerun_spread
from analysis.paired import compare, decision_line, paired_comparisons, seeds_needed, t_test_power
from analysis.per_class import class_comparison, class_comparisons, class_map_at_r
from analysis.query_scores import average_precision_at_r
from experiments.eval.retrieval import retrieval_metrics
from sweeps.statistics import bootstrap_interval, wilcoxon_p_value


def simulated_power(n: int, delta: float, sd: float, runs: int = 40_000, seed: int = 0) -> float:
    """Share of simulated paired t-tests with ``n`` normal differences that reject at 5%."""
    d = np.random.default_rng(seed).normal(delta, sd, size=(runs, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    return float((2 * stats.t.sf(np.abs(t), n - 1) < 0.05).mean())


@pytest.mark.parametrize("n, delta, sd", [(3, 0.01, 0.005), (6, 0.01, 0.012), (12, 0.004, 0.01)])
def test_power_matches_a_simulation(n, delta, sd):
    assert t_test_power(n, delta, sd) == pytest.approx(simulated_power(n, delta, sd), abs=0.012)


@pytest.mark.parametrize("sd", [0.004, 0.012, 0.03])
def test_seeds_needed_is_the_smallest_n_with_80_percent_power(sd):
    n = seeds_needed(sd, 0.01)
    assert simulated_power(n, 0.01, sd) >= 0.8 - 0.01
    assert n == 2 or simulated_power(n - 1, 0.01, sd) < 0.8 + 0.01
    # the normal approximation with Guenther's correction, n ~ ((z_.975 + z_.8) sd / delta)^2 + z_.975^2 / 2
    z = stats.norm.ppf(0.975)
    approx = ((z + stats.norm.ppf(0.8)) * sd / 0.01) ** 2 + z**2 / 2
    assert abs(n - approx) <= 1.5 or n == 2
    assert seeds_needed(sd, 0.005) > n  # a smaller difference needs more seeds
    assert math.isnan(seeds_needed(math.nan, 0.01)) and math.isinf(seeds_needed(10.0, 1e-6))


def test_wilcoxon_matches_exact_enumeration_of_sign_flips():
    d = np.array([0.012, -0.004, 0.021, 0.007, -0.015, 0.018])
    ranks = stats.rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    sums = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product((0, 1), repeat=len(d))]
    sums = np.array(sums)
    expected = min(1.0, 2 * min((sums <= observed).mean(), (sums >= observed).mean()))
    assert wilcoxon_p_value(d) == pytest.approx(expected)
    assert math.isnan(wilcoxon_p_value([0.0, 0.0]))


def test_compare_matches_scipy_on_the_seeds_both_losses_share():
    a = pd.Series([0.61, 0.64, 0.60, 0.66, 0.70], index=["1", "2", "3", "4", "9"])
    b = pd.Series([0.60, 0.61, 0.61, 0.62], index=["1", "2", "3", "4"])
    got = compare(a, b)
    d = a[b.index] - b
    assert got["pairs"] == 4 and got["diff_mean"] == pytest.approx(d.mean())
    assert (got["diff_ci_low"], got["diff_ci_high"]) == pytest.approx(
        stats.t.interval(0.95, 3, loc=d.mean(), scale=stats.sem(d))
    )
    assert got["p_t"] == pytest.approx(stats.ttest_rel(a[b.index], b).pvalue)
    assert got["p_wilcoxon"] == pytest.approx(stats.wilcoxon(d).pvalue)
    assert got["diff_sd"] == pytest.approx(d.std(ddof=1))
    assert got["resolved"] == (got["p_t"] < 0.05)
    assert got["seeds_needed"] == seeds_needed(d.std(ddof=1), 0.01)


def test_identical_differences_are_resolved_by_their_sign():
    a = pd.Series([0.7, 0.8, 0.9], index=["1", "2", "3"])
    assert compare(a, a - 0.02)["resolved"] and not compare(a, a)["resolved"]


def test_pairs_follow_the_ranking_and_the_baseline_option():
    values = {
        "triplet": pd.Series([0.50, 0.52, 0.51], index=["1", "2", "3"]),
        "batch_hard": pd.Series([0.55, 0.56, 0.57], index=["1", "2", "3"]),
        "ms": pd.Series([0.53, 0.50, 0.55], index=["1", "2", "3"]),
    }
    every = paired_comparisons(values)
    assert list(zip(every["loss"], every["other"])) == [
        ("batch_hard", "ms"),
        ("batch_hard", "triplet"),
        ("ms", "triplet"),
    ]
    assert (every["diff_mean"] > 0).all()
    against = paired_comparisons(values, "baseline", "triplet")
    assert list(zip(against["loss"], against["other"])) == [("batch_hard", "triplet"), ("ms", "triplet")]
    assert paired_comparisons(values, "baseline", "absent").empty
    with pytest.raises(ValueError, match="unknown pairing"):
        paired_comparisons(values, "some")


def test_decision_line_reads_like_the_issue():
    row = {
        "loss": "batch_hard",
        "other": "triplet",
        "pairs": 3,
        "diff_mean": 0.008,
        "diff_ci_low": -0.004,
        "diff_ci_high": 0.020,
        "p_t": 0.18,
        "resolved": False,
        "seeds_needed": 9,
    }
    assert decision_line(row) == (
        "batch_hard vs triplet: +0.8 [-0.4, 2.0], p=0.18: not resolved, ~9 seeds needed"
    )
    assert decision_line({**row, "p_t": 0.003, "resolved": True}).endswith("p=0.003: resolved (3 seeds)")
    assert "likely smaller" in decision_line({**row, "seeds_needed": 3})


def brute_force_ap_at_r(emb, labels, ref, ref_labels, same_source):
    out = []
    for i, (q, label) in enumerate(zip(emb, labels)):
        others = [j for j in range(len(ref)) if not (same_source and j == i)]
        r = sum(ref_labels[j] == label for j in others)
        if r == 0:
            out.append(math.nan)
            continue
        ranked = sorted(others, key=lambda j: math.dist(q, ref[j]))[:r]
        hits, total = 0, 0.0
        for position, j in enumerate(ranked, start=1):
            if ref_labels[j] == label:
                hits += 1
                total += hits / position
        out.append(total / r)
    return np.array(out)


def test_per_query_ap_at_r_matches_a_loop_and_the_runs_map_at_r():
    rng = np.random.default_rng(4)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 3] * 3)  # class 3 below has a single query in `ref`
    emb = rng.normal(size=(labels.size, 5)) + labels[:, None] * 0.7
    got = average_precision_at_r(emb, labels, chunk_size=7)
    np.testing.assert_allclose(got, brute_force_ap_at_r(emb, labels, emb, labels, True), atol=1e-12)
    expected = retrieval_metrics(emb, labels, with_nmi=False)["map_at_r"]
    assert np.nanmean(got) == pytest.approx(expected, abs=1e-6)
    ref, ref_labels = rng.normal(size=(12, 5)), np.array([0, 1, 2] * 4)  # a gallery without class 3
    against = average_precision_at_r(emb, labels, ref, ref_labels)
    np.testing.assert_allclose(against, brute_force_ap_at_r(emb, labels, ref, ref_labels, False), atol=1e-12)
    assert np.isnan(against[labels == 3]).all()


def test_bootstrap_interval_matches_scipy_and_normal_theory():
    x = np.random.default_rng(5).beta(2, 3, size=800)
    low, high = bootstrap_interval(x, resamples=4000, seed=1)
    reference = stats.bootstrap(
        (x,), np.mean, n_resamples=4000, method="percentile", rng=np.random.default_rng(2)
    ).confidence_interval
    assert low == pytest.approx(reference.low, abs=0.003) and high == pytest.approx(reference.high, abs=0.003)
    half = stats.norm.ppf(0.975) * x.std(ddof=1) / math.sqrt(x.size)
    assert (high - low) / 2 == pytest.approx(half, rel=0.08)
    assert low < x.mean() < high
    assert bootstrap_interval(np.append(x, np.nan), resamples=4000, seed=1) == (low, high)
    assert all(math.isnan(v) for v in bootstrap_interval([0.3]))


def test_noise_floor_spread_and_query_half_width():
    values = {"triplet": pd.Series([0.50, 0.54, 0.52], index=["1", "2", "3"])}
    intervals = pd.DataFrame(
        {"loss": ["triplet", "triplet"], "query_ci_low": [0.49, 0.50], "query_ci_high": [0.53, 0.56]}
    )
    floor = noise_floor(values, intervals)
    assert floor.loc["triplet", "sd"] == pytest.approx(np.std([0.50, 0.54, 0.52], ddof=1))
    assert (floor.loc["triplet", "min"], floor.loc["triplet", "max"]) == (0.50, 0.54)
    assert floor.loc["triplet", "query_half_width"] == pytest.approx(0.025)


# ---------- performance against tuning budget (Dodge et al. 2019) ----------


def test_expected_max_matches_enumerating_every_draw():
    values = np.array([0.42, 0.61, 0.55, 0.61, 0.30])
    mean, sd = expected_max(values, 3)
    for n in (1, 2, 3):
        maxima = np.array([max(draw) for draw in itertools.product(values, repeat=n)])
        assert mean[n - 1] == pytest.approx(maxima.mean()) and sd[n - 1] == pytest.approx(maxima.std())
    assert expected_max(values, 200)[0][-1] == pytest.approx(values.max())


def test_budget_curves_use_complete_and_pruned_trials_only():
    trials = pd.DataFrame(
        {
            "loss": ["a"] * 4 + ["b"] * 2,
            "number": [0, 1, 2, 3, 0, 1],
            "state": ["complete", "pruned", "failed", "complete", "complete", "complete"],
            "value": [0.5, 0.2, 0.99, 0.7, 0.4, np.nan],
        }
    )
    curves = budget_curves(trials)
    a = curves[curves["loss"] == "a"]
    assert a["n"].tolist() == [1, 2, 3] and a["expected"].iloc[0] == pytest.approx(np.mean([0.5, 0.2, 0.7]))
    assert curves[curves["loss"] == "b"]["expected"].tolist() == [0.4]


def test_crossings_are_interpolated_between_budgets():
    curves = pd.DataFrame(
        {
            "loss": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
            "n": [1, 2, 3] * 3,
            "expected": [1.0, 2.0, 3.0, 2.0, 2.5, 2.5, 3.0, 2.0, 3.0],
        }
    )
    crossed = crossings(curves)
    # a meets c, never crosses
    assert list(zip(crossed["loss"], crossed["other"])) == [("a", "b"), ("b", "c"), ("b", "c")]
    ab, bc_first, bc_second = (row for _, row in crossed.iterrows())
    assert ab["n"] == pytest.approx(2.5) and ab["expected"] == pytest.approx(2.5)
    assert (ab["leader_before"], ab["leader_after"]) == ("b", "a")
    # b - c: -1, 0.5, -0.5
    assert bc_first["n"] == pytest.approx(1 + 1 / 1.5) and bc_second["n"] == pytest.approx(2.5)
    assert (bc_first["leader_after"], bc_second["leader_after"]) == ("b", "c")
    assert "overtakes" in crossing_note(crossed)
    assert "No budget curves cross" in crossing_note(crossed.iloc[:0])


# ---------- per-class results ----------


def test_class_map_at_r_and_the_paired_test_over_classes_match_loops_and_scipy():
    rng = np.random.default_rng(6)
    rows = [
        (f"{loss}-{seed}", loss, str(seed), label, ap)
        for loss in ("a", "b")
        for seed in (1, 2)
        for label in (3, 7, 9, 11)
        for ap in rng.uniform(0.2 if loss == "a" else 0.0, 1.0, size=label % 4 + 2)
    ]
    scores = pd.DataFrame(rows, columns=["run_id", "loss", "seed", "label", "ap"])
    table = class_map_at_r(scores)
    for loss in ("a", "b"):
        for label in (3, 7, 9, 11):
            per_run = [
                np.mean([r[4] for r in rows if r[1] == loss and r[2] == seed and r[3] == label])
                for seed in ("1", "2")
            ]
            assert table.loc[label, loss] == pytest.approx(np.mean(per_run))
    got = class_comparison(table, "a", "b", top=2)
    d = table["a"] - table["b"]
    assert got["classes"] == 4 and got["better"] == int((d > 0).sum())
    assert got["p_t"] == pytest.approx(stats.ttest_rel(table["a"], table["b"]).pvalue)
    assert got["p_wilcoxon"] == pytest.approx(stats.wilcoxon(d).pvalue)
    biggest = d.abs().sort_values(ascending=False).index[:2].tolist()
    assert [c for c, _ in got["largest"]] == biggest
    assert [v for _, v in got["largest"]] == pytest.approx(d[biggest].tolist())
    pairs = pd.DataFrame({"loss": ["a", "a"], "other": ["b", "absent"]})
    assert class_comparisons(table, pairs)["other"].tolist() == ["b"]


def test_rerun_spread_pools_the_variance_within_each_repeated_seed():
    finals = pd.DataFrame(
        {
            "run_id": ["f1", "f2"],
            "loss": ["a", "a"],
            "role": "final",
            "status": "FINISHED",
            "metrics.test/map_at_r": [0.50, 0.60],
        }
    )
    reruns = pd.DataFrame(
        {
            "run_id": ["r1", "r2", "r3"],
            "loss": ["a", "a", "a"],
            "role": "rerun",
            "status": "FINISHED",
            "metrics.test/map_at_r": [0.52, 0.51, 0.64],
            "tags.tripletlab.rerun_of": ["f1", "f1", "f2"],
        }
    )
    sweep = Sweep("s", "0", "sqlite://", pd.concat([finals, reruns], ignore_index=True))
    spread = rerun_spread(sweep)
    pooled = math.sqrt(np.mean([np.var([0.50, 0.52, 0.51], ddof=1), np.var([0.60, 0.64], ddof=1)]))
    assert spread.loc["a", "reruns"] == 5 and spread.loc["a", "rerun_sd"] == pytest.approx(pooled)
    floor = noise_floor(
        {"a": pd.Series([0.5, 0.6]), "b": pd.Series([0.4, 0.45])},
        pd.DataFrame(columns=["loss", "query_ci_low", "query_ci_high"]),
        spread,
    )
    assert floor.loc["b", "reruns"] == 0 and math.isnan(floor.loc["b", "rerun_sd"])
