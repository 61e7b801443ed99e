"""PK sampler: batch structure, determinism, epoch coverage and sampling with replacement."""

from __future__ import annotations

from collections import Counter, defaultdict

import pytest
import torch

from experiments.data.sampler import PKSampler


def balanced_labels(classes: int = 10, per_class: int = 8) -> torch.Tensor:
    labels = (torch.arange(classes) * 5 + 2).repeat_interleave(per_class)  # non-contiguous ids
    return labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(0))]


def test_every_batch_has_p_distinct_classes_with_k_images_each():
    labels = balanced_labels()
    sampler = PKSampler(labels, p=3, k=4, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 80 // 12
    for batch in batches:
        assert batch.dtype == torch.int64 and batch.shape == (12,)
        groups = labels[batch].view(3, 4)
        assert (groups == groups[:, :1]).all()  # class by class, K of each
        assert len(set(groups[:, 0].tolist())) == 3  # P distinct classes
        assert len(set(batch.tolist())) == 12  # no image twice when every class has >= K images


def test_deterministic_by_seed_and_reshuffled_every_epoch():
    labels = balanced_labels()
    a, b, c = (PKSampler(labels, 2, 4, seed=s) for s in (7, 7, 8))
    epoch0_a, epoch0_b, epoch0_c = (torch.stack(list(s)) for s in (a, b, c))
    assert torch.equal(epoch0_a, epoch0_b)
    assert not torch.equal(epoch0_a, epoch0_c)
    epoch1_a = torch.stack(list(a))
    assert not torch.equal(epoch0_a, epoch1_a)
    a.set_epoch(0)
    assert torch.equal(torch.stack(list(a)), epoch0_a)
    assert a.epoch == 1 and torch.equal(a.epoch_batches(1), epoch1_a)


def test_each_class_walks_through_its_images_before_repeating_any():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([5, 9, 12, 6, 7, 20])])
    sampler = PKSampler(labels, p=2, k=3, seed=1)
    for epoch in range(5):
        drawn = defaultdict(list)
        for batch in sampler.epoch_batches(epoch):
            for index in batch.tolist():
                drawn[int(labels[index])].append(index)
        for label, indices in drawn.items():
            count = int((labels == label).sum())
            first_pass = indices[:count]
            assert len(set(first_pass)) == len(first_pass), (epoch, label)


def test_small_classes_are_sampled_with_replacement_and_recorded():
    labels = torch.tensor([0] * 10 + [1] * 2 + [2] * 10 + [3] * 1)
    sampler = PKSampler(labels, p=2, k=4, seed=0)
    assert sampler.classes_with_replacement == [1, 3]
    seen = Counter()
    for epoch in range(30):
        for batch in sampler.epoch_batches(epoch):
            groups = labels[batch].view(2, 4)
            for group, indices in zip(groups, batch.view(2, 4)):
                seen[int(group[0])] += 1
                assert set(labels[indices].tolist()) == {int(group[0])}
                if int(group[0]) == 1:
                    assert set(indices.tolist()) <= {10, 11}
                if int(group[0]) == 3:
                    assert indices.tolist() == [22] * 4
    assert seen[1] > 0 and seen[3] > 0
    assert PKSampler(labels, p=2, k=2, seed=0).classes_with_replacement == [3]


def test_classes_are_chosen_uniformly():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate([4, 40, 4, 40])])
    sampler = PKSampler(labels, p=2, k=2, seed=3)
    seen = Counter()
    for epoch in range(200):
        seen.update(labels[sampler.epoch_batches(epoch)[:, ::2]].flatten().tolist())
    total = sum(seen.values())
    assert all(abs(seen[c] / total - 0.25) < 0.03 for c in range(4)), seen


def test_a_split_smaller_than_a_batch_still_gives_one_batch():
    sampler = PKSampler(torch.tensor([0, 0, 1, 1, 2, 2]), p=3, k=4, seed=0)
    assert len(sampler) == 1 and sampler.classes_with_replacement == [0, 1, 2]
    assert next(iter(sampler)).shape == (12,)


def test_auto_p_takes_32_classes_or_all_of_fewer():
    """p=0 (the default) is Hermans et al.'s P=32, or every class of a smaller training split."""
    assert PKSampler(torch.arange(400) % 40, p=0, k=4).p == 32
    small = PKSampler(torch.arange(100) % 10, p=0, k=4)
    assert small.p == 10 and all(len(torch.unique(b % 10)) == 10 for b in small)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"p": 11, "k": 4}, r"batch\.p=11 exceeds the 10 classes .* set batch\.p to at most 10"),
        ({"p": 1, "k": 4}, r"batch\.p must be an int >= 2"),
        ({"p": 2, "k": 1}, r"batch\.k must be an int >= 2"),
        ({"p": 2.5, "k": 4}, r"batch\.p must be an int"),
        ({"p": 2, "k": 4, "seed": -1}, r"seed must be an int >= 0"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PKSampler(balanced_labels(), **kwargs)
