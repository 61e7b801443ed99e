"""Face-verification metrics over every pair of test images.

A pair is genuine when both images show the same identity, an impostor pair otherwise; the
similarity of a pair is its cosine similarity or its negated (squared) euclidean distance.
Reported, over all n(n-1)/2 pairs:

- ``roc_auc``: area under the ROC curve (ties count one half, as the Mann-Whitney U statistic).
- ``tar_at_far_1e-2``, ``tar_at_far_1e-3``: the highest true-accept rate whose false-accept
  rate is at most 1e-2 / 1e-3 (accept a pair when its similarity is above the threshold).
- ``accuracy`` (and ``accuracy_std``): the LFW protocol (Huang et al. 2007, "Labeled Faces in
  the Wild"): pairs split into ``folds`` stratified folds; the threshold that maximises accuracy
  on the other folds is applied to the held-out fold; mean and standard deviation over folds.
- ``balanced_accuracy``: the same protocol scoring the mean of the genuine and impostor
  accuracies, since all-pairs sets are mostly impostor pairs.
"""

from __future__ import annotations

import math

import torch

from experiments.eval.inputs import as_embeddings, as_labels, auto_chunk_size
from losses.distances import pairwise_distances
from losses.params import DISTANCES

FAR_TARGETS = {"tar_at_far_1e-2": 1e-2, "tar_at_far_1e-3": 1e-3}
MAX_SAMPLES = 10_000  # 50M pairs; beyond that, evaluate a random subset of identities


