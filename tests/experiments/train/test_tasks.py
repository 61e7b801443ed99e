"""The run's tasks: the paired objective is a MetricLoss the training loop calls on its fast path,
and it gives what the wrapped loss gives on the separated modalities."""

from __future__ import annotations

import pytest
import torch

from experiments.train.loop import _loss_call
from experiments.train.tasks import PairedObjective
from losses import MetricLoss, build_loss, loss_info


def paired_batch(pairs: int = 12, dim: int = 8, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    image = torch.randn(pairs, dim, generator=generator)
    text = image + 0.3 * torch.randn(pairs, dim, generator=generator)
    labels = torch.arange(pairs) % 4
    return image, text, labels


@pytest.mark.parametrize("name", ["cross_modal_triplet", "batch_hard"])
def test_paired_objective_equals_the_loss_on_the_separated_modalities(name):
    image, text, labels = paired_batch()
    loss = build_loss(name)
    objective = PairedObjective(build_loss(name))
    stacked, doubled = torch.cat([image, text]), torch.cat([labels, labels])
    if loss_info(name).cross_modal:
        expected = loss(image, labels, text, labels)
    else:
        expected = loss(stacked, doubled)
    assert torch.allclose(objective(stacked, doubled), expected)
    assert objective.last_stats.keys() == loss.last_stats.keys()


def test_paired_objective_takes_the_loops_fast_path():
    objective = PairedObjective(build_loss("cross_modal_triplet"))
    assert isinstance(objective, MetricLoss)
    fast = _loss_call(objective)
    assert fast is not objective  # compute directly, without the per-step input check's host sync
    image, text, labels = paired_batch()
    stacked, doubled = torch.cat([image, text]), torch.cat([labels, labels])
    assert torch.allclose(fast(stacked, doubled), objective(stacked, doubled))
