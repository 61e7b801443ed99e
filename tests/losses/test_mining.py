"""The one table of triplet difficulties (FaceNet's) and the mining strategies built on it."""

import pytest
import torch

from helpers.loss_batches import clustered_batch
from losses.distances import pairwise_distances
from losses.mining import TRIPLET_MINING, difficulty_counts, label_masks, mined_triplets, triplet_difficulty


def test_difficulties_follow_facenet_with_stated_ties():
    d_ap = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0])
    d_an = torch.tensor([0.5, 1.0, 1.1, 1.25, 1.5, 2.0])
    hard, semi_hard, easy = triplet_difficulty(d_ap, d_an, 0.25)
    assert hard.tolist() == [True, False, False, False, False, False]
    assert semi_hard.tolist() == [False, True, True, False, False, False]  # d_an == d_ap is semi-hard
    assert easy.tolist() == [False, False, False, True, True, True]  # d_an == d_ap + m is easy
    hard, semi_hard, easy = triplet_difficulty(d_ap, d_an, 0.0)  # no margin: no semi-hard triplet
    assert not semi_hard.any() and easy.tolist() == [False, True, True, True, True, True]


def brute_difficulty(d_ap, d_an, margin):
    return "hard" if d_an < d_ap else "semi-hard" if d_an < d_ap + margin else "easy"


@pytest.mark.parametrize("margin", [0.0, 0.2, 1.0])
def test_masks_partition_triplets_and_counts_agree(margin):
    x, labels = clustered_batch(4, 4, 6, torch.float64, seed=3, spread=0.9)
    d = pairwise_distances(x)
    positive, negative = label_masks(labels)
    d_ap, d_an = d.unsqueeze(2), d.unsqueeze(1)
    masks = triplet_difficulty(d_ap, d_an, margin)
    kinds_per_triplet = masks[0].int() + masks[1].int() + masks[2].int()
    assert torch.equal(kinds_per_triplet, torch.ones(16, 16, 16, dtype=torch.int))
    for a, p, n in [(0, 1, 2), (3, 7, 9), (5, 2, 11), (15, 4, 0)]:
        kind = brute_difficulty(d[a, p].item(), d[a, n].item(), margin)
        assert [m[a, p, n].item() for m in masks] == [kind == k for k in ("hard", "semi-hard", "easy")]
    valid = positive.unsqueeze(2) & negative.unsqueeze(1)
    for a in range(16):
        negatives = torch.sort(d[a][negative[a]]).values
        counts = difficulty_counts(d[a][positive[a]], negatives, margin)
        expected = [(m[a] & valid[a]).sum(1)[positive[a]] for m in masks]
        assert all(torch.equal(c, e) for c, e in zip(counts, expected))
    assert sum(int(m[valid].sum()) for m in masks[:2]) > 0


def test_mining_strategies_keep_their_difficulties():
    x, labels = clustered_batch(4, 4, 6, torch.float64, seed=4, spread=0.9)
    d = pairwise_distances(x)
    positive, negative = label_masks(labels)
    valid = positive.unsqueeze(2) & negative.unsqueeze(1)
    hard, semi_hard, easy = (m & valid for m in triplet_difficulty(d.unsqueeze(2), d.unsqueeze(1), 0.3))
    nothing = torch.zeros(16, 16, dtype=torch.bool)
    d_ap, d_an = d.unsqueeze(2), d.unsqueeze(1)
    mined = {m: mined_triplets(m, d_ap, d_an, 0.3, valid, nothing) for m in TRIPLET_MINING}
    assert torch.equal(mined["all"], valid) and torch.equal(mined["hard-triplets"], hard)
    assert torch.equal(mined["semi-hard-triplets"], semi_hard) and torch.equal(mined["easy-triplets"], easy)
    assert torch.equal(mined["curriculum"], semi_hard | easy)  # nothing admitted: no hard triplet
    everything = mined_triplets(
        "curriculum", d.unsqueeze(2), d.unsqueeze(1), 0.3, valid, torch.ones(16, 16, dtype=torch.bool)
    )
    assert torch.equal(everything, valid) and hard.any() and semi_hard.any() and easy.any()
    with pytest.raises(ValueError, match="unknown mining 'hard'"):
        mined_triplets("hard", d.unsqueeze(2), d.unsqueeze(1), 0.3, valid)
