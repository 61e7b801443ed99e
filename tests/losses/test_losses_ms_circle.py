"""Multi-Similarity and Circle against pytorch-metric-learning (value and gradient), plus gradient
checks and the pair statistics against brute-force loops."""

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners

from helpers.loss_batches import clustered_batch, pk_batch
from losses import build_loss

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
BATCHES = {
    "pk": lambda dtype, seed: pk_batch(8, 4, 16, dtype, seed),
    "clustered": lambda dtype, seed: clustered_batch(8, 4, 16, dtype, seed, spread=1.0),
    "one_class": lambda dtype, seed: (pk_batch(1, 6, 8, dtype, seed)[0], torch.zeros(6, dtype=torch.long)),
    "all_distinct": lambda dtype, seed: pk_batch(6, 1, 8, dtype, seed),
    "one_sample": lambda dtype, seed: pk_batch(1, 1, 8, dtype, seed),
}


def pml_multi_similarity(miner):
    loss = pml_losses.MultiSimilarityLoss(alpha=2, beta=50, base=0.5)
    if not miner:
        return loss
    mine = pml_miners.MultiSimilarityMiner(epsilon=0.1)
    return lambda x, y, ref=None, ref_y=None: loss(x, y, mine(x, y, ref, ref_y), ref, ref_y)


CASES = {
    "ms": (lambda: build_loss("multi_similarity", miner=False), lambda: pml_multi_similarity(False)),
    "ms_miner": (lambda: build_loss("multi_similarity", miner=True), lambda: pml_multi_similarity(True)),
    "circle": (lambda: build_loss("circle"), lambda: pml_losses.CircleLoss(m=0.25, gamma=256)),
}


def value_and_grad(loss_fn, x, y, *ref):
    x = x.clone().requires_grad_(True)
    ref = tuple(r.clone().requires_grad_(True) if r.is_floating_point() else r for r in ref)
    value = loss_fn(x, y, *ref)
    grads = torch.autograd.grad(value, [x, *[r for r in ref if r.is_floating_point()]], allow_unused=True)
    return value.detach(), [torch.zeros_like(x) if g is None else g for g in grads]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_pml(case, batch, dtype):
    ours_factory, pml_factory = CASES[case]
    x, y = BATCHES[batch](dtype, seed=3)
    ours, ref_value = value_and_grad(ours_factory(), x, y), value_and_grad(pml_factory(), x, y)
    tol = TOLERANCE[dtype]
    scale = max(1.0, float(ref_value[0].abs()))  # circle's gamma=256 puts values in the hundreds
    assert torch.allclose(ours[0], ref_value[0].to(dtype), atol=tol * scale, rtol=0)
    assert torch.allclose(ours[1][0], ref_value[1][0], atol=tol * scale, rtol=0)
    assert torch.isfinite(ours[1][0]).all()


@pytest.mark.parametrize("case", list(CASES))
def test_matches_pml_with_reference_set(case):
    ours_factory, pml_factory = CASES[case]
    x, y = pk_batch(4, 3, 8, torch.float64, seed=5)
    ref, ref_y = clustered_batch(5, 2, 8, torch.float64, seed=6, spread=1.5)
    ours = value_and_grad(ours_factory(), x, y, ref, ref_y)
    pml_fn = pml_factory()
    theirs = value_and_grad(
        lambda a, b, r, ry: (
            pml_fn(a, b, ref=r, ref_y=ry) if case == "ms_miner" else pml_fn(a, b, ref_emb=r, ref_labels=ry)
        ),
        x,
        y,
        ref,
        ref_y,
    )
    assert torch.allclose(ours[0], theirs[0], atol=1e-9)
    for mine, other in zip(ours[1], theirs[1]):
        assert torch.allclose(mine, other, atol=1e-9)


def test_miner_drops_pairs_and_changes_the_loss():
    x, y = clustered_batch(8, 4, 16, torch.float64, seed=3, spread=1.0)
    mined, full = build_loss("multi_similarity", miner=True), build_loss("multi_similarity", miner=False)
    assert float(mined(x, y)) < float(full(x, y))
    assert 0 < float(mined.last_stats["active_fraction"]) < 1
    assert float(full.last_stats["active_fraction"]) == 1.0


@pytest.mark.parametrize("miner", [False, True])
def test_multi_similarity_gradcheck(miner):
    x, y = clustered_batch(3, 3, 5, torch.float64, seed=2, spread=1.0)
    loss = build_loss("multi_similarity", miner=miner)
    assert torch.autograd.gradcheck(lambda e: loss(e, y), (x.requires_grad_(),))


