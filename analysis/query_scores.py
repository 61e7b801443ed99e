"""Per-query scores of a run's test embeddings, and a bootstrap over those queries.

AP@R of one query (Musgrave et al., ECCV 2020): with R the number of other items of its class in the
reference set, ``(1/R) * sum_{i<=R} P@i * rel_i`` over its R nearest references (Euclidean distance,
as the runs' ``test/map_at_r``). Their mean over the queries with R > 0 is the run's MAP@R. The
percentile bootstrap (Efron & Tibshirani 1993; :func:`sweeps.statistics.bootstrap_interval`)
resamples the test queries with replacement to give one run an interval: the test-set sampling
noise, which seeds and reruns add to.
"""

from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def average_precision_at_r(
    embeddings, labels, ref_embeddings=None, ref_labels=None, chunk_size: int = 512
) -> np.ndarray:
    """AP@R of every query (NaN where R = 0); the queries are their own references (each query's own
    item left out) unless ``ref_embeddings`` and ``ref_labels`` are given."""
    query = torch.as_tensor(np.asarray(embeddings), dtype=torch.float64)
    query_labels = torch.as_tensor(np.asarray(labels))
    same_source = ref_embeddings is None
    ref = query if same_source else torch.as_tensor(np.asarray(ref_embeddings), dtype=torch.float64)
    reference_labels = query_labels if same_source else torch.as_tensor(np.asarray(ref_labels))
    classes, counts = torch.unique(reference_labels, return_counts=True)
    position = torch.searchsorted(classes, query_labels).clamp_max(len(classes) - 1)
    relevant = torch.where(classes[position] == query_labels, counts[position], 0) - int(same_source)
    out = np.full(len(query), math.nan)
    for start in range(0, len(query), chunk_size):
        rows = torch.arange(start, min(start + chunk_size, len(query)))
        r = relevant[rows]
        k = int(r.max()) if len(rows) else 0
        if k <= 0:
            continue
        distances = torch.cdist(query[rows], ref)
        if same_source:
            distances[torch.arange(len(rows)), rows] = math.inf
        nearest = distances.topk(k, dim=1, largest=False).indices
        ranks = torch.arange(1, k + 1)
        hits = (reference_labels[nearest] == query_labels[rows, None]) & (ranks[None, :] <= r[:, None])
        precision = hits.cumsum(1) / ranks
        ap = (precision * hits).sum(1) / r.clamp_min(1)
        valid = r > 0
        out[rows[valid].numpy()] = ap[valid].numpy()
    return out
