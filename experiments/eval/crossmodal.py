"""Cross-modal retrieval metrics over a paired test set (row i of A is paired with row i of B).

Image-to-text and text-to-image Recall@K and median rank as in VSE++ (Faghri et al. 2018):
the rank of the paired item among all items of the other modality, 1 = first. Ties count
against the query (an item at the same distance as the pair ranks ahead of it).
"""

from __future__ import annotations

import torch

from losses.distances import pairwise_distances


def paired_ranks(
    queries: torch.Tensor, items: torch.Tensor, distance: str = "cosine", chunk_size: int = 1024
) -> torch.Tensor:
    """For each query row i, the 1-based rank of ``items[i]`` among all ``items``."""
    ranks = []
    for start in range(0, queries.shape[0], chunk_size):
        d = pairwise_distances(queries[start : start + chunk_size], items, distance)
        rows = torch.arange(d.shape[0], device=d.device)
        own = d[rows, rows + start].unsqueeze(1)
        ranks.append((d <= own).sum(1))
    return torch.cat(ranks)


def cross_modal_metrics(
    emb_a: torch.Tensor,
    emb_b: torch.Tensor,
    labels: torch.Tensor,
    distance: str = "cosine",
    ks: tuple[int, ...] = (1, 5, 10),
    names: tuple[str, str] = ("image", "text"),
) -> dict[str, float]:
    """Recall@K and median rank in both directions, plus label-level MAP@R across modalities."""
    from experiments.eval.retrieval import retrieval_metrics

    if emb_a.shape != emb_b.shape or emb_a.shape[0] != labels.shape[0]:
        raise ValueError(
            f"paired embeddings must have equal shapes and one label per pair, got "
            f"{tuple(emb_a.shape)}, {tuple(emb_b.shape)} and {tuple(labels.shape)} labels"
        )
    a, b = names
    out: dict[str, float] = {}
    for tag, queries, items in ((f"{a}_to_{b}", emb_a, emb_b), (f"{b}_to_{a}", emb_b, emb_a)):
        ranks = paired_ranks(queries, items, distance).float()
        for k in ks:
            out[f"{tag}_recall_at_{k}"] = float((ranks <= k).float().mean())
        out[f"{tag}_median_rank"] = float(ranks.median())
        label_metrics = retrieval_metrics(queries, labels, items, labels, distance=distance, with_nmi=False)
        out[f"{tag}_map_at_r"] = label_metrics["map_at_r"]
    out[f"{a}_to_{b}_chance_recall_at_1"] = 1.0 / emb_a.shape[0]
    return out
