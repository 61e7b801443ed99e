"""Cross-modal triplet and symmetric InfoNCE against brute-force loops, gradient checks and input errors."""

import math

import pytest
import torch

from losses import build_loss, loss_info


def cosine_distance(u, v):
    return 1 - (u @ v) / (u.norm() * v.norm())


def brute_cross_modal_triplet(a, labels_a, b, labels_b, margin, negatives, direction, label_positives):
    """VSE++ by loops: each direction is the mean over positive pairs of the hinge against the
    hardest negative, or summed over negatives; the directions are added."""
    n = len(a)

    def positive(i, j):
        return i == j or (label_positives and labels_a[i] == labels_b[j])

    views = []
    if direction in ("both", "a_to_b"):
        views.append((a, b, positive))
    if direction in ("both", "b_to_a"):
        views.append((b, a, lambda i, j: positive(j, i)))
    total = torch.zeros((), dtype=a.dtype)
    for anchors, candidates, is_pos in views:
        terms, pairs = [], 0
        for i in range(n):
            negs = [cosine_distance(anchors[i], candidates[j]) for j in range(n) if not is_pos(i, j)]
            for p in range(n):
                if not is_pos(i, p):
                    continue
                pairs += 1
                d_ap = cosine_distance(anchors[i], candidates[p])
                if negs and negatives == "hardest":
                    terms.append(torch.relu(margin + d_ap - min(negs)))
                for d_an in negs if negatives == "sum" else []:
                    terms.append(torch.relu(margin + d_ap - d_an))
        total = total + (sum(terms) if terms else 0) / max(pairs, 1)
    return total


def brute_info_nce(a, labels_a, b, labels_b, temperature, label_positives):
    n = len(a)
    total = torch.zeros((), dtype=a.dtype)
    for anchors, candidates, flip in ((a, b, False), (b, a, True)):
        for i in range(n):
            logits = [1 - cosine_distance(anchors[i], candidates[j]) for j in range(n)]
            log_norm = torch.logsumexp(torch.stack(logits) / temperature, 0)
            pos = [
                j
                for j in range(n)
                if j == i
                or (label_positives and (labels_a[j] == labels_b[i] if flip else labels_a[i] == labels_b[j]))
            ]
            total = total - sum(logits[j] / temperature - log_norm for j in pos) / len(pos) / (2 * n)
    return total


def paired_batch(n=9, d=6, classes=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (n,), generator=g)
    a = torch.randn(n, d, generator=g, dtype=dtype)
    b = a + 0.8 * torch.randn(n, d, generator=g, dtype=dtype)
    return a, labels, b, labels.clone()


def grads(fn, a, b):
    a, b = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    value = fn(a, b)
    return (value.detach(), *torch.autograd.grad(value, (a, b)))


@pytest.mark.parametrize("negatives", ["hardest", "sum"])
@pytest.mark.parametrize("direction", ["both", "a_to_b", "b_to_a"])
@pytest.mark.parametrize("label_positives", [False, True])
def test_cross_modal_triplet_matches_loops(negatives, direction, label_positives):
    a, la, b, lb = paired_batch(seed=1)
    loss = build_loss(
        "cross_modal_triplet",
        margin=0.3,
        negatives=negatives,
        direction=direction,
        label_positives=label_positives,
    )
    ours = grads(lambda u, v: loss(u, la, v, lb), a, b)
    oracle = grads(
        lambda u, v: brute_cross_modal_triplet(u, la, v, lb, 0.3, negatives, direction, label_positives), a, b
    )
    assert float(ours[0]) > 0
    for mine, theirs in zip(ours, oracle):
        assert torch.allclose(mine, theirs, atol=1e-10)
    assert 0 < float(loss.last_stats["active_fraction"]) <= 1


@pytest.mark.parametrize("label_positives", [False, True])
@pytest.mark.parametrize("temperature", [0.07, 0.5])
def test_info_nce_matches_loops(label_positives, temperature):
    a, la, b, lb = paired_batch(seed=2)
    loss = build_loss("info_nce", temperature=temperature, label_positives=label_positives)
    ours = grads(lambda u, v: loss(u, la, v, lb), a, b)
    oracle = grads(lambda u, v: brute_info_nce(u, la, v, lb, temperature, label_positives), a, b)
    for mine, theirs in zip(ours, oracle):
        assert torch.allclose(mine, theirs, atol=1e-10)


def test_info_nce_equals_clip_cross_entropy():
    a, la, b, lb = paired_batch(seed=3)
    logits = torch.nn.functional.normalize(a, dim=1) @ torch.nn.functional.normalize(b, dim=1).T / 0.07
    target = torch.arange(len(a))
    clip = (
        torch.nn.functional.cross_entropy(logits, target)
        + torch.nn.functional.cross_entropy(logits.T, target)
    ) / 2
    assert torch.allclose(build_loss("info_nce")(a, la, b, lb), clip, atol=1e-12)


@pytest.mark.parametrize(
    "params",
    [
        dict(name="cross_modal_triplet", negatives="hardest"),
        dict(name="cross_modal_triplet", negatives="sum", label_positives=True),
        dict(name="info_nce", label_positives=True),
    ],
)
def test_gradcheck(params):
    params = dict(params)
    a, la, b, lb = paired_batch(n=6, d=4, seed=4)
    loss = build_loss(params.pop("name"), **params)
    assert torch.autograd.gradcheck(lambda u, v: loss(u, la, v, lb), (a.requires_grad_(), b.requires_grad_()))


