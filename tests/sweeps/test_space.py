"""Search spaces, sweep configs, the t-interval table and worker planning (no training here)."""

from __future__ import annotations

import math

import numpy as np
import optuna
import pytest
from scipy import stats

from experiments.config import apply, from_dict
from losses import list_losses, loss_info
from sweeps.config import CONFIG_DIR, apply_overrides, default_losses, load_sweep_config
from sweeps.context import SweepContext
from sweeps.space import build_space
from sweeps.statistics import t_interval
from sweeps.study import base_experiment, make_pruner, make_sampler
from sweeps.table import markdown_table
from sweeps.workers import plan_workers

BUILTIN_COMPARISON = (
    "batch_all",
    "batch_hard",
    "circle",
    "multi_similarity",
    "semi_hard",
    "triplet",
    "triplet_center",
)


def test_default_losses_are_the_single_modality_builtins():
    assert set(default_losses()) == set(BUILTIN_COMPARISON)
    assert all(not loss_info(n).cross_modal for n in default_losses())


@pytest.mark.parametrize("loss", BUILTIN_COMPARISON)
def test_space_mirrors_the_loss_declaration(loss):
    space = build_space(loss)
    dims = {d.key: d for d in space.dimensions}
    for param in loss_info(loss).params:
        key = f"loss.{param.name}"
        if param.search is None:
            assert key not in dims
        elif param.choices is not None or param.type in (bool, str):
            assert dims[key].kind == "categorical" and dims[key].choices == tuple(param.search)
        else:
            assert (dims[key].low, dims[key].high, dims[key].log) == (
                param.search[0],
                param.search[1],
                param.log,
            )
    assert space.fixed == {}


def test_overrides_narrow_fix_and_add_per_loss_settings():
    space = build_space(
        "triplet",
        search={
            "optimizer.lr": {"low": "1e-4", "high": "1e-2", "log": True},
            "batch.k": {"low": 4, "high": 8},
        },
        overrides={
            "margin": {"low": 0.1, "high": 0.3},
            "mining": ["hard-triplets", "semi-hard-triplets"],
            "distance": "cosine",
            "normalize": [True],
            "optimizer.weight_decay": 0.0,
        },
    )
    dims = {d.key: d for d in space.dimensions}
    assert (dims["loss.margin"].low, dims["loss.margin"].high) == (0.1, 0.3)
    assert dims["loss.mining"].choices == ("hard-triplets", "semi-hard-triplets")
    assert (dims["optimizer.lr"].low, dims["optimizer.lr"].high, dims["optimizer.lr"].log) == (
        1e-4,
        1e-2,
        True,
    )
    assert dims["batch.k"].kind == "int"
    assert space.fixed == {"loss.distance": "cosine", "loss.normalize": True, "optimizer.weight_decay": 0.0}


def test_sampled_values_lie_in_the_space_and_apply_to_the_experiment_config():
    space = build_space(
        "multi_similarity",
        search={"optimizer.lr": {"low": 1e-4, "high": 1e-2, "log": True}},
        overrides={"miner": False},
    )
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0), direction="maximize")
    base = from_dict({"epochs": 1, "optimizer": {"warmup_fraction": 0}})
    for _ in range(8):
        trial = study.ask()
        values = space.suggest(trial)
        cfg = apply(base, values)
        assert cfg.loss.name == "multi_similarity" and cfg.loss.params["miner"] is False
        assert 1e-4 <= cfg.optimizer.lr <= 1e-2
        assert 0.01 <= cfg.loss.params["alpha"] <= 20.0 and 1.0 <= cfg.loss.params["beta"] <= 100.0
        study.tell(trial, float(cfg.optimizer.lr))
    # epsilon only matters with the miner, which this sweep fixes off: it is not tuned at all
    assert set(study.best_params) == {"loss.alpha", "loss.beta", "loss.base", "optimizer.lr"}
    assert "loss.epsilon" not in {d.key for d in space.dimensions}


