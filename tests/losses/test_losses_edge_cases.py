"""Edge batches for every registered loss: finite values and gradients, and 0 where nothing is valid."""

import pytest
import torch

from helpers.loss_batches import pk_batch
from losses import STAT_NAMES, build_loss, list_losses, loss_info

DIM = 6
NUM_CLASSES = 8
# Losses whose every term needs a positive and a negative sample of the batch.
SAMPLE_TRIPLET_LOSSES = {"triplet", "batch_hard", "batch_all", "semi_hard"}


def make_loss(name):
    """The loss with default hyperparameters, plus the sizes a trainer would fill in."""
    declared = {p.name for p in loss_info(name).params}
    sizes = {"num_classes": NUM_CLASSES, "embedding_dim": DIM}
    torch.manual_seed(0)
    return build_loss(name, **{k: v for k, v in sizes.items() if k in declared})


def edge_batch(case):
    """(embeddings, labels, expect_zero_for) for one edge case."""
    if case == "single_class":
        x, _ = pk_batch(1, 6, DIM, seed=1)
        return x, torch.zeros(6, dtype=torch.int64), SAMPLE_TRIPLET_LOSSES
    if case == "all_distinct":
        x, _ = pk_batch(6, 1, DIM, seed=2)
        return x, torch.arange(6), SAMPLE_TRIPLET_LOSSES
    if case == "one_sample":
        x, _ = pk_batch(1, 1, DIM, seed=3)
        return x, torch.tensor([2]), set(list_losses()) - {"triplet_center"}
    x, labels = pk_batch(3, 2, DIM, seed=4)
    if case == "identical":
        return x[:1].repeat(6, 1), labels, set()
    if case == "large_norm":
        return x * 1e5, labels, set()
    if case == "small_norm":
        return x * 1e-5, labels, set()
    if case in ("float16", "bfloat16"):
        return x.to(getattr(torch, case)), labels, set()
    raise AssertionError(case)


CASES = [
    "single_class",
    "all_distinct",
    "one_sample",
    "identical",
    "large_norm",
    "small_norm",
    "float16",
    "bfloat16",
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", list_losses())
def test_edge_batch(name, case):
    x, labels, expect_zero_for = edge_batch(case)
    loss = make_loss(name)
    inputs = [x.clone().requires_grad_()]
    if loss_info(name).cross_modal:
        inputs.append(
            (x.flip(0) + 0.5 * x.roll(1, 1)).to(x.dtype).requires_grad_()
            if case != "identical"
            else x.clone().requires_grad_()
        )
        value = loss(inputs[0], labels, inputs[1], labels)
    else:
        value = loss(inputs[0], labels)
    assert value.dim() == 0 and torch.isfinite(value), value
    grads = torch.autograd.grad(value, inputs, allow_unused=True)
    for tensor, grad in zip(inputs, grads):
        if grad is not None:
            assert grad.dtype == tensor.dtype and grad.shape == tensor.shape
            assert torch.isfinite(grad).all()
    if name in expect_zero_for:
        assert value.item() == 0
        assert all(g is None or torch.all(g == 0) for g in grads)
    assert set(loss.last_stats) == set(STAT_NAMES)
    assert all(torch.isfinite(v) and not v.requires_grad for v in loss.last_stats.values())


@pytest.mark.parametrize("name", sorted(SAMPLE_TRIPLET_LOSSES))
def test_identical_embeddings_give_the_margin(name):
    x, labels, _ = edge_batch("identical")
    loss = make_loss(name)
    value = loss(x.requires_grad_(), labels)
    torch.testing.assert_close(value, torch.tensor(0.2, dtype=value.dtype))
    # every triplet ties (d_an == d_ap): semi-hard by FaceNet's convention, so not hard yet inside the margin
    stats = loss.last_stats
    assert stats["correct_order_fraction"] == 1 and stats["margin_violation_fraction"] == 1
    assert loss.last_stats["mean_d_ap"] < 1e-3  # the matmul expansion resolves ~sqrt(float32 eps) * norm