def test_sum_mode_scales_to_large_batches_without_a_triplet_cube():
    a, la, b, lb = paired_batch(n=1024, d=32, classes=64, seed=5, dtype=torch.float32)
    value = build_loss("cross_modal_triplet", negatives="sum", label_positives=True)(a, la, b, lb)
    assert torch.isfinite(value) and float(value) > 0


def test_declared_cross_modal_and_errors():
    assert loss_info("cross_modal_triplet").cross_modal and loss_info("info_nce").cross_modal
    a, la, b, lb = paired_batch()
    with pytest.raises(ValueError, match="cross-modal"):
        build_loss("info_nce")(a, la)
    with pytest.raises(ValueError, match="equal length"):
        build_loss("cross_modal_triplet")(a, la, b[:-1], lb[:-1])
    with pytest.raises(ValueError, match="negatives must be one of"):
        build_loss("cross_modal_triplet", negatives="semi")


def test_single_pair_gives_zero_triplet_loss_and_finite_gradients():
    a, la, b, lb = paired_batch(n=1)
    value, grad_a, grad_b = grads(lambda u, v: build_loss("cross_modal_triplet")(u, la, v, lb), a, b)
    assert float(value) == 0 and torch.isfinite(grad_a).all() and torch.isfinite(grad_b).all()
    assert math.isfinite(float(build_loss("info_nce")(a, la, b, lb)))


@pytest.mark.parametrize("negatives", ["hardest", "sum"])
@pytest.mark.parametrize("label_positives", [False, True])
def test_triplet_stats_match_loops(negatives, label_positives):
    a, la, b, lb = paired_batch(seed=6)
    loss = build_loss(
        "cross_modal_triplet",
        margin=0.3,
        negatives=negatives,
        direction="a_to_b",
        label_positives=label_positives,
    )
    loss(a, la, b, lb)
    n = len(a)
    d = [[float(cosine_distance(a[i], b[j])) for j in range(n)] for i in range(n)]

    def positive(i, j):
        return i == j or (label_positives and la[i] == lb[j])

    active = terms = ordered = violated = 0
    for i in range(n):
        pos = [d[i][j] for j in range(n) if positive(i, j)]
        neg = [d[i][j] for j in range(n) if not positive(i, j)]
        ordered += max(pos) < min(neg)
        violated += min(neg) < max(pos) + 0.3
        if negatives == "hardest":
            active += sum(0.3 + p - min(neg) > 0 for p in pos)
            terms += len(pos)
        else:
            active += sum(0.3 + p - q > 0 for p in pos for q in neg)
            terms += len(pos) * len(neg)
    stats = loss.last_stats
    assert float(stats["active_fraction"]) == pytest.approx(active / terms)
    assert float(stats["correct_order_fraction"]) == pytest.approx(ordered / n)
    assert float(stats["margin_violation_fraction"]) == pytest.approx(violated / n)
    all_pos = [d[i][j] for i in range(n) for j in range(n) if positive(i, j)]
    all_neg = [d[i][j] for i in range(n) for j in range(n) if not positive(i, j)]
    assert float(stats["mean_d_ap"]) == pytest.approx(sum(all_pos) / len(all_pos))
    assert float(stats["mean_d_an"]) == pytest.approx(sum(all_neg) / len(all_neg))


@pytest.mark.parametrize("label_positives", [False, True])
def test_info_nce_stats_match_loops(label_positives):
    a, la, b, lb = paired_batch(seed=7)
    temperature = 0.2
    loss = build_loss("info_nce", temperature=temperature, label_positives=label_positives)
    loss(a, la, b, lb)
    n = len(a)
    s = [[1 - float(cosine_distance(a[i], b[j])) for j in range(n)] for i in range(n)]

    def positive(i, j):
        return i == j or (label_positives and la[i] == lb[j])

    active = ordered = violated = 0
    rows = [[(i, j) for j in range(n)] for i in range(n)]
    columns = [[(i, j) for i in range(n)] for j in range(n)]
    for pairs in (rows, columns):
        for anchor_pairs in pairs:  # rows (A->B anchors), then columns (B->A anchors)
            weakest_pos = min(s[i][j] for i, j in anchor_pairs if positive(i, j))
            neg = [s[i][j] for i, j in anchor_pairs if not positive(i, j)]
            ordered += weakest_pos > max(neg)
            violated += max(neg) > weakest_pos - temperature
            active += sum(v > weakest_pos - temperature for v in neg)
    all_pos = [s[i][j] for i in range(n) for j in range(n) if positive(i, j)]
    all_neg = [s[i][j] for i in range(n) for j in range(n) if not positive(i, j)]
    stats = loss.last_stats
    assert float(stats["active_fraction"]) == pytest.approx(active / (2 * len(all_neg)))
    assert float(stats["correct_order_fraction"]) == pytest.approx(ordered / (2 * n))
    assert float(stats["margin_violation_fraction"]) == pytest.approx(violated / (2 * n))
    assert float(stats["mean_d_ap"]) == pytest.approx(1 - sum(all_pos) / len(all_pos))
    assert float(stats["mean_d_an"]) == pytest.approx(1 - sum(all_neg) / len(all_neg))