def pair_scores(
    embeddings: torch.Tensor, labels: torch.Tensor, distance: str = "cosine", chunk_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity and genuine flag of every pair (i, j), i < j, in row-major order."""
    n = embeddings.shape[0]
    rows = auto_chunk_size(n, n, chunk_size)
    scores, genuine = [], []
    columns = torch.arange(n, device=embeddings.device)
    for start in range(0, n, rows):
        block = embeddings[start : start + rows]
        row_ids = columns[start : start + rows]
        upper = columns[None, :] > row_ids[:, None]
        if distance == "cosine":
            similarity = 1 - pairwise_distances(block, embeddings, kind="cosine")
        else:
            similarity = -pairwise_distances(block, embeddings, kind=distance)
        scores.append(similarity[upper])
        genuine.append((labels[start : start + rows, None] == labels[None, :])[upper])
    return torch.cat(scores), torch.cat(genuine)


def roc_auc(scores: torch.Tensor, genuine: torch.Tensor) -> float:
    """Area under the ROC curve via average ranks (Mann-Whitney U), ties counted one half."""
    sorted_scores, order = torch.sort(scores)
    _, inverse, counts = torch.unique_consecutive(sorted_scores, return_inverse=True, return_counts=True)
    last_rank = counts.cumsum(0).to(torch.float64)
    average_rank = last_rank - (counts.to(torch.float64) - 1) / 2  # 1-based average rank of a tie group
    ranks = average_rank[inverse]
    n_genuine = int(genuine.sum())
    n_impostor = genuine.numel() - n_genuine
    genuine_rank_sum = ranks[genuine[order]].sum()
    return float((genuine_rank_sum - n_genuine * (n_genuine + 1) / 2) / (n_genuine * n_impostor))


def tar_at_far(scores: torch.Tensor, genuine: torch.Tensor, far: float) -> float:
    """Largest true-accept rate over thresholds t (accept when score > t) with FAR <= ``far``."""
    impostor = torch.sort(scores[~genuine], descending=True).values
    allowed = math.floor(far * impostor.numel() * (1 + 1e-12))  # false accepts we may afford
    if allowed >= impostor.numel():
        return 1.0
    threshold = impostor[allowed]
    return float((scores[genuine] > threshold).to(torch.float64).mean())


def best_threshold(scores: torch.Tensor, genuine: torch.Tensor, balanced: bool = False) -> float:
    """Threshold (accept when score >= t) maximising accuracy, or balanced accuracy.

    Candidates are midpoints between consecutive distinct scores and +-inf; the lowest of
    equally good thresholds wins.
    """
    sorted_scores, order = torch.sort(scores)
    is_genuine = genuine[order].to(torch.float64)
    n_genuine = is_genuine.sum()
    n_impostor = is_genuine.numel() - n_genuine
    zero = torch.zeros(1, dtype=torch.float64, device=scores.device)
    genuine_below = torch.cat([zero, is_genuine.cumsum(0)])  # cut c: reject sorted[:c]
    impostor_below = torch.cat([zero, (1 - is_genuine).cumsum(0)])
    accepted_genuine = n_genuine - genuine_below
    if balanced:
        score = (accepted_genuine / n_genuine.clamp_min(1) + impostor_below / n_impostor.clamp_min(1)) / 2
    else:
        score = accepted_genuine + impostor_below
    inf = torch.full((1,), math.inf, dtype=torch.float64, device=scores.device)
    below = torch.cat([-inf, sorted_scores.to(torch.float64)])
    above = torch.cat([sorted_scores.to(torch.float64), inf])
    distinct_cut = below < above  # a cut inside a run of equal scores is no threshold
    score = torch.where(distinct_cut, score, torch.full_like(score, -math.inf))
    cut = int(score.argmax())
    if cut == 0:
        return -math.inf
    if cut == sorted_scores.numel():
        return math.inf
    return float((below[cut] + above[cut]) / 2)


def stratified_folds(genuine: torch.Tensor, folds: int, seed: int) -> torch.Tensor:
    """A fold id per pair; genuine and impostor pairs are dealt out separately, shuffled by ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    fold_of = torch.empty(genuine.numel(), dtype=torch.int64)
    genuine_cpu = genuine.cpu()
    for group in (genuine_cpu, ~genuine_cpu):
        members = torch.nonzero(group).flatten()
        shuffled = members[torch.randperm(members.numel(), generator=generator)]
        fold_of[shuffled] = torch.arange(members.numel()) % folds
    return fold_of.to(genuine.device)


def cross_validated_accuracy(
    scores: torch.Tensor, genuine: torch.Tensor, folds: int, seed: int, balanced: bool = False
) -> tuple[float, float]:
    """Mean and standard deviation (ddof=0) of held-out accuracy over ``folds`` folds."""
    fold_of = stratified_folds(genuine, folds, seed)
    accuracies = []
    for fold in range(folds):
        held_out = fold_of == fold
        threshold = best_threshold(scores[~held_out], genuine[~held_out], balanced)
        correct = (scores[held_out].to(torch.float64) >= threshold) == genuine[held_out]
        if balanced:
            test_genuine = genuine[held_out]
            rates = [
                correct[group].to(torch.float64).mean()
                for group in (test_genuine, ~test_genuine)
                if bool(group.any())
            ]
            accuracies.append(float(sum(rates) / len(rates)))
        else:
            accuracies.append(float(correct.to(torch.float64).mean()))
    values = torch.tensor(accuracies, dtype=torch.float64)
    return float(values.mean()), float(values.std(correction=0))


def verification_metrics(
    embeddings,
    labels,
    distance: str = "cosine",
    folds: int = 10,
    seed: int = 0,
    chunk_size: int | None = None,
) -> dict[str, float]:
    """ROC AUC, TAR at FAR 1e-2 / 1e-3 and 10-fold accuracy over all pairs of ``embeddings``."""
    if distance not in DISTANCES:
        raise ValueError(f"unknown distance {distance!r}; choose one of {', '.join(DISTANCES)}")
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise ValueError(f"folds must be an int of at least 2, got {folds!r}")
    x = as_embeddings(embeddings)
    y = as_labels(labels, x.shape[0], x.device)
    if x.shape[0] > MAX_SAMPLES:
        raise ValueError(
            f"verification over all pairs is limited to {MAX_SAMPLES} embeddings, got "
            f"{x.shape[0]}; evaluate a random subset of the identities"
        )
    scores, genuine = pair_scores(x, y, distance, chunk_size)
    n_genuine = int(genuine.sum())
    if n_genuine == 0 or n_genuine == genuine.numel():
        raise ValueError(
            "verification needs both genuine pairs (two images of one identity) and "
            "impostor pairs (two identities); give at least two identities, one of "
            "them with two or more images"
        )
    if genuine.numel() < folds:
        raise ValueError(f"{genuine.numel()} pairs cannot be split into {folds} folds; lower folds")
    out = {"roc_auc": roc_auc(scores, genuine)}
    out.update({name: tar_at_far(scores, genuine, far) for name, far in FAR_TARGETS.items()})
    out["accuracy"], out["accuracy_std"] = cross_validated_accuracy(scores, genuine, folds, seed)
    out["balanced_accuracy"], _ = cross_validated_accuracy(scores, genuine, folds, seed, balanced=True)
    return out
