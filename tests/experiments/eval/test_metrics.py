"""Retrieval metrics against pytorch-metric-learning's AccuracyCalculator and brute force."""

import math

import numpy as np
import pytest
import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN
from sklearn.cluster import KMeans
from sklearn.metrics import normalized_mutual_info_score

from benchmarks.pml_names import PML_NAMES
from experiments.eval.clustering import kmeans, normalized_mutual_info
from experiments.eval.retrieval import _top_k_indices, retrieval_metrics


def make_embeddings(kind, n=240, dim=8, n_classes=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    # imbalanced classes, and one class with a single item (a "lone" query when same-source)
    labels = torch.randint(0, n_classes, (n - 1,), generator=g)
    labels = torch.cat([labels, torch.tensor([n_classes + 3])])
    noise = torch.randn(n, dim, generator=g, dtype=torch.float64)
    if kind == "random":
        return noise, labels
    centres = 1.5 * torch.randn(n_classes + 4, dim, generator=g, dtype=torch.float64)
    return centres[labels] + noise, labels


def pml_metrics(query, query_labels, ref, ref_labels, distance):
    knn = CustomKNN(CosineSimilarity()) if distance == "cosine" else None  # None: faiss L2
    calc = AccuracyCalculator(
        include=tuple(PML_NAMES.values()), k="max_bin_count", device=torch.device("cpu"), knn_func=knn
    )
    if ref is None:
        return calc.get_accuracy(query, query_labels)
    return calc.get_accuracy(query, query_labels, ref, ref_labels)


@pytest.mark.parametrize("kind", ["random", "clustered"])
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("same_source", [True, False])
def test_agrees_with_pml_accuracy_calculator(kind, distance, same_source):
    x, y = make_embeddings(kind)
    if same_source:
        args = (x, y, None, None)
    else:  # separate query / reference sets; the lone class has no reference item
        args = (x[:90], y[:90], x[90:-1], y[90:-1])
        args = (torch.cat([args[0], x[-1:]]), torch.cat([args[1], y[-1:]]), args[2], args[3])
    ours = retrieval_metrics(*args, distance=distance, chunk_size=17, with_nmi=False)
    theirs = pml_metrics(*args, distance)
    for name, pml_name in PML_NAMES.items():
        assert ours[name] == pytest.approx(theirs[pml_name], abs=1e-6), name
    assert 0 < ours["map_at_r"] <= ours["r_precision"] + 1e-12


def brute_force_recall(query, query_labels, ref, ref_labels, k, same_source):
    q, r = query.numpy(), ref.numpy()
    d = ((q[:, None, :] - r[None, :, :]) ** 2).sum(-1)
    if same_source:
        np.fill_diagonal(d, np.inf)
    hits = []
    for i in range(len(q)):
        same = ref_labels.numpy() == query_labels[i].item()
        if same_source:
            same[i] = False
        if not same.any():
            continue  # lone query: left out
        nearest = np.argsort(d[i], kind="stable")[:k]
        hits.append(same[nearest].any())
    return float(np.mean(hits))


@pytest.mark.parametrize("same_source", [True, False])
def test_recall_at_k_matches_brute_force(same_source):
    x, y = make_embeddings("clustered", n=150, seed=3)
    args = (x, y, None, None) if same_source else (x[:50], y[:50], x[50:], y[50:])
    ours = retrieval_metrics(*args, ks=(1, 2, 4, 8, 16), chunk_size=11, with_nmi=False)
    for k in (1, 2, 4, 8, 16):
        expected = brute_force_recall(
            args[0],
            args[1],
            args[2] if args[2] is not None else x,
            args[3] if args[3] is not None else y,
            k,
            same_source,
        )
        assert ours[f"recall_at_{k}"] == pytest.approx(expected, abs=1e-12)
    assert ours["recall_at_1"] == pytest.approx(ours["precision_at_1"], abs=1e-12)


def test_chunking_and_float32_do_not_change_results():
    x, y = make_embeddings("clustered", n=200, seed=5)
    whole = retrieval_metrics(x, y, with_nmi=False)
    one_row = retrieval_metrics(x, y, chunk_size=1, with_nmi=False)
    assert whole == pytest.approx(one_row, abs=1e-12)
    as_numpy = retrieval_metrics(x.float().numpy(), y.tolist(), with_nmi=False)
    assert as_numpy == pytest.approx(whole, abs=1e-6)


def test_perfect_separation_scores_one_and_nmi_one():
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(5).repeat_interleave(12)
    x = 100 * torch.eye(16)[labels] + 0.01 * torch.randn(60, 16, generator=g)
    out = retrieval_metrics(x, labels, seed=7)
    assert set(out) == {
        "precision_at_1",
        "r_precision",
        "map_at_r",
        "recall_at_1",
        "recall_at_2",
        "recall_at_4",
        "recall_at_8",
        "nmi",
    }
    for name, value in out.items():
        assert value == pytest.approx(1.0, abs=1e-9), name


def test_nmi_equals_sklearn_on_the_same_clustering():
    x, y = make_embeddings("clustered", n=300, seed=2)
    out = retrieval_metrics(x, y, seed=4)
    clusters = kmeans(x, int(torch.unique(y).numel()), seed=4)
    assert out["nmi"] == pytest.approx(normalized_mutual_info_score(y.numpy(), clusters.numpy()), abs=1e-12)
    assert 0.3 < out["nmi"] < 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_normalized_mutual_info_matches_sklearn(seed):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 5, 400)
    b = np.where(rng.random(400) < 0.6, a * 7 + 3, rng.integers(0, 9, 400))
    assert normalized_mutual_info(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
        normalized_mutual_info_score(a, b), abs=1e-12
    )
    ones = torch.zeros(10, dtype=torch.int64)
    assert normalized_mutual_info(ones, ones) == normalized_mutual_info_score(ones, ones) == 1.0
    assert normalized_mutual_info(ones, torch.arange(10)) == pytest.approx(
        normalized_mutual_info_score(ones, np.arange(10)), abs=1e-12
    )


