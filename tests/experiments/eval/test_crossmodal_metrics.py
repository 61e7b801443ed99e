"""Cross-modal Recall@K and median rank against a brute-force loop."""

import numpy as np
import torch

from experiments.eval.crossmodal import paired_ranks


def brute_force_ranks(q, items):
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    items = items / np.linalg.norm(items, axis=1, keepdims=True)
    ranks = []
    for i in range(len(q)):
        d = [1 - float(q[i] @ items[j]) for j in range(len(items))]
        ranks.append(sum(1 for j in range(len(items)) if d[j] <= d[i]))
    return np.array(ranks)


def test_paired_ranks_match_brute_force():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(37, 6, generator=g, dtype=torch.float64)
    b = a + 0.8 * torch.randn(37, 6, generator=g, dtype=torch.float64)
    ranks = paired_ranks(a, b, "cosine", chunk_size=10)
    np.testing.assert_array_equal(ranks.numpy(), brute_force_ranks(a.numpy(), b.numpy()))
    assert ranks.min() >= 1 and ranks.max() <= 37


def test_perfect_pairs_rank_first():
    a = torch.eye(5, dtype=torch.float64)
    assert paired_ranks(a, a.clone(), "cosine").tolist() == [1] * 5
