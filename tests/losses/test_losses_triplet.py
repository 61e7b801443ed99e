"""The triplet family against independent oracles: pytorch-metric-learning, brute-force loops, gradcheck."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances as pml_distances
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

from helpers.loss_batches import clustered_batch, pk_batch
from losses import STAT_NAMES, build_loss, loss_info
from losses.triplet import TripletLoss, triplet_margin

TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-9}
MY_LOSSES = ("triplet", "batch_hard", "batch_all", "semi_hard", "triplet_center")
PML_MINING = {"hard-triplets": "hard", "semi-hard-triplets": "semihard", "easy-triplets": "easy"}


def make_batch(kind, dtype, seed=0):
    if kind == "pk":
        return pk_batch(5, 4, 8, dtype, seed)
    return clustered_batch(5, 4, 8, dtype, seed, spread=0.9)


def small_batch(seed):
    """A batch small enough for the brute-force loops: 4 classes of 3."""
    return clustered_batch(4, 3, 6, torch.float64, seed, spread=0.9)


def value_and_grad(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    value = fn(*leaves)
    value.backward()
    return value.detach(), [t.grad for t in leaves]


def assert_agree(ours, theirs, dtype):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(ours[0], theirs[0], atol=tol, rtol=tol)
    for a, b in zip(ours[1], theirs[1]):
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def pml_distance(kind, normalize):
    return pml_distances.LpDistance(
        normalize_embeddings=normalize, power=2 if kind == "squared_euclidean" else 1
    )


# ---------------------------------------------------------------- brute-force oracle


def brute_distance(u, v, kind):
    if kind == "cosine":
        return 1 - (u * v).sum()
    d2 = ((u - v) ** 2).sum()
    return d2 if kind == "squared_euclidean" else torch.sqrt(d2)


def prepared(x, kind, normalize):
    return F.normalize(x, dim=1) if normalize or kind == "cosine" else x


def brute_triplets(x, labels, ref=None, ref_labels=None, kind="euclidean", normalize=False):
    """Every valid (a, p, n) with its distances, by explicit loops."""
    xs = prepared(x, kind, normalize)
    ys = xs if ref is None else prepared(ref, kind, normalize)
    ref_labels = labels if ref_labels is None else ref_labels
    for a in range(len(labels)):
        for p in range(len(ref_labels)):
            if ref_labels[p] != labels[a] or (ref is None and p == a):
                continue
            for n in range(len(ref_labels)):
                if ref_labels[n] != labels[a]:
                    yield (
                        a,
                        p,
                        n,
                        brute_distance(xs[a], ys[p], kind),
                        brute_distance(xs[a], ys[n], kind),
                        (lambda p=p, n=n: brute_distance(ys[p], ys[n], kind)),
                    )


def reduce(terms, reduction, anchor=None):
    if not terms:
        return anchor.sum() * 0
    terms = torch.stack(terms)
    count = (terms > 0).sum() if reduction == "mean_nonzero" else terms.numel()
    return terms.sum() / max(int(count), 1)


def brute_triplet_loss(
    x,
    labels,
    ref=None,
    ref_labels=None,
    *,
    margin,
    kind,
    normalize,
    keep=lambda t, a, n: True,
    soft=False,
    reduction="mean_nonzero",
    swap=False,
):
    terms = []
    for a, p, n, d_ap, d_an, d_pn in brute_triplets(x, labels, ref, ref_labels, kind, normalize):
        if not keep((d_an - d_ap).item(), a, n):
            continue
        if swap:
            d_an = torch.minimum(d_an, d_pn())
        v = d_ap - d_an + margin
        terms.append(F.softplus(v) if soft else F.relu(v))
    return reduce(terms, reduction, x)


def margin_rule(mining, margin):
    """FaceNet's difficulties with t = d_an - d_ap (PML's miner differs from them only on ties)."""
    return {
        "all": lambda t, a, n: True,
        "hard-triplets": lambda t, a, n: t < 0,
        "semi-hard-triplets": lambda t, a, n: 0 <= t < margin,
        "easy-triplets": lambda t, a, n: t >= margin,
    }[mining]


# ---------------------------------------------------------------- triplet vs PML


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", ["pk", "clustered"])
@pytest.mark.parametrize(
    "kind,normalize",
    [("euclidean", True), ("euclidean", False), ("squared_euclidean", True), ("squared_euclidean", False)],
)
@pytest.mark.parametrize("mining", ["all", "hard-triplets", "semi-hard-triplets", "easy-triplets"])
def test_triplet_mining_matches_pml(mining, kind, normalize, batch, dtype):
    x, labels = make_batch(batch, dtype)
    margin = 0.3
    soft = mining == "easy-triplets"  # easy triplets have zero hinge terms; the soft margin makes them count
    ours = TripletLoss(margin=margin, distance=kind, normalize=normalize, mining=mining, soft_margin=soft)
    distance = pml_distance(kind, normalize)
    theirs = pml_losses.TripletMarginLoss(margin=margin, distance=distance, smooth_loss=soft)
    miner = pml_miners.TripletMarginMiner(
        margin=margin, type_of_triplets=PML_MINING.get(mining, "all"), distance=distance
    )
    expected = value_and_grad(lambda e: theirs(e, labels, miner(e, labels)), x)
    assert_agree(value_and_grad(lambda e: ours(e, labels), x), expected, dtype)
    assert expected[0] > 0
    if mining == "all":  # PML's "all" miner drops non-violators, which the non-zero mean ignores anyway
        assert_agree(value_and_grad(lambda e: theirs(e, labels), x), expected, dtype)


def test_easy_mining_with_hinge_is_zero():
    x, labels = clustered_batch(4, 3, 8, torch.float64, 1, spread=0.3)
    loss = TripletLoss(mining="easy-triplets")
    value, (grad,) = value_and_grad(lambda e: loss(e, labels), x)
    assert value == 0 and torch.all(grad == 0)
    assert loss.last_stats["active_fraction"] == 0 and loss.last_stats["correct_order_fraction"] == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mining", ["all", "hard-triplets", "semi-hard-triplets"])
def test_mean_reduction_matches_pml_mean_reducer(mining, dtype):
    x, labels = make_batch("clustered", dtype, seed=3)
    distance = pml_distance("euclidean", True)
    theirs = pml_losses.TripletMarginLoss(margin=0.2, distance=distance, reducer=pml_reducers.MeanReducer())
    if mining == "all":
        expected = value_and_grad(lambda e: theirs(e, labels), x)
    else:
        miner = pml_miners.TripletMarginMiner(
            margin=0.2, type_of_triplets=PML_MINING[mining], distance=distance
        )
        expected = value_and_grad(lambda e: theirs(e, labels, miner(e, labels)), x)
    ours = TripletLoss(margin=0.2, mining=mining, reduction="mean")
    assert_agree(value_and_grad(lambda e: ours(e, labels), x), expected, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("soft,swap", [(True, False), (False, True), (True, True)])
def test_soft_margin_and_swap_match_pml(soft, swap, dtype):
    x, labels = make_batch("pk", dtype, seed=4)
    distance = pml_distance("euclidean", False)
    theirs = pml_losses.TripletMarginLoss(margin=0.5, distance=distance, smooth_loss=soft, swap=swap)
    ours = TripletLoss(margin=0.5, normalize=False, soft_margin=soft, swap=swap)
    assert_agree(
        value_and_grad(lambda e: ours(e, labels), x), value_and_grad(lambda e: theirs(e, labels), x), dtype
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["euclidean", "squared_euclidean"])
@pytest.mark.parametrize(
    "loss_name,mining", [("triplet", "all"), ("triplet", "hard-triplets"), ("batch_hard", None)]
)
def test_reference_embeddings_match_pml(loss_name, mining, kind, dtype):
    x, labels = pk_batch(4, 3, 6, dtype, seed=5)
    ref, ref_labels = pk_batch(5, 3, 6, dtype, seed=6)  # class 4 exists only among the references
    distance = pml_distance(kind, True)
    theirs = pml_losses.TripletMarginLoss(margin=0.2, distance=distance)
    if loss_name == "triplet":
        ours = TripletLoss(margin=0.2, distance=kind, mining=mining)
        miner = pml_miners.TripletMarginMiner(
            margin=0.2, type_of_triplets=PML_MINING.get(mining, mining), distance=distance
        )
    else:
        ours = build_loss("batch_hard", margin=0.2, distance=kind, normalize=True, reduction="mean_nonzero")
        miner = pml_miners.BatchHardMiner(distance=distance)

    def pml_call(e, r):
        return theirs(e, labels, miner(e, labels, r, ref_labels), ref_emb=r, ref_labels=ref_labels)

    expected = value_and_grad(pml_call, x, ref)
    assert_agree(value_and_grad(lambda e, r: ours(e, labels, r, ref_labels), x, ref), expected, dtype)
    assert expected[0] > 0 and expected[1][1].abs().sum() > 0


# ---------------------------------------------------------------- batch-hard / batch-all


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", ["pk", "clustered"])
@pytest.mark.parametrize(
    "kind,normalize",
    [("euclidean", True), ("euclidean", False), ("squared_euclidean", True), ("squared_euclidean", False)],
)
def test_batch_hard_matches_pml(kind, normalize, batch, dtype):
    x, labels = make_batch(batch, dtype, seed=7)
    distance = pml_distance(kind, normalize)
    theirs = pml_losses.TripletMarginLoss(margin=0.2, distance=distance)
    miner = pml_miners.BatchHardMiner(distance=distance)
    ours = build_loss("batch_hard", margin=0.2, distance=kind, normalize=normalize, reduction="mean_nonzero")
    expected = value_and_grad(lambda e: theirs(e, labels, miner(e, labels)), x)
    assert_agree(value_and_grad(lambda e: ours(e, labels), x), expected, dtype)


def brute_batch_hard(x, labels, margin, kind, normalize, soft, reduction):
    xs = prepared(x, kind, normalize)
    terms = []
    for a in range(len(labels)):
        pos = [
            brute_distance(xs[a], xs[p], kind)
            for p in range(len(labels))
            if p != a and labels[p] == labels[a]
        ]
        neg = [brute_distance(xs[a], xs[n], kind) for n in range(len(labels)) if labels[n] != labels[a]]
        if pos and neg:
            v = max(pos, key=torch.Tensor.item) - min(neg, key=torch.Tensor.item) + margin
            terms.append(F.softplus(v) if soft else F.relu(v))
    return reduce(terms, reduction, x)


@pytest.mark.parametrize("kind", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("soft,reduction", [(False, "mean"), (True, "mean"), (False, "mean_nonzero")])
def test_batch_hard_brute_force(kind, soft, reduction):
    x, labels = small_batch(8)
    ours = build_loss(
        "batch_hard", margin=0.1, distance=kind, normalize=True, soft_margin=soft, reduction=reduction
    )
    expected = value_and_grad(lambda e: brute_batch_hard(e, labels, 0.1, kind, True, soft, reduction), x)
    assert_agree(value_and_grad(lambda e: ours(e, labels), x), expected, torch.float64)


@pytest.mark.parametrize("kind", ["euclidean", "cosine"])
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
def test_batch_all_brute_force(kind, reduction):
    x, labels = small_batch(9)
    ours = build_loss("batch_all", margin=0.4, distance=kind, reduction=reduction)
    expected = value_and_grad(
        lambda e: brute_triplet_loss(e, labels, margin=0.4, kind=kind, normalize=False, reduction=reduction),
        x,
    )
    assert_agree(value_and_grad(lambda e: ours(e, labels), x), expected, torch.float64)


# ---------------------------------------------------------------- cosine, reduction "mean", swap with
# references


@pytest.mark.parametrize("mining", ["all", "hard-triplets", "semi-hard-triplets"])
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
@pytest.mark.parametrize("swap", [False, True])
def test_cosine_and_mean_reduction_brute_force(mining, reduction, swap):
    x, labels = small_batch(10)
    ours = TripletLoss(margin=0.1, distance="cosine", mining=mining, reduction=reduction, swap=swap)
    expected = value_and_grad(
        lambda e: brute_triplet_loss(
            e,
            labels,
            margin=0.1,
            kind="cosine",
            normalize=True,
            keep=margin_rule(mining, 0.1),
            reduction=reduction,
            swap=swap,
        ),
        x,
    )
    assert_agree(value_and_grad(lambda e: ours(e, labels), x), expected, torch.float64)
    assert expected[0] > 0


@pytest.mark.parametrize("kind", ["euclidean", "squared_euclidean", "cosine"])
def test_swap_with_reference_embeddings_brute_force(kind):
    x, labels = pk_batch(3, 3, 5, torch.float64, seed=11)
    ref, ref_labels = pk_batch(3, 4, 5, torch.float64, seed=12)
    ours = TripletLoss(margin=1.0, distance=kind, normalize=False, swap=True, reduction="mean")

    def brute(e, r):
        return brute_triplet_loss(
            e, labels, r, ref_labels, margin=1.0, kind=kind, normalize=False, reduction="mean", swap=True
        )

    expected = value_and_grad(brute, x, ref)
    assert_agree(value_and_grad(lambda e, r: ours(e, labels, r, ref_labels), x, ref), expected, torch.float64)


# ---------------------------------------------------------------- curriculum


def brute_curriculum(x, labels, admitted, margin):
    return brute_triplet_loss(
        x,
        labels,
        margin=margin,
        kind="euclidean",
        normalize=True,
        keep=lambda t, a, n: t >= 0 or bool(admitted[a, n]),
    )


@pytest.mark.parametrize("progress", [0.0, 0.5, 1.0])
def test_curriculum_brute_force(progress):
    x, labels = small_batch(13)
    loss = TripletLoss(margin=0.2, mining="curriculum", curriculum_start=0.1, curriculum_end=0.9, seed=5)
    loss.set_progress(progress)
    generator = torch.Generator().manual_seed(5)
    for _ in range(2):  # the draws advance from call to call
        hard_fraction = 0.1 + 0.8 * progress
        admitted = torch.rand(len(labels), len(labels), generator=generator) < hard_fraction
        expected = value_and_grad(lambda e: brute_curriculum(e, labels, admitted, 0.2), x)
        assert_agree(value_and_grad(lambda e: loss(e, labels), x), expected, torch.float64)


def test_curriculum_moves_from_easy_to_hard_and_is_seeded():
    x, labels = make_batch("clustered", torch.float64, seed=14)

    def mean_violation(progress, seed):
        loss = TripletLoss(margin=0.2, mining="curriculum", seed=seed, reduction="mean")
        loss.set_progress(progress)
        return loss(x, labels)

    assert mean_violation(0.0, 1) < mean_violation(0.5, 1) < mean_violation(1.0, 1)
    torch.testing.assert_close(
        mean_violation(1.0, 1), build_loss("triplet", margin=0.2, reduction="mean")(x, labels)
    )
    assert mean_violation(0.5, 1) == mean_violation(0.5, 1)
    assert mean_violation(0.5, 1) != mean_violation(0.5, 2)


# ---------------------------------------------------------------- FaceNet semi-hard


def brute_semi_hard(x, labels, margin, kind, fallback, reduction):
    xs = prepared(x, kind, True)
    terms, fallbacks = [], 0
    for a in range(len(labels)):
        neg = [
            (brute_distance(xs[a], xs[n], kind).item(), n)
            for n in range(len(labels))
            if labels[n] != labels[a]
        ]
        for p in range(len(labels)):
            if p == a or labels[p] != labels[a] or not neg:
                continue
            d_ap = brute_distance(xs[a], xs[p], kind)
            farther = [(d, n) for d, n in neg if d >= d_ap.item()]  # not hard
            if farther:
                n = min(farther)[1]
            elif fallback == "easiest":
                n, fallbacks = max(neg)[1], fallbacks + 1
            else:
                continue
            terms.append(F.relu(d_ap - brute_distance(xs[a], xs[n], kind) + margin))
    return reduce(terms, reduction, x), fallbacks


@pytest.mark.parametrize("kind", ["squared_euclidean", "euclidean", "cosine"])
@pytest.mark.parametrize(
    "fallback,reduction", [("easiest", "mean"), ("skip", "mean"), ("easiest", "mean_nonzero")]
)
def test_semi_hard_brute_force(kind, fallback, reduction):
    x, labels = pk_batch(4, 4, 6, torch.float64, seed=2)
    ours = build_loss("semi_hard", margin=0.3, distance=kind, fallback=fallback, reduction=reduction)
    _, fallbacks = brute_semi_hard(x, labels, 0.3, kind, "easiest", reduction)
    assert fallbacks > 0  # the batch exercises the fallback
    expected = value_and_grad(lambda e: brute_semi_hard(e, labels, 0.3, kind, fallback, reduction)[0], x)
    assert_agree(value_and_grad(lambda e: ours(e, labels), x), expected, torch.float64)


# ---------------------------------------------------------------- triplet-center


def brute_triplet_center(x, centres, labels, margin, kind, normalize, reduction):
    xs, cs = prepared(x, kind, normalize), prepared(centres, kind, normalize)
    terms = []
    for i, y in enumerate(labels.tolist()):
        others = [brute_distance(xs[i], cs[j], kind) for j in range(len(cs)) if j != y]
        terms.append(F.relu(brute_distance(xs[i], cs[y], kind) - min(others, key=torch.Tensor.item) + margin))
    return reduce(terms, reduction, x)


@pytest.mark.parametrize(
    "kind,normalize", [("squared_euclidean", False), ("euclidean", True), ("cosine", False)]
)
@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero"])
def test_triplet_center_brute_force(kind, normalize, reduction):
    x, labels = pk_batch(4, 3, 5, torch.float64, seed=16)
    loss = build_loss(
        "triplet_center",
        margin=0.5,
        distance=kind,
        normalize=normalize,
        reduction=reduction,
        num_classes=6,
        embedding_dim=5,
    ).double()
    centres = loss.centres.detach().clone()
    expected = value_and_grad(
        lambda e, c: brute_triplet_center(e, c, labels, 0.5, kind, normalize, reduction), x, centres
    )
    ours = value_and_grad(
        lambda e, c: torch.func.functional_call(loss, {"centres": c}, (e, labels)), x, centres
    )
    assert_agree(ours, expected, torch.float64)
    assert expected[0] > 0 and expected[1][1].abs().sum() > 0
    assert [name for name, _ in loss.named_parameters()] == ["centres"]


def test_triplet_center_centres_learn():
    torch.manual_seed(0)
    x, labels = clustered_batch(3, 4, 4, torch.float32, seed=17, spread=0.2)
    loss = build_loss("triplet_center", margin=0.5, num_classes=3, embedding_dim=4)
    first = loss(x, labels).item()
    for _ in range(20):
        (grad,) = torch.autograd.grad(loss(x, labels), list(loss.parameters()))
        with torch.no_grad():
            loss.centres -= 0.5 * grad
    assert loss(x, labels).item() < 0.5 * first


# ---------------------------------------------------------------- gradcheck, statistics, functional form

GRADCHECK_CASES = [
    ("triplet", dict(mining="all")),
    ("triplet", dict(mining="hard-triplets", distance="squared_euclidean")),
    ("triplet", dict(mining="semi-hard-triplets", margin=0.5, normalize=False)),
    ("triplet", dict(mining="easy-triplets", soft_margin=True)),
    ("triplet", dict(mining="curriculum", curriculum_start=0.5, curriculum_end=0.5, seed=3)),
    ("triplet", dict(distance="cosine", swap=True, reduction="mean")),
    ("batch_hard", dict()),
    ("batch_hard", dict(soft_margin=True, distance="cosine")),
    ("batch_all", dict(distance="squared_euclidean", reduction="mean")),
    ("semi_hard", dict()),
    ("semi_hard", dict(distance="euclidean", fallback="skip")),
    ("triplet_center", dict(num_classes=3, embedding_dim=3)),
]


@pytest.mark.parametrize("name,params", GRADCHECK_CASES)
def test_gradcheck(name, params):
    x, labels = pk_batch(2, 3, 3, torch.float64, seed=18)
    ref, ref_labels = pk_batch(2, 2, 3, torch.float64, seed=19)
    torch.manual_seed(0)
    centres = build_loss(name, **params).double().state_dict().get("centres")

    def fn(e, *extra):  # a fresh loss per call: the curriculum's draws restart from its seed
        loss = build_loss(name, **params).double()
        if centres is not None:
            return torch.func.functional_call(loss, {"centres": extra[0]}, (e, labels))
        return loss(e, labels, *extra, ref_labels) if extra else loss(e, labels)

    inputs = (x.requires_grad_(), centres.requires_grad_()) if centres is not None else (x.requires_grad_(),)
    assert fn(*inputs) > 0
    assert torch.autograd.gradcheck(fn, inputs)
    if name != "triplet_center":
        assert torch.autograd.gradcheck(fn, (x, ref.requires_grad_()))


def test_stats_over_the_considered_triplets():
    x, labels = small_batch(20)
    loss = TripletLoss(margin=0.3, mining="hard-triplets", normalize=False)
    loss(x, labels)
    stats = loss.last_stats
    assert set(stats) == set(STAT_NAMES)
    assert all(v.dim() == 0 and not v.requires_grad for v in stats.values())
    hard = [(float(d_ap), float(d_an)) for *_, d_ap, d_an, _ in brute_triplets(x, labels) if d_an < d_ap]
    assert math.isclose(stats["mean_d_ap"], sum(p for p, _ in hard) / len(hard), rel_tol=1e-6)
    assert math.isclose(stats["mean_d_an"], sum(n for _, n in hard) / len(hard), rel_tol=1e-6)
    assert stats["active_fraction"] == 1 and stats["margin_violation_fraction"] == 1
    assert stats["correct_order_fraction"] == 0
    loss = TripletLoss(margin=0.3, normalize=False)
    loss(x, labels)
    every = [(float(d_ap), float(d_an)) for *_, d_ap, d_an, _ in brute_triplets(x, labels)]
    correct = sum(p <= n for p, n in every) / len(every)
    violating = sum(n < p + 0.3 for p, n in every) / len(every)
    assert math.isclose(loss.last_stats["correct_order_fraction"], correct, rel_tol=1e-6)
    assert math.isclose(loss.last_stats["margin_violation_fraction"], violating, rel_tol=1e-6)
    assert math.isclose(loss.last_stats["active_fraction"], violating, rel_tol=1e-6)


@pytest.mark.parametrize("kind", ["euclidean", "squared_euclidean", "cosine"])
@pytest.mark.parametrize("soft,swap", [(False, False), (True, True)])
def test_triplet_margin_functional(kind, soft, swap):
    a, p, n = (pk_batch(2, 3, 5, torch.float64, seed)[0] for seed in (21, 22, 23))
    terms = []
    for i in range(len(a)):
        d_an = (
            brute_distance(a[i], n[i], kind)
            if kind != "cosine"
            else 1 - F.cosine_similarity(a[i], n[i], dim=0)
        )
        if swap:
            d_pn = (
                brute_distance(p[i], n[i], kind)
                if kind != "cosine"
                else 1 - F.cosine_similarity(p[i], n[i], dim=0)
            )
            d_an = torch.minimum(d_an, d_pn)
        d_ap = (
            brute_distance(a[i], p[i], kind)
            if kind != "cosine"
            else 1 - F.cosine_similarity(a[i], p[i], dim=0)
        )
        v = d_ap - d_an + 0.7
        terms.append(F.softplus(v) if soft else F.relu(v))
    expected = torch.stack(terms)
    got = triplet_margin(a, p, n, margin=0.7, distance=kind, soft_margin=soft, swap=swap, reduction="none")
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(
        triplet_margin(a, p, n, 0.7, kind, soft_margin=soft, swap=swap), expected.mean()
    )
    with pytest.raises(ValueError, match="one shape"):
        triplet_margin(a, p[:-1], n)


@pytest.mark.parametrize(
    "params", [dict(mining="semi-hard-triplets"), dict(soft_margin=True), dict(mining="curriculum")]
)
def test_many_positives_per_anchor_are_chunked_without_changing_the_result(monkeypatch, params):
    x, labels = pk_batch(2, 12, 4, torch.float64, seed=24)
    whole = value_and_grad(lambda e: TripletLoss(**params)(e, labels), x)
    whole_semi_hard = value_and_grad(lambda e: build_loss("semi_hard")(e, labels), x)
    import losses._kernels.triplet as terms

    original = terms.slot_chunks
    monkeypatch.setattr(terms, "slot_chunks", lambda k, n, m: original(k, n, m, budget=n * m * 3))
    assert len(list(terms.slot_chunks(11, 24, 24))) == 4
    assert_agree(value_and_grad(lambda e: TripletLoss(**params)(e, labels), x), whole, torch.float64)
    assert_agree(
        value_and_grad(lambda e: build_loss("semi_hard")(e, labels), x), whole_semi_hard, torch.float64
    )


@pytest.mark.parametrize(
    "name,params",
    [
        ("triplet", dict(mining="all")),
        ("triplet", dict(mining="semi-hard-triplets", reduction="mean")),
        ("triplet", dict(mining="curriculum", curriculum_start=0.5)),
        ("semi_hard", dict()),
    ],
)
@pytest.mark.parametrize("with_ref", [False, True])
def test_blocks_of_anchors_do_not_change_the_result(monkeypatch, name, params, with_ref):
    x, labels = pk_batch(5, 4, 6, torch.float64, seed=25)
    ref, ref_labels = pk_batch(5, 3, 6, torch.float64, seed=26)
    inputs = (x, ref) if with_ref else (x,)

    def run(*tensors):
        loss = build_loss(name, **params)
        return loss(tensors[0], labels, tensors[1], ref_labels) if with_ref else loss(tensors[0], labels)

    whole = value_and_grad(run, *inputs)
    import losses._kernels.triplet as terms

    original = terms.row_blocks
    monkeypatch.setattr(terms, "row_blocks", lambda n, m: original(n, m, budget=3 * m))
    assert len(list(terms.row_blocks(20, 15))) == 7
    assert_agree(value_and_grad(run, *inputs), whole, torch.float64)


@pytest.mark.parametrize("name", ["triplet", "batch_all", "semi_hard"])
def test_values_do_not_depend_on_an_earlier_call(name):
    x, labels = pk_batch(4, 3, 6, torch.float64, seed=27)
    fresh = value_and_grad(lambda e: build_loss(name)(e, labels), x)
    reused = build_loss(name)
    reused(*pk_batch(8, 4, 6, torch.float64, seed=28))
    assert_agree(value_and_grad(lambda e: reused(e, labels), x), fresh, torch.float64)


@pytest.mark.parametrize("name", MY_LOSSES)
def test_declarations(name):
    info = loss_info(name)
    assert info.paper and info.summary
    for param in info.params:
        assert param.validate(param.default, name) == param.default
        if param.search is not None and param.choices is None and param.type is not bool:
            assert param.validate(param.search[0]) == param.search[0] and param.validate(param.search[1])
        elif param.search is not None:
            assert all(param.validate(v) == v for v in param.search)
    margin = info.param("margin")
    assert margin.search[0] <= 0.05 and margin.search[1] >= 1.0
