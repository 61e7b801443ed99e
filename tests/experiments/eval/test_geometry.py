"""Embedding geometry per epoch (experiments.eval.geometry) against NumPy, SciPy and brute-force loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from experiments.eval.geometry import GEOMETRY_KEYS, embedding_geometry, spectral_decay


def test_spectral_decay_is_kl_of_uniform_to_the_normalised_singular_values():
    x = np.random.default_rng(0).normal(size=(50, 6)) * np.array([5.0, 3.0, 1.0, 1.0, 0.5, 0.1])
    s = np.linalg.svd(x, compute_uv=False)
    expected = stats.entropy(np.full(len(s), 1 / len(s)), s / s.sum())
    assert spectral_decay(torch.tensor(x)) == pytest.approx(expected, rel=1e-9)
    assert spectral_decay(torch.eye(4)) == pytest.approx(0.0, abs=1e-12)  # a flat spectrum
    assert spectral_decay(torch.tensor(x[:, :1] @ np.ones((1, 6)))) > 10  # rank one: steep decay
    assert math.isnan(spectral_decay(torch.zeros(3, 2)))


def test_geometry_matches_loops_over_pairs():
    rng = np.random.default_rng(1)
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    x = rng.normal(size=(8, 3)) + labels[:, None]
    got = embedding_geometry(torch.tensor(x), torch.tensor(labels))
    assert set(got) == set(GEOMETRY_KEYS)
    normed = x / np.linalg.norm(x, axis=1, keepdims=True)
    pairs = [(i, j) for i in range(8) for j in range(8) if i != j]
    same = [(i, j) for i, j in pairs if labels[i] == labels[j]]
    other = [(i, j) for i, j in pairs if labels[i] != labels[j]]
    assert got["alignment"] == pytest.approx(np.mean([math.dist(normed[i], normed[j]) ** 2 for i, j in same]))
    assert got["uniformity"] == pytest.approx(
        math.log(np.mean([math.exp(-2 * math.dist(normed[i], normed[j]) ** 2) for i, j in pairs]))
    )
    # class distances in the reference geometry: squared euclidean between unit vectors
    intra = np.mean([math.dist(normed[i], normed[j]) ** 2 for i, j in same])
    inter = np.mean([math.dist(normed[i], normed[j]) ** 2 for i, j in other])
    assert (got["intra_class_distance"], got["inter_class_distance"]) == pytest.approx((intra, inter))
    assert got["distance_ratio"] == pytest.approx(intra / inter)


def test_geometry_subsamples_and_needs_pairs():
    x, labels = torch.randn(300, 4), torch.arange(300) % 5
    few = embedding_geometry(x, labels, points=40, seed=2)
    assert few == embedding_geometry(x, labels, points=40, seed=2)
    assert few != embedding_geometry(x, labels, points=300)
    assert embedding_geometry(torch.randn(4, 2), torch.arange(4)) == {}  # no positive pair