def sample(space, trials=30):
    """``(trial.params, suggested values)`` of ``trials`` trials of an in-memory Optuna study."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1), direction="maximize")
    out = []
    for _ in range(trials):
        trial = study.ask()
        values = space.suggest(trial)
        study.tell(trial, 0.0)
        out.append((study.trials[-1].params, values))
    return out


def test_conditioned_parameters_are_sampled_only_when_their_condition_holds():
    trials = sample(build_space("multi_similarity"))
    assert {params["loss.miner"] for params, _ in trials} == {True, False}
    for params, values in trials:
        assert ("loss.epsilon" in params) == params["loss.miner"]
        assert ("loss.epsilon" in values) == params["loss.miner"]  # absent: the loss keeps its default 0.1
        assert set(params) >= {"loss.alpha", "loss.beta", "loss.base"}
    trials = sample(build_space("triplet"))
    assert {params["loss.distance"] for params, _ in trials} == {"euclidean", "squared_euclidean", "cosine"}
    for params, _ in trials:
        assert ("loss.normalize" in params) == (params["loss.distance"] != "cosine")
    assert build_space("triplet").describe()["loss.normalize"] == (
        "{True, False} when loss.distance in {euclidean, squared_euclidean}"
    )


def test_curriculum_parameters_follow_the_mining_strategy():
    overrides = {
        "mining": ["all", "curriculum"],
        "curriculum_start": {"low": 0.0, "high": 0.5},
        "curriculum_end": {"low": 0.5, "high": 1.0},
    }
    trials = sample(build_space("triplet", overrides=overrides))
    assert {params["loss.mining"] for params, _ in trials} == {"all", "curriculum"}
    for params, _ in trials:
        curriculum = params["loss.mining"] == "curriculum"
        assert ("loss.curriculum_start" in params) == curriculum
        assert ("loss.curriculum_end" in params) == curriculum
    fixed_off = build_space(
        "triplet", overrides={"mining": "hard-triplets", "curriculum_start": {"low": 0, "high": 1}}
    )
    assert "loss.curriculum_start" not in {d.key for d in fixed_off.dimensions}
    fixed_on = build_space(
        "triplet", overrides={"mining": "curriculum", "curriculum_start": {"low": 0, "high": 1}}
    )
    start = next(d for d in fixed_on.dimensions if d.key == "loss.curriculum_start")
    assert start.when == () and all("loss.curriculum_start" in params for params, _ in sample(fixed_on, 5))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"margn": 0.2}, "unknown parameter(s) margn"),
        ({"margin": -1.0}, "triplet.margin must be in"),
        ({"margin": {"low": 0.5, "high": 0.1}}, "needs low < high"),
        ({"mining": {"low": 0, "high": 1}}, "is categorical"),
        ({"mining": ["hard-triplets", "sideways"]}, "triplet.mining must be one of"),
        ({"mining": ["hard"]}, "triplet.mining must be one of"),
        ({"margin": {"low": 0.1}}, "must be {low: ..., high: ..."),
    ],
)
def test_bad_loss_overrides_name_the_parameter(overrides, message):
    with pytest.raises(ValueError, match=None) as info:
        build_space("triplet", overrides=overrides)
    assert message in str(info.value)


def test_loss_parameters_are_not_shared_search_keys():
    with pytest.raises(ValueError, match="loss_overrides"):
        build_space("triplet", search={"loss.margin": {"low": 0.1, "high": 0.2}})
    with pytest.raises(ValueError, match="log-scaled, so low must be > 0"):
        build_space("triplet", search={"optimizer.lr": {"low": 0, "high": 0.1, "log": True}})


def test_sweep_config_file_and_overrides(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        "losses: [triplet, circle]\ntrials: 5\nsearch:\n"
        "  optimizer.lr: {low: 1e-4, high: 1e-2, log: true}\n"
        "experiment:\n  epochs: 3\n  batch: {p: 3, k: 8}\n"
    )
    cfg = load_sweep_config(
        str(path),
        [
            "trials=2",
            "seeds=4",
            "epochs=1",
            "batch.k=4",
            "loss_overrides.triplet.margin=0.3",
            "loss_overrides.circle.optimizer.lr=0.001",
            "pruner.name=hyperband",
        ],
    )
    assert cfg.name == "mine" and cfg.losses == ("triplet", "circle")
    assert (cfg.trials, cfg.seeds, cfg.final_seeds) == (2, 4, [1, 2, 3, 4])
    assert cfg.experiment == {"epochs": 1, "batch": {"p": 3, "k": 4}}
    assert cfg.loss_overrides == {"triplet": {"margin": 0.3}, "circle": {"optimizer.lr": 0.001}}
    assert cfg.pruner == {"name": "hyperband"}
    circle = build_space("circle", cfg.search, cfg.loss_overrides["circle"])
    assert circle.fixed == {"optimizer.lr": 0.001}
    assert "optimizer.lr" not in {d.key for d in circle.dimensions}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trails=3"], "'trails' is neither a sweep key nor an experiment key (did you mean 'trials'?)"),
        (["batch.q=3"], "unknown config key 'batch.q'"),
        (["losses=[triplet,nope]"], "unknown loss 'nope'"),
        (["trials=0"], "'trials' must be an integer >= 1"),
        (["pruner=sometimes"], "pruner must be one of"),
        (["name=a/b"], "sweep name 'a/b'"),
        (["loss_overrides.circle.m=0.2"], "does not compare"),
        (["experiment.loss.name=circle"], "must not set 'loss'"),
    ],
)
def test_bad_sweep_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError) as info:
        load_sweep_config("quick", overrides)
    assert message in str(info.value)


def test_override_syntax_errors():
    with pytest.raises(ValueError, match="is not key=value"):
        apply_overrides({}, ["trials"])
    with pytest.raises(FileNotFoundError, match="bundled sweep"):
        load_sweep_config("no-such-sweep", [])


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_bundled_sweep_configs_load_and_validate(path, tmp_path):
    cfg = load_sweep_config(str(path), [])
    ctx = SweepContext(cfg, str(tmp_path / "j.journal"), "sqlite:///unused.db", tmp_path)
    base = base_experiment(ctx)
    assert cfg.name == path.stem and base.dataset.val_fraction > 0
    for loss in cfg.losses:
        assert loss in list_losses()
        values = ctx.space(loss).suggest(optuna.create_study().ask())
        apply(base, values)  # every sampled configuration is a valid experiment config
    make_sampler(ctx), make_pruner(ctx)


@pytest.mark.parametrize(
    "pruner, cls",
    [
        ("median", optuna.pruners.MedianPruner),
        ("hyperband", optuna.pruners.HyperbandPruner),
        ("none", optuna.pruners.NopPruner),
    ],
)
def test_pruners(pruner, cls, tmp_path):
    ctx = SweepContext(load_sweep_config("quick", [f"pruner={pruner}"]), "", "", tmp_path)
    assert isinstance(make_pruner(ctx), cls)
    bad = SweepContext(load_sweep_config("quick", ["pruner={name: median, bogus: 1}"]), "", "", tmp_path)
    with pytest.raises(ValueError, match="pruner 'median'"):
        make_pruner(bad)


def test_t_interval_matches_scipy():
    values = [0.61, 0.64, 0.58, 0.66]
    mean, low, high = t_interval(values)
    ref_low, ref_high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
    assert mean == pytest.approx(np.mean(values))
    assert low == pytest.approx(ref_low) and high == pytest.approx(ref_high)
    assert t_interval([0.5])[0] == 0.5 and math.isnan(t_interval([0.5])[1])
    assert all(math.isnan(v) for v in t_interval([]))


def test_markdown_table_shows_mean_and_interval():
    row = {
        "loss": "triplet",
        "best_val_map_at_r": 0.5,
        "trials_complete": 3,
        "trials_pruned": 1,
        "trials_failed": 0,
        "seeds": 2,
        "compute_seconds": 12.0,
        "best_params": "loss.margin=0.2",
    }
    for metric in ("precision_at_1", "r_precision", "map_at_r"):
        row.update({f"{metric}_mean": 0.5, f"{metric}_ci_low": 0.4, f"{metric}_ci_high": 0.6})
    import pandas as pd

    text = markdown_table(pd.DataFrame([row]))
    assert "| `triplet` | 50.0 [40.0, 60.0] |" in text and "3/1/0" in text and "loss.margin=0.2" in text


def test_worker_plan_on_cpu():
    assert len(plan_workers(None, "cpu", 2)) == 1
    slots = plan_workers(3, "cpu", 2, cpus=8)
    assert [s.index for s in slots] == [0, 1, 2] and all(s.env["OMP_NUM_THREADS"] == "2" for s in slots)
    assert all("CUDA_VISIBLE_DEVICES" not in s.env for s in slots)
    with pytest.raises(ValueError, match="--workers must be >= 1"):
        plan_workers(0, "cpu", 2)
