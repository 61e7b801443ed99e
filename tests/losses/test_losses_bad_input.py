"""Malformed input to every registered loss raises ValueError naming the problem."""

import pytest
import torch

from helpers.loss_batches import pk_batch
from losses import build_loss, list_losses, loss_info

DIM = 4


def make_loss(name):
    declared = {p.name for p in loss_info(name).params}
    sizes = {"num_classes": 3, "embedding_dim": DIM}
    return build_loss(name, **{k: v for k, v in sizes.items() if k in declared})


def call(name, loss, x, labels, ref=None, ref_labels=None):
    if loss_info(name).cross_modal and ref is None:
        ref, ref_labels = x.flip(0), labels
    return loss(x, labels) if ref is None else loss(x, labels, ref, ref_labels)


def good_batch():
    return pk_batch(3, 2, DIM, seed=0)


BAD_INPUTS = {
    "rank3": (lambda x, y: (x.unsqueeze(0), y), "2-D"),
    "rank1": (lambda x, y: (x[0], y), "2-D"),
    "labels_2d": (lambda x, y: (x, y.unsqueeze(1)), "1-D"),
    "label_count": (lambda x, y: (x, y[:-1]), "rows but labels has"),
    "float_labels": (lambda x, y: (x, y.float()), "integer"),
    "bool_labels": (lambda x, y: (x, y > 0), "integer"),
    "integer_embeddings": (lambda x, y: (x.long(), y), "floating point"),
    "nan": (lambda x, y: (x.index_fill(0, torch.tensor([1]), float("nan")), y), "NaN"),
    "inf": (lambda x, y: (x * torch.tensor(float("inf")), y), "NaN or inf"),
}


@pytest.mark.parametrize("problem", sorted(BAD_INPUTS))
@pytest.mark.parametrize("name", list_losses())
def test_bad_embeddings_or_labels(name, problem):
    make, message = BAD_INPUTS[problem]
    x, labels = make(*good_batch())
    with pytest.raises(ValueError, match=message):
        call(name, make_loss(name), x, labels)


@pytest.mark.parametrize("name", list_losses())
def test_reference_embeddings_of_another_dimension(name):
    x, labels = good_batch()
    ref = torch.randn(len(labels), DIM + 1)
    with pytest.raises(ValueError, match="dimension"):
        call(name, make_loss(name), x, labels, ref, labels)
    with pytest.raises(ValueError, match="together"):
        make_loss(name)(x, labels, ref_embeddings=x)


@pytest.mark.parametrize("name", [n for n in list_losses() if loss_info(n).cross_modal])
def test_cross_modal_needs_reference_embeddings(name):
    x, labels = good_batch()
    with pytest.raises(ValueError, match="cross-modal"):
        make_loss(name)(x, labels)


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("triplet", {"margin": -0.1}, "triplet.margin must be in"),
        ("triplet", {"mining": "hardest"}, "triplet.mining must be one of"),
        ("triplet", {"distance": "manhattan"}, "triplet.distance must be one of"),
        ("triplet", {"curriculum_end": 1.5}, "curriculum_end"),
        ("batch_hard", {"reduction": "sum"}, "batch_hard.reduction must be one of"),
        ("batch_hard", {"mining": "all"}, "unknown parameter"),
        ("semi_hard", {"fallback": "hardest"}, "semi_hard.fallback must be one of"),
        ("triplet_center", {"num_classes": -1}, "num_classes must be in"),
    ],
)
def test_bad_hyperparameters(name, params, message):
    with pytest.raises(ValueError, match=message):
        build_loss(name, **params)


def test_triplet_center_needs_sizes_and_class_ids():
    x, labels = good_batch()
    with pytest.raises(ValueError, match="num_classes and embedding_dim"):
        build_loss("triplet_center")(x, labels)
    with pytest.raises(ValueError, match=r"class ids in \[0, 2\)"):
        build_loss("triplet_center", num_classes=2, embedding_dim=DIM)(x, labels)
    with pytest.raises(ValueError, match="embedding_dim"):
        build_loss("triplet_center", num_classes=3, embedding_dim=DIM + 1)(x, labels)
    with pytest.raises(ValueError, match="no reference embeddings"):
        build_loss("triplet_center", num_classes=3, embedding_dim=DIM)(x, labels, x, labels)
