"""Image-tensor helpers: the ``image_size`` option, one-off resizing, channel statistics."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def parse_image_size(value, default: tuple[int, int] | None) -> tuple[int, int] | None:
    """``dataset.image_size`` as (height, width): an int means a square, ``[h, w]`` a rectangle,
    0 / ``None`` / empty means the dataset's default (``None`` = keep the native size)."""
    if value is None or value == 0 or value == [] or value == ():
        return default
    if isinstance(value, bool):
        raise ValueError(f"dataset.image_size must be an int or [height, width]; got {value!r}")
    if isinstance(value, int):
        size = (value, value)
    elif (
        isinstance(value, (list, tuple))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        size = (value[0], value[1])
    else:
        raise ValueError(f"dataset.image_size must be an int or [height, width]; got {value!r}")
    if min(size) < 1:
        raise ValueError(f"dataset.image_size must be positive; got {value!r}")
    return size


def resize_images(images: torch.Tensor, size: tuple[int, int] | None, chunk: int = 1024) -> torch.Tensor:
    """Resize uint8 (N, C, H, W) images to ``size`` in chunks (bounded memory).

    Shrinking uses area interpolation (the mean over each target pixel's footprint); enlarging
    uses antialiased bilinear interpolation. Returns the input unchanged when the size matches.
    """
    if size is None or tuple(images.shape[-2:]) == tuple(size):
        return images
    shrinking = size[0] <= images.shape[-2] and size[1] <= images.shape[-1]
    out = torch.empty((images.shape[0], images.shape[1], *size), dtype=torch.uint8)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].float()
        if shrinking:
            part = F.interpolate(part, size=size, mode="area")
        else:
            part = F.interpolate(part, size=size, mode="bilinear", antialias=True, align_corners=False)
        out[start : start + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 (N, C, H, W) images in [0, 1] units."""
    total = torch.zeros(images.shape[1], dtype=torch.float64, device=images.device)
    squares = torch.zeros_like(total)
    for start in range(0, images.shape[0], chunk):
        part = images[start : start + chunk].double().div_(255.0)
        total += part.sum(dim=(0, 2, 3))
        squares += part.square().sum(dim=(0, 2, 3))
    count = max(1, images.shape[0] * images.shape[2] * images.shape[3])
    mean = total / count
    std = (squares / count - mean.square()).clamp(min=0).sqrt().clamp(min=1e-3)
    return tuple(mean.tolist()), tuple(std.tolist())
