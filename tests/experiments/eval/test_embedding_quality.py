"""Embedding-quality statistics against brute-force loops and Wang & Isola's reference formulas."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments.eval.embedding_quality import alignment_uniformity, embedding_quality, triplet_statistics
from losses.distances import pairwise_distances


def sample(n=30, dim=5, n_classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    labels[:2] = 0  # at least one positive pair
    labels[2] = n_classes  # and a class of one
    centres = torch.randn(n_classes + 1, dim, generator=g, dtype=torch.float64)
    return centres[labels] + 0.7 * torch.randn(n, dim, generator=g, dtype=torch.float64), labels


def brute_force_triplets(x, labels, margin, distance):
    d = pairwise_distances(x, x, kind=distance).numpy()
    y = labels.numpy()
    counts = {"hard": 0, "semi_hard": 0, "easy": 0}
    intra, inter = [], []
    for a, p in itertools.permutations(range(len(y)), 2):
        if y[a] != y[p]:
            continue
        intra.append(d[a, p])
        for n in range(len(y)):
            if y[n] == y[a]:
                continue
            if d[a, n] < d[a, p]:
                counts["hard"] += 1
            elif d[a, n] < d[a, p] + margin:
                counts["semi_hard"] += 1
            else:
                counts["easy"] += 1
    for a, n in itertools.permutations(range(len(y)), 2):
        if y[a] != y[n]:
            inter.append(d[a, n])
    total = sum(counts.values())
    return {
        "intra_class_distance": np.mean(intra),
        "inter_class_distance": np.mean(inter),
        **{f"{k}_fraction": v / total for k, v in counts.items()},
    }


@pytest.mark.parametrize("distance", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("margin", [0.0, 0.3, 1.0])
def test_triplet_statistics_match_brute_force(distance, margin):
    x, y = sample(seed=int(margin * 10))
    ours = triplet_statistics(x, y, margin=margin, distance=distance, chunk_size=4)
    expected = brute_force_triplets(x, y, margin, distance)
    assert ours == pytest.approx(expected, abs=1e-10)
    assert ours["hard_fraction"] + ours["semi_hard_fraction"] + ours["easy_fraction"] == pytest.approx(1.0)
    if margin == 0.0:
        assert ours["semi_hard_fraction"] == 0.0


def test_alignment_and_uniformity_match_reference_formulas():
    x, y = sample(n=40, seed=3)
    z = F.normalize(x, dim=1)
    pos = [(i, j) for i, j in itertools.permutations(range(40), 2) if y[i] == y[j]]
    i, j = map(list, zip(*pos))
    expected_alignment = (z[i] - z[j]).norm(dim=1).pow(2).mean()
    expected_uniformity = torch.pdist(z, p=2).pow(2).mul(-2).exp().mean().log()
    alignment, uniformity = alignment_uniformity(x, y, chunk_size=7)
    assert alignment == pytest.approx(float(expected_alignment), abs=1e-10)
    assert uniformity == pytest.approx(float(expected_uniformity), abs=1e-10)


def test_collapsed_classes_are_perfectly_aligned_and_easy():
    labels = torch.arange(4).repeat_interleave(5)
    x = 10 * torch.eye(4)[labels]
    out = embedding_quality(x, labels)
    assert set(out) == {
        "alignment",
        "uniformity",
        "intra_class_distance",
        "inter_class_distance",
        "easy_fraction",
        "semi_hard_fraction",
        "hard_fraction",
    }
    assert out["alignment"] == 0.0 and out["intra_class_distance"] == 0.0
    assert out["easy_fraction"] == 1.0 and out["hard_fraction"] == 0.0
    assert out["inter_class_distance"] == pytest.approx(2.0)  # squared distance of orthogonal unit vectors
    # uniformity in closed form: 80 ordered same-class pairs at distance 0, the rest at sqrt(2)
    n, same = 20, 20 * 4
    expected = np.log((same + (n * (n - 1) - same) * np.exp(-2 * 2.0)) / (n * (n - 1)))
    assert out["uniformity"] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: triplet_statistics(torch.randn(4, 2), [0, 0, 0, 0]), "two classes"),
        (lambda: triplet_statistics(torch.randn(4, 2), [0, 1, 2, 3]), "two or more"),
        (lambda: triplet_statistics(torch.randn(4, 2), [0, 0, 1, 1], margin=-1.0), "margin"),
        (lambda: triplet_statistics(torch.randn(4, 2), [0, 0, 1, 1], distance="l1"), "unknown distance"),
        (lambda: alignment_uniformity(torch.randn(3, 2), [0, 1, 2]), "positive pair"),
        (lambda: alignment_uniformity(torch.randn(1, 2), [0]), "at least two"),
    ],
)
def test_bad_input_raises_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_float32_input_agrees_with_float64():
    x, y = sample(n=60, seed=6)
    exact = embedding_quality(x, y, chunk_size=9)
    single = embedding_quality(x.float().numpy(), y.numpy())
    assert single == pytest.approx(exact, abs=1e-5)


def test_run_quality_is_in_one_reference_geometry_whatever_the_loss_trains_with():
    """A loss's distance and margin must not change the units of its quality numbers: they are
    FaceNet's squared euclidean distance between unit vectors with margin 0.2 for every loss,
    checked against the brute-force count (a run with a cosine margin of 0.5 used to be scored in
    euclidean distance with margin 0.5)."""
    from experiments.config import load_config
    from experiments.data.registry import load_dataset
    from experiments.train.tasks import ImageTask

    x, y = sample(n=48, seed=7)
    x = 3 * x  # far from unit length: normalising matters
    expected = brute_force_triplets(torch.nn.functional.normalize(x, dim=1), y, 0.2, "squared_euclidean")
    for overrides in (
        ["loss.name=triplet", "loss.distance=cosine", "loss.margin=0.5"],
        ["loss.name=batch_hard", "loss.distance=euclidean", "loss.margin=1.0"],
        ["loss.name=multi_similarity"],
    ):
        cfg = load_config("digits", overrides)
        scored = ImageTask(cfg, load_dataset(cfg.dataset, cfg.seed)).score(x, y)
        assert {k: scored[k] for k in expected} == pytest.approx(expected, abs=1e-9), overrides