def test_kmeans_is_seeded_and_as_good_as_sklearn():
    x, y = make_embeddings("clustered", n=300, seed=8)
    first, second = kmeans(x, 10, seed=3), kmeans(x, 10, seed=3)
    assert torch.equal(first, second)

    def inertia(assign):
        centres = torch.stack([x[assign == c].mean(0) for c in torch.unique(assign)])
        return float(((x - centres[torch.unique(assign, return_inverse=True)[1]]) ** 2).sum())

    reference = KMeans(10, n_init=1, random_state=0).fit(x.numpy()).inertia_
    assert inertia(first) <= 1.1 * reference


def test_no_matching_reference_gives_nan_with_warning():
    x = torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="no query has a same-class item"):
        out = retrieval_metrics(x, [0, 1, 2, 3], with_nmi=False)
    assert all(math.isnan(v) for v in out.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(distance="manhattan"), "unknown distance"),
        (dict(ks=(0, 2)), "ks must be"),
        (dict(chunk_size=0), "chunk_size must be"),
        (dict(labels=[0, 1]), "one label per embedding"),
        (dict(embeddings=torch.tensor([[0.0, float("nan")]] * 4)), "NaN"),
        (dict(embeddings=torch.zeros(4)), "2-D"),
        (dict(ref_embeddings=torch.zeros(4, 2)), "together"),
        (dict(ref_embeddings=torch.zeros(4, 3), ref_labels=[0, 0, 1, 1]), "dimension"),
    ],
)
def test_bad_input_raises_clear_value_error(kwargs, message):
    args = dict(embeddings=torch.randn(4, 2), labels=[0, 0, 1, 1], with_nmi=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        retrieval_metrics(**args)


@pytest.mark.parametrize("seed", range(5))
def test_block_top_k_finds_the_k_largest_scores_with_ties(seed):
    generator = torch.Generator().manual_seed(seed)
    for n, k in ((4000, 3), (1000, 7), (999, 1), (130, 1)):
        scores = torch.randint(0, 40, (6, n), generator=generator).float()  # many ties
        nearest = _top_k_indices(scores, k)
        assert nearest.shape == (6, k) and all(len(set(row)) == k for row in nearest.tolist())
        assert torch.equal(scores.gather(1, nearest), scores.topk(k, dim=1).values)