def brute_circle(x, y, weights_from, m=0.25, gamma=256.0):
    """Circle loss by loops over anchors and pairs, with the pair weights taken from ``weights_from``
    (the paper's stop-gradient weights are constants for the gradient)."""
    unit, frozen = torch.nn.functional.normalize(x, dim=1), torch.nn.functional.normalize(weights_from, dim=1)
    terms = []
    for a in range(len(y)):
        pos, neg = [], []
        for j in range(len(y)):
            if j == a:
                continue
            s, w = unit[a] @ unit[j], frozen[a] @ frozen[j]
            if y[j] == y[a]:
                pos.append(-gamma * torch.relu(1 + m - w) * (s - (1 - m)))
            else:
                neg.append(gamma * torch.relu(w + m) * (s - m))
        if pos and neg:
            terms.append(
                torch.nn.functional.softplus(
                    torch.logsumexp(torch.stack(pos), 0) + torch.logsumexp(torch.stack(neg), 0)
                )
            )
    nonzero = [t for t in terms if t > 0]
    return sum(nonzero) / max(len(nonzero), 1)


def test_circle_gradient_matches_finite_differences_with_frozen_weights():
    x, y = clustered_batch(3, 3, 4, torch.float64, seed=4, spread=2.0)
    loss = build_loss("circle", gamma=32.0)
    x0 = x.clone().requires_grad_(True)
    value = loss(x0, y)
    (grad,) = torch.autograd.grad(value, x0)
    assert torch.allclose(value, brute_circle(x, y, x, gamma=32.0), atol=1e-10)
    numeric = torch.zeros_like(x)
    h = 1e-6
    for index in range(x.numel()):
        step = torch.zeros(x.numel(), dtype=x.dtype)
        step[index] = h
        step = step.view_as(x)
        numeric.view(-1)[index] = (
            brute_circle(x + step, y, x, gamma=32.0) - brute_circle(x - step, y, x, gamma=32.0)
        ) / (2 * h)
    assert torch.allclose(grad, numeric, atol=1e-6)


def _active_and_violating(name, pos, neg):
    """Brute-force counts of active (weighted) and violating pairs of one anchor."""
    if name == "circle":
        m = 0.25
        return (
            sum(1 + m - s > 0 for s in pos) + sum(s + m > 0 for s in neg),
            sum(s < 1 - m for s in pos) + sum(s > m for s in neg),
        )
    base, eps = 0.5, 0.1  # Multi-Similarity with its miner
    kept_pos = [s for s in pos if neg and s - eps < max(neg)]
    kept_neg = [s for s in neg if pos and s + eps > min(pos)]
    return len(kept_pos) + len(kept_neg), sum(s < base for s in pos) + sum(s > base for s in neg)


@pytest.mark.parametrize("seed", [8, 9, 10])
@pytest.mark.parametrize("name", ["multi_similarity", "circle"])
def test_pair_stats_match_loops(name, seed):
    x, y = clustered_batch(8, 4, 6, torch.float64, seed=seed, spread=1.2)
    loss = build_loss(name)
    loss(x, y)
    unit = torch.nn.functional.normalize(x, dim=1)
    d_ap, d_an, ordered, counted, active, violating = [], [], 0, 0, 0, 0
    for a in range(len(y)):
        pos = [float(unit[a] @ unit[j]) for j in range(len(y)) if j != a and y[j] == y[a]]
        neg = [float(unit[a] @ unit[j]) for j in range(len(y)) if y[j] != y[a]]
        d_ap += [1 - s for s in pos]
        d_an += [1 - s for s in neg]
        counted += 1
        ordered += min(pos) > max(neg)
        a_count, v_count = _active_and_violating(name, pos, neg)
        active, violating = active + a_count, violating + v_count
    stats = loss.last_stats
    n_pairs = len(d_ap) + len(d_an)
    assert float(stats["mean_d_ap"]) == pytest.approx(sum(d_ap) / len(d_ap), abs=1e-6)
    assert float(stats["mean_d_an"]) == pytest.approx(sum(d_an) / len(d_an), abs=1e-6)
    assert float(stats["correct_order_fraction"]) == pytest.approx(ordered / counted)
    assert float(stats["active_fraction"]) == pytest.approx(active / n_pairs)
    assert float(stats["margin_violation_fraction"]) == pytest.approx(violating / n_pairs)
    assert 0 < active < n_pairs and 0 < violating < n_pairs  # the batch exercises both sides


@pytest.mark.parametrize("name", ["multi_similarity", "circle"])
def test_pair_stats_with_a_reference_set_match_loops(name):
    x, y = clustered_batch(3, 4, 5, torch.float64, seed=9, spread=1.0)
    ref, ref_y = clustered_batch(3, 3, 5, torch.float64, seed=10, spread=1.0)
    ref_y = ref_y + 1  # classes 1..3: class 0 of the batch has no positive in the reference set
    loss = build_loss(name)
    loss(x, y, ref, ref_y)
    sims = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(ref, dim=1).T
    same = y[:, None] == ref_y[None, :]
    stats = loss.last_stats
    assert float(stats["mean_d_ap"]) == pytest.approx(float(1 - sims[same].mean()), abs=1e-6)
    assert float(stats["mean_d_an"]) == pytest.approx(float(1 - sims[~same].mean()), abs=1e-6)


def test_circle_defaults_follow_the_face_recognition_setting():
    loss = build_loss("circle")
    assert (loss.m, loss.gamma) == (0.25, 256.0)
    with pytest.raises(ValueError, match="gamma"):
        build_loss("circle", gamma=0)
