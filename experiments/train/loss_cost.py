"""The cost of a run's loss, mining included, measured on one of its own training batches.

Once training ends, the loss (with its mining) runs forward and backward on the embeddings of one
PK batch, detached from the network: ``cost/loss_ms`` is the median wall time of
:data:`REPEATS` runs and ``cost/loss_peak_mb`` the peak memory they allocate beyond what was
already held: CUDA's max-memory counter on a GPU, and on other devices the peak of the live tensor
storage created while the loss runs (counted by a dispatch mode, since the CPU allocator keeps no
statistics and ``tracemalloc`` does not see tensor memory).
"""

from __future__ import annotations

import statistics
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map_only

REPEATS = 5


class StoragePeak(TorchDispatchMode):
    """Counts the bytes of tensor storage created by the ops run under it, while alive: ``peak``."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        tree_map_only(torch.Tensor, self._track, out)
        return out

    def _track(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._seen:  # a view or an in-place result: counted already
            return
        self._seen.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self.live -= size
        self._seen.discard(key)


def _step(loss_fn, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
    leaf = embeddings.detach().requires_grad_(True)
    loss_fn(leaf, labels).backward()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def loss_peak_bytes(loss_fn, embeddings: torch.Tensor, labels: torch.Tensor) -> int:
    """Peak bytes one forward and backward of ``loss_fn`` allocates beyond what is held before."""
    device = embeddings.device
    if device.type == "cuda":
        _synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        held = torch.cuda.memory_allocated(device)
        _step(loss_fn, embeddings, labels)
        _synchronize(device)
        return int(torch.cuda.max_memory_allocated(device) - held)
    with StoragePeak() as counter:
        _step(loss_fn, embeddings, labels)
    return counter.peak


def loss_cost(
    loss_fn, embeddings: torch.Tensor, labels: torch.Tensor, repeats: int = REPEATS
) -> dict[str, float]:
    """``cost/loss_ms`` (median of ``repeats`` timed forward+backward passes, after one warm-up) and
    ``cost/loss_peak_mb`` of ``loss_fn`` on ``embeddings`` and ``labels``; the loss's own parameters
    receive gradients, nothing else changes."""
    device = embeddings.device
    _step(loss_fn, embeddings, labels)  # warm-up: lazy initialisation, kernel selection
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        _step(loss_fn, embeddings, labels)
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return {
        "cost/loss_ms": 1000 * statistics.median(times),
        "cost/loss_peak_mb": loss_peak_bytes(loss_fn, embeddings, labels) / 2**20,
    }


@torch.no_grad()
def _first_batch_embeddings(model, train_data, sampler) -> tuple[torch.Tensor, torch.Tensor]:
    from experiments.data.device_data import training_batches
    from experiments.eval.run_metrics import channels_last

    indices = next(iter(sampler))
    images, labels = next(iter(training_batches(train_data, [indices])))
    was_training = model.training
    model.eval()
    embeddings = model(channels_last(images)).float()
    model.train(was_training)
    return embeddings, labels


def training_batch_cost(model, loss_fn, train_data, sampler, repeats: int = REPEATS) -> dict[str, float]:
    """:func:`loss_cost` on the embeddings of the sampler's next PK batch of ``train_data``."""
    embeddings, labels = _first_batch_embeddings(model, train_data, sampler)
    return loss_cost(loss_fn, embeddings, labels, repeats)
