"""The registry: registration, helpful errors, wildcards, declarations, the CLI listing, pml: names."""

import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from helpers.loss_batches import pk_batch
from losses import HyperParam, MetricLoss, build_loss, list_losses, loss_info, register_loss, validate_params
from losses.params import FROM_INIT

BUILT_INS = (
    "triplet",
    "batch_hard",
    "batch_all",
    "semi_hard",
    "multi_similarity",
    "circle",
    "cross_modal_triplet",
    "info_nce",
    "triplet_center",
)


def make_loss(value):
    class Constant(MetricLoss):
        """Returns a constant."""

        paper = f"constant {value}"

        def compute(self, embeddings, labels, ref_embeddings, ref_labels):
            return embeddings.sum() * 0 + value

    return Constant


def test_register_duplicate_and_overwrite(restore_registry):
    register_loss("constant_loss")(make_loss(1.0))
    with pytest.raises(ValueError, match=r"'constant_loss' is already registered.*overwrite=True"):
        register_loss("constant_loss")(make_loss(2.0))
    assert float(build_loss("constant_loss")(torch.ones(2, 2), torch.tensor([0, 1]))) == 1.0
    register_loss("constant_loss", overwrite=True)(make_loss(2.0))
    assert float(build_loss("constant_loss")(torch.ones(2, 2), torch.tensor([0, 1]))) == 2.0
    with pytest.raises(TypeError, match="MetricLoss"):
        register_loss("not_a_loss")(dict)


def test_unknown_name_lists_close_matches_and_available_names():
    with pytest.raises(ValueError) as err:
        build_loss("batch_hrad")
    message = str(err.value)
    assert "Did you mean 'batch_hard'" in message
    assert all(name in message for name in BUILT_INS)


@pytest.mark.parametrize(
    "params, pattern",
    [
        (
            {"margn": 0.2},
            r"unknown parameter\(s\) margn for loss 'circle'.*valid: m \[-0.5, 1\], gamma \(0, 4096\]",
        ),
        ({"gamma": -1.0}, r"circle.gamma must be in \(0, 4096\], got -1.0"),
        ({"m": 2}, r"circle.m must be in \[-0.5, 1\], got 2.0"),
        ({"gamma": "big"}, r"circle.gamma must be a number in \(0, 4096\]"),
    ],
)
def test_bad_parameters_name_the_parameter_and_its_range(params, pattern):
    with pytest.raises(ValueError, match=pattern):
        build_loss("circle", **params)


def test_list_losses_wildcards():
    assert list_losses("batch_*") == ["batch_all", "batch_hard"]
    assert list_losses("*triplet*") == ["cross_modal_triplet", "triplet", "triplet_center"]
    assert list_losses("no_such_*") == []
    assert set(BUILT_INS) <= set(list_losses())


@pytest.mark.parametrize("name", BUILT_INS)
def test_every_built_in_declares_its_hyperparameters(name):
    info = loss_info(name)
    assert info.paper and info.summary and info.params
    assert info.cross_modal == (name in ("cross_modal_triplet", "info_nce"))
    for p in info.params:
        assert p.type in (bool, int, float, str) and p.doc
        assert p.validate(p.default, name) == p.default
        if p.type in (int, float) and p.choices is None and p.search is not None:
            low, high = p.search
            assert low < high and p.validate(low, name) == low and p.validate(high, name) == high
        elif p.search is not None:
            assert all(p.validate(v, name) == v for v in p.search)
    assert validate_params(name, {}) == info.defaults


