"""The registry: registration, helpful errors, wildcards, declarations, the CLI listing, pml: names."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from helpers.loss_batches import pk_batch
from losses import MetricLoss, build_loss, list_losses, loss_info, register_loss, validate_params

BUILT_INS = ("triplet", "batch_hard", "batch_all", "semi_hard", "multi_similarity", "circle",
             "cross_modal_triplet", "info_nce", "triplet_center")


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


@pytest.mark.parametrize("params, pattern", [
    ({"margn": 0.2}, r"unknown parameter\(s\) margn for loss 'circle'.*valid: m \[-0.5, 1\], gamma \(0, 4096\]"),
    ({"gamma": -1.0}, r"circle.gamma must be in \(0, 4096\], got -1.0"),
    ({"m": 2}, r"circle.m must be in \[-0.5, 1\], got 2.0"),
    ({"gamma": "big"}, r"circle.gamma must be a number in \(0, 4096\]"),
])
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
    result = subprocess.run([str(tripletlab), "losses"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
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
        ("pos_margin", float, 0, None), ("neg_margin", float, 1, None)]


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
