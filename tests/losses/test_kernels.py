"""Every fused kernel against its loss's readable formula (``fused = False``), the kernel's oracle:
values, gradients (embeddings and references) and statistics, in float64."""

import pytest
import torch

from helpers.loss_batches import clustered_batch, pk_batch
from losses import STAT_NAMES, build_loss, loss_info

CASES = [
    ("triplet", dict()),
    ("triplet", dict(mining="hard-triplets", distance="squared_euclidean")),
    ("triplet", dict(mining="semi-hard-triplets", margin=0.5, normalize=False)),
    ("triplet", dict(mining="easy-triplets", soft_margin=True)),
    ("triplet", dict(mining="easy-triplets", margin=0.05, reduction="mean")),
    ("triplet", dict(mining="curriculum", curriculum_start=0.3, curriculum_end=0.7, seed=4)),
    ("triplet", dict(distance="cosine", swap=True, reduction="mean")),
    ("triplet", dict(mining="semi-hard-triplets", soft_margin=True, swap=True)),
    ("batch_all", dict(reduction="mean")),
    ("semi_hard", dict()),
    ("semi_hard", dict(distance="euclidean", fallback="skip", reduction="mean_nonzero")),
    ("semi_hard", dict(distance="cosine", margin=0.5)),
    ("multi_similarity", dict()),
    ("multi_similarity", dict(miner=False, alpha=5.0, base=0.3)),
    ("multi_similarity", dict(epsilon=0.5)),
    ("circle", dict()),
    ("circle", dict(m=0.4, gamma=80.0)),
]
CROSS_MODAL_CASES = [
    ("cross_modal_triplet", dict()),
    ("cross_modal_triplet", dict(direction="a_to_b", distance="euclidean", normalize=False)),
    ("cross_modal_triplet", dict(direction="b_to_a", distance="squared_euclidean")),
    ("cross_modal_triplet", dict(negatives="sum")),
    ("cross_modal_triplet", dict(label_positives=True, margin=0.5)),
    ("cross_modal_triplet", dict(label_positives=True, negatives="sum", direction="b_to_a")),
    ("info_nce", dict()),
    ("info_nce", dict(label_positives=True, temperature=0.5)),
]


def run(name, params, fused, inputs, labels, ref_labels=None):
    """Value, gradients of every input, and statistics of one call of a fresh loss."""
    loss = build_loss(name, **params).double()
    loss.fused = fused
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    value = loss(leaves[0], labels, *leaves[1:], ref_labels) if len(leaves) > 1 else loss(leaves[0], labels)
    value.backward()
    return value.detach(), [t.grad for t in leaves], loss.last_stats


def assert_same(fused, readable):
    torch.testing.assert_close(fused[0], readable[0], atol=1e-10, rtol=1e-10)
    for a, b in zip(fused[1], readable[1]):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)
    assert set(fused[2]) == set(readable[2]) == set(STAT_NAMES)
    for key in STAT_NAMES:
        torch.testing.assert_close(fused[2][key].double(), readable[2][key].double(), atol=1e-10, rtol=1e-10)


def test_every_built_in_with_a_kernel_is_covered():
    covered = {name for name, _ in CASES + CROSS_MODAL_CASES}
    with_kernel = {
        name
        for name in (
            "triplet",
            "batch_all",
            "batch_hard",
            "semi_hard",
            "multi_similarity",
            "circle",
            "cross_modal_triplet",
            "info_nce",
            "triplet_center",
        )
        if getattr(loss_info(name).cls, "fused", False)
    }
    assert with_kernel == covered


@pytest.mark.parametrize("batch", ["pk", "clustered"])
@pytest.mark.parametrize("name,params", CASES)
def test_kernel_equals_the_formula(name, params, batch):
    x, labels = (
        pk_batch(4, 4, 6, torch.float64, seed=31)
        if batch == "pk"
        else clustered_batch(4, 4, 6, torch.float64, seed=32, spread=0.9)
    )
    fused = run(name, params, True, [x], labels)
    assert_same(fused, run(name, params, False, [x], labels))
    assert fused[0] > 0 or params.get("mining") == "easy-triplets"


@pytest.mark.parametrize("name,params", CASES)
def test_kernel_equals_the_formula_with_references(name, params):
    x, labels = pk_batch(4, 3, 6, torch.float64, seed=33)
    ref, ref_labels = pk_batch(5, 3, 6, torch.float64, seed=34)  # class 4 exists only among the references
    fused = run(name, params, True, [x, ref], labels, ref_labels)
    assert_same(fused, run(name, params, False, [x, ref], labels, ref_labels))
    assert fused[1][1].abs().sum() > 0 or params.get("mining") == "easy-triplets"


@pytest.mark.parametrize("name,params", CROSS_MODAL_CASES)
def test_cross_modal_kernel_equals_the_formula(name, params):
    a, labels = pk_batch(4, 3, 6, torch.float64, seed=35)
    b = a + 0.7 * pk_batch(4, 3, 6, torch.float64, seed=36)[0]
    fused = run(name, params, True, [a, b], labels, labels)
    assert_same(fused, run(name, params, False, [a, b], labels, labels))
    assert fused[0] > 0 and fused[1][0].abs().sum() > 0 and fused[1][1].abs().sum() > 0


def test_mining_changes_what_the_kernel_and_the_formula_compute():
    """The comparisons above are not vacuous: the strategies give different losses."""
    x, labels = clustered_batch(4, 4, 6, torch.float64, seed=32, spread=0.9)
    values = {
        mining: run("triplet", dict(mining=mining), fused, [x], labels)[0].item()
        for mining in ("all", "hard-triplets", "semi-hard-triplets")
        for fused in (False,)
    }
    assert len(set(values.values())) == 3
