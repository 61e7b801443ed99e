"""Checks and conversions shared by the evaluation modules.

Embeddings may arrive as torch tensors or numpy arrays; labels as integer tensors, arrays or
lists. Each helper returns torch tensors on the embeddings' device or raises a ``ValueError``
that names the problem and the fix.
"""

from __future__ import annotations

import numpy as np
import torch


def as_embeddings(x, name: str = "embeddings") -> torch.Tensor:
    """A finite floating (n, d) tensor; half precision is widened to float32."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch tensor or numpy array, got {type(x).__name__}")
    if x.ndim != 2:
        raise ValueError(
            f"{name} must be 2-D (n_samples, dim), got shape {tuple(x.shape)}; reshape it to (n, -1)"
        )
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} is empty (shape {tuple(x.shape)}); pass at least one embedding")
    if not x.is_floating_point():
        x = x.float()
    elif x.dtype in (torch.float16, torch.bfloat16):
        x = x.float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{name} contain NaN or inf values; the model diverged or the input is "
            f"corrupt, so there is nothing meaningful to evaluate"
        )
    return x


def as_labels(y, n: int, device: torch.device, name: str = "labels") -> torch.Tensor:
    """An int64 (n,) tensor on ``device``."""
    if isinstance(y, np.ndarray):
        y = torch.from_numpy(y)
    elif not isinstance(y, torch.Tensor):
        y = torch.as_tensor(y)
    if y.ndim != 1 or y.shape[0] != n:
        raise ValueError(f"{name} must be 1-D with one label per embedding ({n}), got shape {tuple(y.shape)}")
    if y.is_floating_point():
        if not bool((y == y.round()).all()):
            raise ValueError(f"{name} must be integer class ids, got non-integer floats")
    elif y.dtype == torch.bool or y.is_complex():
        raise ValueError(f"{name} must be integer class ids, got dtype {y.dtype}")
    return y.to(device=device, dtype=torch.int64)


def check_chunk_size(chunk_size: int | None) -> None:
    """``chunk_size`` is ``None`` (automatic) or a positive int."""
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None (automatic), got {chunk_size!r}")


def auto_chunk_size(n_rows: int, n_cols: int, chunk_size: int | None, budget: int = 1 << 25) -> int:
    """Rows per chunk so that a chunk's (rows, n_cols) matrix stays under ``budget`` elements."""
    check_chunk_size(chunk_size)
    if chunk_size is None:
        chunk_size = max(1, budget // max(n_cols, 1))
    return max(1, min(chunk_size, n_rows))
