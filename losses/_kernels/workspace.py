"""Scratch matrices a loss reuses from one call to the next.

The dense losses work through several (n, m) matrices per call. A fresh tensor that large costs
page faults on CPU every time (the C allocator hands big blocks back to the system on free), as
much as a pass over it; CUDA's caching allocator already avoids this, and a workspace does the
same on every device. The matrices are dead once the loss returns (autograd saves none of them),
so one module's calls may share them; a module must not be called from two threads at once.
"""

from __future__ import annotations

import torch


class Workspace:
    """Named flat buffers, grown on demand; ``workspace(name, like, shape)`` is an uninitialised
    tensor with ``like``'s dtype and device and ``shape`` (default ``like``'s), the same storage on
    every call."""

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, like: torch.Tensor, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        shape = like.shape if shape is None else torch.Size(shape)
        size = shape.numel()
        buffer = self._buffers.get(name)
        if (
            buffer is None
            or buffer.numel() < size
            or buffer.dtype != like.dtype
            or buffer.device != like.device
        ):
            buffer = torch.empty(size, dtype=like.dtype, device=like.device)
            self._buffers[name] = buffer
        return buffer[:size].view(shape)
