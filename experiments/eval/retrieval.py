"""Retrieval metrics: P@1, R-precision, MAP@R, Recall@K and NMI.

Definitions follow Musgrave et al. 2020, "A Metric Learning Reality Check" (ECCV), as
implemented by pytorch-metric-learning's ``AccuracyCalculator``: for a query with R items of its
class in the reference set, R-precision is the fraction of the R nearest references that share
its class, and MAP@R = (1/R) * sum_{i<=R} P@i * rel_i. Recall@K is the standard deep-metric-learning
Recall@K (Song et al. 2016): the fraction of queries with at least one same-class reference among
the K nearest. Queries whose class has no other reference item are left out of every mean, as
pytorch-metric-learning does. Without a reference set the queries are the references and each
query's own item is excluded. Ties in distance are broken arbitrarily, as in a k-NN search.

Everything runs in torch on the embeddings' device, chunked over queries: a chunk holds one
(chunk, n_ref) score matrix and its top-k, with k = the largest R in the chunk (at least max(ks)).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from experiments.eval.clustering import kmeans, normalized_mutual_info
from experiments.eval.inputs import as_embeddings, as_labels, auto_chunk_size
from losses.params import DISTANCES

# The headline metrics of "A Metric Learning Reality Check", by logged key, with the names tables print
HEADLINE_METRICS = {"precision_at_1": "P@1", "r_precision": "R-precision", "map_at_r": "MAP@R"}

RANKING_METRICS = ("precision_at_1", "r_precision", "map_at_r")


def _check_ks(ks) -> tuple[int, ...]:
    ks = tuple(ks)
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be a non-empty sequence of positive ints, got {ks!r}")
    return ks


def _closeness(query: torch.Tensor, ref: torch.Tensor, distance: str):
    """A function writing the scores of a block of queries, larger meaning nearer, into ``out``.

    The caller reuses one ``out`` buffer for every block: on CPU a fresh (rows, n_ref) result
    costs about as much in page faults as the matmul that fills it.
    """
    if distance == "cosine":
        ref = F.normalize(ref, dim=1)
        return lambda block, out: torch.mm(F.normalize(block, dim=1), ref.T, out=out)
    # -||q - r||^2 + ||q||^2 = 2 q.r - ||r||^2, the same order within a row, as one matmul of the
    # augmented rows [2q, -1] and [r, ||r||^2] (no separate pass to add the bias)
    ref = torch.cat([ref, (ref * ref).sum(1, keepdim=True)], 1)
    return lambda block, out: torch.mm(
        torch.cat([2 * block, -block.new_ones(block.shape[0], 1)], 1), ref.T, out=out
    )


def retrieval_metrics(
    embeddings,
    labels,
    ref_embeddings=None,
    ref_labels=None,
    *,
    distance: str = "euclidean",
    ks=(1, 2, 4, 8),
    chunk_size: int | None = None,
    with_nmi: bool = True,
    seed: int = 0,
) -> dict[str, float]:
    """Retrieval metrics of ``embeddings`` (queries) against ``ref_embeddings`` (default: themselves).

    Returns ``precision_at_1``, ``r_precision``, ``map_at_r``, ``recall_at_<k>`` for each k in
    ``ks`` and, with ``with_nmi``, ``nmi`` (k-means on the queries with k = number of query
    classes, seeded by ``seed``; on L2-normalised embeddings when ``distance="cosine"``).
    ``distance`` is "euclidean" (same ranking as "squared_euclidean") or "cosine".
    ``chunk_size`` is the number of queries per chunk (default: as many as keep a chunk's
    score matrix under 32M elements). All values are NaN (with a warning) when no query has a
    same-class reference.
    """
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    ks = _check_ks(ks)
    query = as_embeddings(embeddings)
    query_labels = as_labels(labels, query.shape[0], query.device)
    same_source = ref_embeddings is None
    if same_source != (ref_labels is None):
        raise ValueError(
            "pass ref_embeddings and ref_labels together, or neither to use the "
            "queries as their own reference set"
        )
    if same_source:
        ref, reference_labels = query, query_labels
    else:
        ref = as_embeddings(ref_embeddings, "ref_embeddings")
        if ref.device != query.device:
            raise ValueError(
                f"embeddings are on {query.device} but ref_embeddings on {ref.device}; "
                f"move both to one device"
            )
        if ref.shape[1] != query.shape[1]:
            raise ValueError(
                f"embeddings have dimension {query.shape[1]} but ref_embeddings "
                f"{ref.shape[1]}; both must come from the same embedding space"
            )
        ref = ref.to(torch.promote_types(ref.dtype, query.dtype))
        query = query.to(ref.dtype)
        reference_labels = as_labels(ref_labels, ref.shape[0], ref.device, "ref_labels")

    out = _ranking_metrics(query, query_labels, ref, reference_labels, same_source, distance, ks, chunk_size)
    if with_nmi:
        points = F.normalize(query, dim=1) if distance == "cosine" else query
        n_classes = int(torch.unique(query_labels).numel())
        clusters = kmeans(points, n_classes, seed=seed, chunk_size=chunk_size)
        out["nmi"] = normalized_mutual_info(query_labels, clusters)
    return out


def _ranking_metrics(query, query_labels, ref, ref_labels, same_source, distance, ks, chunk_size):
    classes, class_ids = torch.unique(torch.cat([query_labels, ref_labels]), return_inverse=True)
    class_ids = class_ids.to(torch.int32)  # narrower gathers of the neighbours' classes
    query_ids, ref_ids = class_ids[: query.shape[0]], class_ids[query.shape[0] :]
    ref_counts = torch.bincount(ref_ids, minlength=classes.numel()).to(torch.int32)
    relevant = ref_counts[query_ids] - int(same_source)  # R of each query
    relevant_cpu = relevant.cpu()
    order = torch.argsort(relevant_cpu, descending=True, stable=True)  # chunks of similar R
    n_available = ref.shape[0] - int(same_source)
    closeness = _closeness(query, ref, distance)
    rows = auto_chunk_size(query.shape[0], ref.shape[0], chunk_size)
    buffer = torch.empty(rows, ref.shape[0], dtype=query.dtype, device=query.device)

    sums = torch.zeros(3 + len(ks), dtype=torch.float64, device=query.device)
    for start in range(0, query.shape[0], rows):
        idx_cpu = order[start : start + rows]
        if int(relevant_cpu[idx_cpu[0]]) <= 0:
            break  # the remaining queries have no same-class reference
        k = min(max(int(relevant_cpu[idx_cpu[0]]), max(ks)), n_available)
        idx = idx_cpu.to(query.device)
        scores = closeness(query[idx], buffer[: idx.shape[0]])
        if same_source:
            scores.scatter_(1, idx[:, None], float("-inf"))
        nearest = _top_k_indices(scores, k)
        hits = ref_ids[nearest] == query_ids[idx][:, None]
        sums += _chunk_sums(hits, relevant[idx], ks)

    n_valid = int((relevant_cpu > 0).sum())
    names = [*RANKING_METRICS, *(f"recall_at_{k}" for k in ks)]
    if n_valid == 0:
        warnings.warn(
            "no query has a same-class item in the reference set; retrieval metrics are NaN",
            RuntimeWarning,
            stacklevel=3,
        )
        return {name: math.nan for name in names}
    return dict(zip(names, (sums / n_valid).tolist()))


def _top_k_indices(scores: torch.Tensor, k: int, block: int = 32) -> torch.Tensor:
    """Indices of each row's ``k`` largest scores, nearest first.

    When ``k`` is small against the row, the row is cut into blocks and top-k runs only on the
    ``k`` blocks with the largest maxima: those maxima are ``k`` distinct scores, so every score
    above the k-th of them lies in those blocks, and the blocks hold at least ``k`` scores as large.
    """
    rows, n = scores.shape
    if 4 * k * block > n:
        return scores.topk(k, dim=1).indices
    whole = n - n % block
    maxima = scores[:, :whole].unflatten(1, (-1, block)).amax(2)
    offsets = torch.arange(block, device=scores.device)
    candidates = (maxima.topk(k, dim=1, sorted=False).indices.unsqueeze(2) * block + offsets).flatten(1)
    if whole < n:  # the last, partial block is always a candidate
        candidates = torch.cat([candidates, torch.arange(whole, n, device=scores.device).expand(rows, -1)], 1)
    return candidates.gather(1, scores.gather(1, candidates).topk(k, dim=1).indices)


def _chunk_sums(hits: torch.Tensor, relevant: torch.Tensor, ks: tuple[int, ...]) -> torch.Tensor:
    """Per-chunk sums of P@1, R-precision, AP@R and Recall@K over queries with R > 0.

    ``hits[i, j]`` tells whether the (j+1)-th nearest reference of query i shares its class.
    """
    valid = relevant > 0
    positions = torch.arange(1, hits.shape[1] + 1, device=hits.device)
    hits_r = hits & (positions[None, :] <= relevant[:, None])
    cumulative = hits_r.cumsum(1, dtype=torch.int32)  # hits among the first i
    r = relevant.clamp_min(1).to(torch.float64)
    # float32 terms (relative error 6e-8) summed in float64
    precision_at_hits = (cumulative.to(torch.float32) / positions.to(torch.float32)).mul_(hits_r)
    average_precision = precision_at_hits.sum(1, dtype=torch.float64) / r
    r_precision = cumulative[:, -1].to(torch.float64) / r
    columns = [hits[:, 0], r_precision, average_precision]
    columns += [hits[:, :k].any(1) for k in ks]
    per_query = torch.stack([c.to(torch.float64) for c in columns], 1)
    return (per_query * valid[:, None]).sum(0)