def test_cli_lists_every_built_in(tmp_path):
    tripletlab = Path(sys.executable).with_name("tripletlab")
    result = subprocess.run(
        [str(tripletlab), "losses"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr
    listed = {line.split()[0] for line in result.stdout.splitlines()[2:] if line and not line[0].isspace()}
    assert set(BUILT_INS) <= listed
    assert "Wang et al., Multi-Similarity Loss" in result.stdout and "[16, 512] log" in result.stdout


def test_pml_contrastive_builds_runs_and_matches_pml():
    x, y = pk_batch(4, 3, 8, torch.float64, seed=1)
    ref, ref_y = pk_batch(4, 2, 8, torch.float64, seed=2)
    loss = build_loss("pml:ContrastiveLoss", pos_margin=0, neg_margin=1)
    oracle = pml_losses.ContrastiveLoss(pos_margin=0, neg_margin=1)
    assert torch.allclose(loss(x, y), oracle(x, y), atol=1e-12)
    assert torch.allclose(loss(x, y, ref, ref_y), oracle(x, y, ref_emb=ref, ref_labels=ref_y), atol=1e-12)
    assert {"mean_d_ap", "mean_d_an"} <= set(loss.last_stats)
    assert float(loss.last_stats["mean_d_an"]) > 0
    info = loss_info("pml:ContrastiveLoss")
    assert [(p.name, p.type, p.default, p.search) for p in info.params] == [
        ("pos_margin", float, 0, None),
        ("neg_margin", float, 1, None),
    ]


def test_pml_errors_and_required_arguments():
    with pytest.raises(ValueError, match=r"Did you mean 'pml:ContrastiveLoss'.*Available: AngularLoss"):
        build_loss("pml:contrastiveloss")
    with pytest.raises(ValueError, match=r"pml:ArcFaceLoss needs embedding_dim, num_classes"):
        build_loss("pml:ArcFaceLoss")
    arcface = build_loss("pml:ArcFaceLoss", num_classes=3, embedding_dim=8)
    assert sum(p.numel() for p in arcface.parameters()) == 3 * 8
    x, y = pk_batch(3, 2, 8, seed=0)
    assert torch.isfinite(arcface(x, y))
    with pytest.raises(ValueError, match=r"pml:TripletMarginLoss.margin must be a number"):
        build_loss("pml:TripletMarginLoss", margin="wide")


# ---------------------------------------------------------------- defaults declared once, conditions


def constructor_defaults(cls) -> dict:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.default is not inspect.Parameter.empty
    }


@pytest.mark.parametrize("name", BUILT_INS)
def test_built_in_defaults_are_the_constructor_defaults(name):
    info = loss_info(name)
    assert info.defaults == {p.name: constructor_defaults(info.cls)[p.name] for p in info.params}
    assert set(info.defaults) == set(constructor_defaults(info.cls))  # every argument is declared
    assert info.cls.hyperparams == info.params


def test_every_registered_loss_has_its_constructor_defaults():
    for name in list_losses():
        info = loss_info(name)
        init = constructor_defaults(info.cls)
        assert all(p.default == init[p.name] for p in info.params if p.name in init), name


@pytest.mark.parametrize(
    "class_name",
    [
        "TripletMarginLoss",
        "ContrastiveLoss",
        "MultiSimilarityLoss",
        "CircleLoss",
        "ArcFaceLoss",
        "NTXentLoss",
    ],
)
def test_pml_defaults_are_the_pml_constructor_defaults(class_name):
    info = loss_info(f"pml:{class_name}")
    init = {**constructor_defaults(getattr(pml_losses, class_name))}
    for cls in getattr(pml_losses, class_name).__mro__[1:]:  # arguments forwarded to a standalone base
        if cls.__name__ in dir(pml_losses) and "__init__" in vars(cls):
            init = {**constructor_defaults(cls), **init}
    assert info.params
    for p in info.params:
        pml_name = info.cls.pml_names.get(p.name, p.name)
        if pml_name in init:
            assert p.default == init[pml_name], p.name
        else:  # required in PML: 0 ("infer at run time") for counts, None otherwise
            assert p.default in (0, None) and p.name in info.cls.pml_required, p.name


def declaring(default, init_default=1.0, **extra):
    class Declared(MetricLoss):
        """A loss with one declared hyperparameter."""

        paper = "paper"
        hyperparams = (HyperParam("scale", float, default, "scale", **extra),)

        def __init__(self, scale=init_default, other=True):
            super().__init__()

    return Declared


def test_register_loss_fills_in_and_checks_defaults(restore_registry):
    register_loss("filled_in")(declaring(FROM_INIT))
    assert loss_info("filled_in").defaults == {"scale": 1.0}
    register_loss("stated_alike")(declaring(1.0))
    with pytest.raises(ValueError, match=r"'scale' declares default 2.0 but Declared.__init__ has 1.0"):
        register_loss("stated_otherwise")(declaring(2.0))
    with pytest.raises(ValueError, match=r"give 'scale' a default in Declared.__init__"):
        register_loss("no_default")(declaring(FROM_INIT, init_default=inspect.Parameter.empty))
    with pytest.raises(ValueError, match=r"conditioned on 'missing'"):
        register_loss("bad_condition")(declaring(FROM_INIT, when={"missing": True}))
    assert "stated_otherwise" not in list_losses() and "bad_condition" not in list_losses()

    class Undeclared(MetricLoss):
        """Declares a parameter its constructor does not take."""

        hyperparams = (HyperParam("width", float, 1.0),)

    with pytest.raises(ValueError, match=r"declares hyperparameter 'width' but Undeclared.__init__ does not"):
        register_loss("undeclared")(Undeclared)


def test_conditions_are_declared_and_listed():
    epsilon = loss_info("multi_similarity").param("epsilon")
    assert epsilon.when == (("miner", (True,)),)
    assert epsilon.applies({"miner": True}) and not epsilon.applies({"miner": False})
    assert epsilon.search_range() == "[0.01, 0.5] log when miner=True"
    normalize = loss_info("triplet").param("normalize")
    assert normalize.applies({"distance": "euclidean"}) and not normalize.applies({"distance": "cosine"})
    assert normalize.condition() == "distance in {euclidean, squared_euclidean}"
    assert all(
        loss_info("triplet").param(name).when == (("mining", ("curriculum",)),)
        for name in ("curriculum_start", "curriculum_end", "seed")
    )
    assert loss_info("triplet").param("seed").search_range() == "fixed (has an effect when mining=curriculum)"
    assert loss_info("circle").param("gamma").when == ()
