"""Face-verification metrics against scikit-learn and brute-force loops."""

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score, roc_curve

from experiments.eval.verification import (
    best_threshold,
    cross_validated_accuracy,
    pair_scores,
    roc_auc,
    stratified_folds,
    tar_at_far,
    verification_metrics,
)


def faces(n_ids=12, per_id=6, dim=16, spread=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_ids).repeat_interleave(per_id)
    centres = torch.randn(n_ids, dim, generator=g, dtype=torch.float64)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g, dtype=torch.float64), labels


def loop_pairs(x, labels, distance):
    scores, genuine = [], []
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            if distance == "cosine":
                s = float(x[i] @ x[j] / (x[i].norm() * x[j].norm()))
            else:
                s = -float((x[i] - x[j]).norm())
            scores.append(s)
            genuine.append(bool(labels[i] == labels[j]))
    return np.array(scores), np.array(genuine)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_pair_scores_enumerate_every_pair_once(distance):
    x, y = faces(n_ids=5, per_id=4)
    scores, genuine = pair_scores(x, y, distance, chunk_size=3)
    expected_scores, expected_genuine = loop_pairs(x, y, distance)
    assert scores.shape == (20 * 19 // 2,)
    np.testing.assert_allclose(scores.numpy(), expected_scores, atol=1e-9)
    assert np.array_equal(genuine.numpy(), expected_genuine)


def brute_force_tar(scores, genuine, far):
    best = 0.0
    for t in np.concatenate([[-np.inf], np.unique(scores)]):
        false_accepts = (scores[~genuine] > t).sum()
        if false_accepts <= far * (~genuine).sum() + 1e-9:
            best = max(best, (scores[genuine] > t).mean())
    return best


def sklearn_tar(scores, genuine, far):
    fpr, tpr, _ = roc_curve(genuine, scores)
    return tpr[fpr <= far + 1e-12].max()


@pytest.mark.parametrize("seed", [0, 1])
def test_auc_and_tar_at_far_match_oracles(seed):
    x, y = faces(n_ids=20, per_id=6, spread=1.2, seed=seed)
    out = verification_metrics(x, y, distance="cosine", seed=seed)
    scores, genuine = loop_pairs(x, y, "cosine")
    assert out["roc_auc"] == pytest.approx(roc_auc_score(genuine, scores), abs=1e-12)
    for name, far in (("tar_at_far_1e-2", 1e-2), ("tar_at_far_1e-3", 1e-3)):
        expected = brute_force_tar(scores, genuine, far)
        assert out[name] == pytest.approx(expected, abs=1e-12)
        assert out[name] == pytest.approx(sklearn_tar(scores, genuine, far), abs=1e-12)
    assert 0.5 < out["roc_auc"] < 1.0 and out["tar_at_far_1e-3"] <= out["tar_at_far_1e-2"]


def test_auc_counts_ties_one_half():
    scores = torch.tensor([0.1, 0.5, 0.5, 0.5, 0.9, 0.2])
    genuine = torch.tensor([False, True, False, True, True, False])
    assert roc_auc(scores, genuine) == pytest.approx(
        roc_auc_score(genuine.numpy(), scores.numpy()), abs=1e-12
    )
    assert tar_at_far(scores, genuine, 0.0) == pytest.approx(1 / 3)


def brute_force_best_accuracy(scores, genuine, balanced):
    def accuracy(t):
        accept = scores >= t
        if balanced:
            return (accept[genuine].mean() + (~accept[~genuine]).mean()) / 2
        return (accept == genuine).mean()

    candidates = np.concatenate([[-np.inf, np.inf], scores])
    return max(accuracy(t) for t in candidates)


@pytest.mark.parametrize("balanced", [False, True])
def test_best_threshold_is_optimal(balanced):
    rng = np.random.default_rng(4)
    genuine = rng.random(300) < 0.2
    scores = np.round(rng.normal(genuine * 1.0, 1.0), 1)  # rounding makes ties
    t = best_threshold(torch.from_numpy(scores), torch.from_numpy(genuine), balanced)
    accept = scores >= t
    achieved = (
        (accept[genuine].mean() + (~accept[~genuine]).mean()) / 2 if balanced else (accept == genuine).mean()
    )
    assert achieved == pytest.approx(brute_force_best_accuracy(scores, genuine, balanced), abs=1e-12)


def test_cross_validated_accuracy_follows_lfw_protocol():
    x, y = faces(n_ids=10, per_id=5, spread=1.5, seed=3)
    scores, genuine = pair_scores(x, y, "cosine")
    fold_of = stratified_folds(genuine, 10, seed=2)
    per_fold_genuine = torch.bincount(fold_of[genuine], minlength=10)
    assert per_fold_genuine.max() - per_fold_genuine.min() <= 1  # stratified
    s, g, f = scores.numpy(), genuine.numpy(), fold_of.numpy()
    expected = []
    for fold in range(10):
        train, test = f != fold, f == fold
        best = max(
            np.concatenate([[-np.inf, np.inf], s[train]]), key=lambda t: ((s[train] >= t) == g[train]).mean()
        )
        expected.append(((s[test] >= best) == g[test]).mean())
    mean, std = cross_validated_accuracy(scores, genuine, 10, seed=2)
    # the chosen threshold may differ among equally good ones on the training folds
    assert mean == pytest.approx(np.mean(expected), abs=0.02)
    assert std == pytest.approx(np.std(expected), abs=0.02)
    assert mean > (~g).mean()  # better than always rejecting


def test_separable_identities_score_perfectly_and_reproducibly():
    x, y = faces(n_ids=8, per_id=5, spread=0.01, seed=1)
    out = verification_metrics(x, y, distance="euclidean", folds=5, seed=9)
    assert set(out) == {
        "roc_auc",
        "tar_at_far_1e-2",
        "tar_at_far_1e-3",
        "accuracy",
        "accuracy_std",
        "balanced_accuracy",
    }
    for name in ("roc_auc", "tar_at_far_1e-2", "tar_at_far_1e-3", "accuracy", "balanced_accuracy"):
        assert out[name] == 1.0, name
    assert out["accuracy_std"] == 0.0
    again = verification_metrics(x.float().numpy(), y.numpy(), distance="euclidean", folds=5, seed=9)
    assert again == out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(labels=list(range(6))), "genuine pairs"),
        (dict(labels=[0] * 6), "impostor"),
        (dict(folds=1), "folds must be"),
        (dict(folds=100), "cannot be split"),
        (dict(distance="hamming"), "unknown distance"),
    ],
)
def test_bad_input_raises_clear_value_error(kwargs, message):
    args = dict(embeddings=torch.randn(6, 4), labels=[0, 0, 1, 1, 2, 2])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        verification_metrics(**args)
    assert math.isfinite(verification_metrics(torch.randn(6, 4), [0, 0, 1, 1, 2, 2], folds=3)["roc_auc"])
