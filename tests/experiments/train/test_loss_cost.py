"""The loss cost probe (experiments.train.loss_cost): storage counted against known allocations, and
the cost metrics every run logs."""

from __future__ import annotations

import torch
from mlflow import MlflowClient

from experiments.train.loss_cost import StoragePeak, loss_cost, loss_peak_bytes
from losses import build_loss


def test_storage_peak_counts_live_tensors_only():
    with StoragePeak() as counter:
        a = torch.ones(1000, 1000)  # 4,000,000 bytes
        view = a[:10]  # shares a's storage
        a.add_(1)  # in place: no new storage
        del a, view
        b = torch.ones(500, 1000)
    assert counter.peak == 4_000_000 and counter.live == 2_000_000
    with StoragePeak() as both:
        c, d = torch.ones(1000, 1000), torch.ones(500, 1000)
    assert both.peak == 6_000_000
    del b, c, d


def test_peak_of_a_loss_covers_its_distance_matrix_and_its_gradient():
    n = 256
    embeddings, labels = torch.randn(n, 16), torch.arange(n) % 32

    def pairwise(x, _):
        return torch.cdist(x, x).sum()

    peak = loss_peak_bytes(pairwise, embeddings, labels)
    assert n * n * 4 <= peak <= 4 * n * n * 4  # the (n, n) matrix, its gradient and small buffers
    assert loss_peak_bytes(build_loss("batch_hard"), embeddings, labels) >= n * n * 4


def test_loss_cost_metrics():
    cost = loss_cost(build_loss("triplet"), torch.randn(64, 8), torch.arange(64) % 16, repeats=3)
    assert set(cost) == {"cost/loss_ms", "cost/loss_peak_mb"}
    assert cost["cost/loss_ms"] > 0 and cost["cost/loss_peak_mb"] > 0


def test_sweep_runs_log_their_cost(tiny_sweep):
    client = MlflowClient(tracking_uri=tiny_sweep.tracking_uri)
    experiment = client.get_experiment_by_name(tiny_sweep.experiment_name)
    runs = client.search_runs([experiment.experiment_id], "tags.`tripletlab.role` = 'final'")
    for run in runs:
        metrics = run.data.metrics
        assert metrics["cost/loss_ms"] > 0 and metrics["cost/loss_peak_mb"] > 0
        assert 0 < metrics["cost/step_ms"] < 1000 * metrics["train_seconds"]
