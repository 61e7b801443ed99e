"""Images kept on the training device as uint8; batches are gathered, augmented and normalised
there, with no DataLoader workers and no per-sample Python (the airbench approach).

Without ``crop_size``, augmentation is the light one common to small-image metric learning: a
random crop of the original size from the image zero-padded by ``pad`` pixels (default
max(1, min(H, W) // 8), 4 for 32x32 as in CIFAR training, 3 for 28x28, 1 for 8x8). With
``crop_size`` S it is the natural-image one of "A Metric Learning Reality Check" (Musgrave et al.
2020) and torchvision's ImageNet training: RandomResizedCrop to S x S (a box of 0.16 to 1 of the
image's area and aspect ratio 3/4 to 4/3, resized bilinearly), and evaluation (and training without
``augment``) sees the S x S centre crop. Either adds a horizontal flip with probability 0.5 when
the dataset allows it (``LabeledImages.hflip``). Randomness comes from a seeded generator on the
device, so augmented batches are reproducible.

A split is kept whole on the device (gathered there once) when its uint8 size fits the resident
budget: ``resident_mb`` when set, else a quarter of the memory measured free on the device (on
CUDA ``torch.cuda.mem_get_info``; on the CPU and MPS, available RAM). A larger split streams: each
batch's rows are gathered from the dataset's store (the decoded-image cache file) into reused
(pinned, for CUDA) host buffers by a background thread, ``PREFETCH_DEPTH`` batches ahead of the step
loop, copied to the device and augmented there. Memory then holds ``PREFETCH_DEPTH + 2`` batches,
not the split.
"""

from __future__ import annotations

import math
import os
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence

import torch
import torch.nn.functional as F

from experiments.data.base import LabeledImages

PREFETCH_DEPTH = 3  # batches gathered ahead of the step loop when streaming
GATHER_BYTES = 64 << 20  # the host chunk when a split is gathered whole onto a CUDA device

RRC_SCALE = (0.16, 1.0)  # RandomResizedCrop area range (Musgrave et al. 2020; torchvision: 0.08)
RRC_RATIO = (3 / 4, 4 / 3)  # aspect ratio (width / height) range
RRC_TRIES = 10  # boxes drawn per image before the fallback, as torchvision
RESIDENT_SHARE = 4  # auto budget: 1 / RESIDENT_SHARE of the free device memory


def resident_budget(device: torch.device, resident_mb: float = 0) -> int:
    """The bytes of uint8 images a split may take to be kept whole on ``device``: ``resident_mb``
    MiB when set, else 1 / ``RESIDENT_SHARE`` of the memory free there now."""
    if resident_mb:
        return int(resident_mb * (1 << 20))
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // RESIDENT_SHARE
    try:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf figure: keep whole, as before streaming
        return 1 << 62
    return free // RESIDENT_SHARE


def prefetch(function: Callable, items: Iterable, depth: int = PREFETCH_DEPTH) -> Iterator[tuple]:
    """``(item, function(item))`` for each of ``items``, computed up to ``depth`` items ahead in a
    background thread (which also iterates ``items``); its errors are raised here. Closing the
    iterator stops the thread."""
    results: queue.Queue = queue.Queue(maxsize=depth)
    stop, finished = threading.Event(), object()

    def put(value) -> None:
        while not stop.is_set():
            try:
                results.put(value, timeout=0.1)
                return
            except queue.Full:
                continue

    def work() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                put((item, function(item)))
        except BaseException as exc:  # handed to the consumer, which raises it
            put((finished, exc))
            return
        put((finished, None))

    thread = threading.Thread(target=work, name="tripletlab-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, value = results.get()
            if item is finished:
                if value is not None:
                    raise value
                return
            yield item, value
    finally:
        stop.set()
        thread.join()


class HostBuffers:
    """The reused host buffers of a streamed split: step ``s`` fills buffer ``s % count``.

    With ``count = depth + 2`` for a prefetch queue of ``depth`` a buffer is refilled only after
    its batch left the queue and the consumer moved on to the next one; on CUDA ``fill`` also waits
    for the buffer's copy to the device, marked by ``copied``, to finish.
    """

    def __init__(self, split: LabeledImages, count: int, pin: bool):
        self.split, self.pin = split, pin
        self.buffers: list[torch.Tensor | None] = [None] * count
        self.copies: list[torch.cuda.Event | None] = [None] * count

    def fill(self, step_and_indices: tuple[int, torch.Tensor]) -> torch.Tensor:
        """The split's images at the indices, gathered into the step's buffer."""
        step, indices = step_and_indices
        slot, count = step % len(self.buffers), len(indices)
        if self.copies[slot] is not None:
            self.copies[slot].synchronize()
        buffer = self.buffers[slot]
        if buffer is None or buffer.shape[0] < count:
            buffer = torch.empty((count, *self.split.image_shape), dtype=torch.uint8, pin_memory=self.pin)
            self.buffers[slot] = buffer
        return self.split.gather(torch.as_tensor(indices, dtype=torch.int64), out=buffer[:count])

    def copied(self, step: int) -> None:
        """Mark the step's buffer as being copied to the device (on CUDA, by the current stream)."""
        if self.pin:
            event = torch.cuda.Event()
            event.record()
            self.copies[step % len(self.buffers)] = event


def _channel_tensor(values: Sequence[float], channels: int, key: str, device: torch.device) -> torch.Tensor:
    values = tuple(float(v) for v in values)
    if len(values) != channels:
        raise ValueError(f"{key} needs one value per channel ({channels}); got {len(values)}: {values}")
    return torch.tensor(values, dtype=torch.float32, device=device).view(1, channels, 1, 1)


class DeviceImages:
    """A split resident on ``device``: ``batch(indices) -> (float32 images, int64 labels)``.

    Images are normalised with ``mean``/``std`` if given, else the split's own recorded training
    statistics (``LabeledImages.mean``/``std``, set by ``load_dataset``), else statistics of this
    split. ``augment`` turns on the random crop (and flip where ``split.hflip``); ``crop_size`` > 0
    makes it a random resized crop to that side, and unaugmented batches are centre crops.
    ``channels=3`` turns grey images into 3 channels, each normalised with its own statistic
    (ImageNet statistics on grey data). ``resident_mb`` is the largest split kept whole on the
    device (0: measured, see ``resident_budget``); ``images`` is ``None`` for a streamed split.
    """

    def __init__(
        self,
        split: LabeledImages,
        device: str | torch.device,
        augment: bool = False,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        seed: int = 0,
        pad: int | None = None,
        crop_size: int = 0,
        channels: int | None = None,
        scale: tuple[float, float] = RRC_SCALE,
        ratio: tuple[float, float] = RRC_RATIO,
        resident_mb: float = 0,
    ):
        self.device = torch.device(device)
        if isinstance(resident_mb, bool) or not isinstance(resident_mb, (int, float)) or not resident_mb >= 0:
            raise ValueError(f"resident_mb must be a number >= 0 (0 = measured); got {resident_mb!r}")
        self.split = split
        self.pin = self.device.type == "cuda"
        self.streams = split.nbytes > resident_budget(self.device, resident_mb)
        self.images = None if self.streams else self._whole(split)
        self.labels = split.labels.to(self.device)
        self.augment = bool(augment)
        self.hflip = bool(split.hflip)
        stored, height, width = split.image_shape
        self.height, self.width = height, width
        self.channels = stored if channels is None else int(channels)
        if self.channels != stored and (stored, self.channels) != (1, 3):
            raise ValueError(
                f"channels={channels}: only grey images can be repeated (to 3 channels); these have {stored}"
            )
        self.crop_size = int(crop_size)
        if not 0 <= self.crop_size <= min(height, width):
            side = min(height, width)
            raise ValueError(
                f"dataset.crop_size={crop_size} must be in [0, {side}] (0 = no crop) for "
                f"{height} x {width} images; raise dataset.image_size to resize them on loading"
            )
        if not (0 < scale[0] <= scale[1] <= 1 and 0 < ratio[0] <= ratio[1]):
            raise ValueError(
                "random resized crop needs 0 < scale[0] <= scale[1] <= 1 and "
                f"0 < ratio[0] <= ratio[1]; got scale={scale}, ratio={ratio}"
            )
        self.scale, self.log_ratio = tuple(scale), (math.log(ratio[0]), math.log(ratio[1]))
        if mean is None or std is None:
            own_mean, own_std = (
                (split.mean, split.std)
                if split.mean is not None and split.std is not None
                else split.channel_stats()
            )
            mean = own_mean if mean is None else mean
            std = own_std if std is None else std
        if stored == 1:  # a grey statistic holds for every repeated channel
            mean, std = (tuple(v) * self.channels if len(tuple(v)) == 1 else v for v in (mean, std))
        self.mean = _channel_tensor(mean, self.channels, "mean", self.device)
        self.std = _channel_tensor(std, self.channels, "std", self.device)
        if bool((self.std <= 0).any()):
            raise ValueError(f"std must be positive per channel; got {tuple(self.std.flatten().tolist())}")
        self.pad = max(1, min(height, width) // 8) if pad is None else int(pad)
        if self.pad < 0:
            raise ValueError(f"pad must be >= 0 pixels; got {pad}")
        self.generator = torch.Generator(device=self.device).manual_seed(int(seed))
        self._rows = torch.arange(height, device=self.device)
        self._cols = torch.arange(width, device=self.device)

    def _whole(self, split: LabeledImages) -> torch.Tensor:
        """The split's images on the device: on the CPU ``split.images`` (one gather, or a tensor
        store without rows as is); on an accelerator gathered in chunks, so host memory holds one."""
        if self.device.type == "cpu":
            return split.images
        out = torch.empty((len(split), *split.image_shape), dtype=torch.uint8, device=self.device)
        chunk = max(1, GATHER_BYTES // max(1, math.prod(split.image_shape)))
        for start in range(0, len(split), chunk):
            indices = torch.arange(start, min(start + chunk, len(split)))
            out[start : start + chunk].copy_(split.gather(indices, pin=self.pin), non_blocking=self.pin)
        return out

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def _host_pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """A streamed split's uint8 images at ``indices``, gathered on the host (pinned for CUDA)."""
        return self.split.gather(torch.as_tensor(indices, dtype=torch.int64).cpu(), pin=self.pin)

    def _crop_and_flip(self, images: torch.Tensor) -> torch.Tensor:
        """Random crops of the zero-padded images, flipped where drawn; one gather on the device."""
        n, channels = images.shape[:2]
        padded = F.pad(images, (self.pad,) * 4)
        shift = torch.randint(0, 2 * self.pad + 1, (2, n), generator=self.generator, device=self.device)
        cols = self._cols.expand(n, -1)
        if self.hflip:
            flip = torch.rand(n, generator=self.generator, device=self.device) < 0.5
            cols = torch.where(flip.unsqueeze(1), cols.flip(1), cols)
        rows = shift[0].unsqueeze(1) + self._rows
        cols = shift[1].unsqueeze(1) + cols
        # One flat gather per image (several times faster than 4-d advanced indexing on CPU).
        flat = (
            (rows.unsqueeze(2) * padded.shape[-1] + cols.unsqueeze(1)).view(n, 1, -1).expand(n, channels, -1)
        )
        return padded.flatten(2).gather(2, flat).view(n, channels, *images.shape[2:])

    def crop_boxes(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RandomResizedCrop boxes as torchvision draws them: area share ``scale`` and log-uniform
        aspect ``ratio``, the first of ``RRC_TRIES`` draws that fits the image, else the whole image
        clipped to the ratio range; a uniform position. Returns int64 ``(n, 4)`` boxes
        (left, top, width, height) and a bool ``(n,)`` flip flag, all on the device."""
        height, width = self.height, self.width
        shape, options = (n, RRC_TRIES), {"generator": self.generator, "device": self.device}
        area = torch.empty(shape, device=self.device).uniform_(*self.scale, generator=self.generator)
        area *= height * width
        aspect = torch.empty(shape, device=self.device).uniform_(*self.log_ratio, generator=self.generator)
        aspect.exp_()
        box_w, box_h = (area * aspect).sqrt_().round_(), (area / aspect).sqrt_().round_()
        fits = (box_w >= 1) & (box_w <= width) & (box_h >= 1) & (box_h <= height)
        first = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # the first fitting draw
        low, high = math.exp(self.log_ratio[0]), math.exp(self.log_ratio[1])
        fallback_w = round(height * high) if width / height > high else width
        fallback_h = round(width / low) if width / height < low else height
        found = fits.any(dim=1)
        box_w = torch.where(found, box_w.gather(1, first).squeeze(1), float(fallback_w))
        box_h = torch.where(found, box_h.gather(1, first).squeeze(1), float(fallback_h))
        left = (torch.rand(n, **options) * (width - box_w + 1)).floor_()
        top = (torch.rand(n, **options) * (height - box_h + 1)).floor_()
        flip = torch.rand(n, **options) < 0.5
        if not self.hflip:
            flip.zero_()
        return torch.stack([left, top, box_w, box_h], dim=1).long(), flip

    def _resized_crops(self, images: torch.Tensor) -> torch.Tensor:
        """Random resized crops (flipped where drawn) to ``crop_size``: one affine grid sample for the
        batch, bilinear without antialiasing. Returns float images in [0, 255] units."""
        n, channels, height, width = images.shape
        boxes, flip = self.crop_boxes(n)
        left, top, box_w, box_h = boxes.float().unbind(1)
        # Output pixel u in [-1, 1] (pixel edges, align_corners=False) samples the box's x0 + (u + 1) w / 2.
        theta = torch.zeros(n, 2, 3, device=self.device)
        theta[:, 0, 0] = torch.where(flip, -box_w, box_w) / width
        theta[:, 0, 2] = (2 * left + box_w) / width - 1
        theta[:, 1, 1] = box_h / height
        theta[:, 1, 2] = (2 * top + box_h) / height - 1
        grid = F.affine_grid(theta, [n, channels, self.crop_size, self.crop_size], align_corners=False)
        return F.grid_sample(
            images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False
        )

    def centre_crop(self, images: torch.Tensor) -> torch.Tensor:
        """The ``crop_size`` square at the centre (top-left corner at ((H - S) // 2, (W - S) // 2))."""
        top, left = ((side - self.crop_size) // 2 for side in images.shape[-2:])
        return images[..., top : top + self.crop_size, left : left + self.crop_size]

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (or float ones in [0, 255] units) -> float32 ``(x / 255 - mean) / std``; grey
        images broadcast to ``channels`` against the statistics."""
        return (images.float().div_(255.0) - self.mean) / self.std

    def _finish(self, images: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment (if ``augment``) and normalise uint8 ``images`` on the device; their labels."""
        if self.crop_size and self.augment and images.shape[0] > 0:
            images = self._resized_crops(images)
        elif self.crop_size:
            images = self.centre_crop(images)
        elif self.augment and images.shape[0] > 0:
            images = self._crop_and_flip(images)
        return self.normalise(images), self.labels[indices]

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The images and labels at ``indices`` (any device), augmented if ``augment``."""
        indices = torch.as_tensor(indices, dtype=torch.int64).to(self.device, non_blocking=True)
        if self.streams:
            images = self._host_pixels(indices).to(self.device, non_blocking=self.pin)
        else:
            images = self.images[indices]
        return self._finish(images, indices)

    def _streamed(self, index_batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(indices, uint8 images on the device)`` for each of ``index_batches``, gathered ahead by
        a background thread into reused host buffers."""
        buffers = HostBuffers(self.split, PREFETCH_DEPTH + 2, self.pin)
        for (step, indices), host in prefetch(buffers.fill, enumerate(index_batches), PREFETCH_DEPTH):
            images = host.to(self.device, non_blocking=self.pin)
            buffers.copied(step)
            yield torch.as_tensor(indices, dtype=torch.int64), images

    def batches(self, index_batches: Iterable[torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``batch(indices)`` for each of ``index_batches`` (a sampler); a streamed split gathers them
        ahead in a background thread."""
        if not self.streams:
            yield from (self.batch(indices) for indices in index_batches)
            return
        for indices, images in self._streamed(index_batches):
            yield self._finish(images, indices.to(self.device, non_blocking=True))

    def iterate(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Every image once, in order, in chunks of ``batch_size``, never augmented (evaluation),
        centre-cropped to ``crop_size`` when set."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}")
        chunks = (
            torch.arange(start, min(start + batch_size, len(self)))
            for start in range(0, len(self), batch_size)
        )
        if self.streams:
            pairs = self._streamed(chunks)
        else:
            pairs = ((indices, self.images[indices[0] : indices[-1] + 1]) for indices in chunks)
        for indices, images in pairs:
            images = self.centre_crop(images) if self.crop_size else images
            yield self.normalise(images), self.labels[indices[0] : indices[-1] + 1]


def training_batches(data, index_batches: Iterable[torch.Tensor]) -> Iterator:
    """``data.batch(indices)`` for each of ``index_batches``; through ``DeviceImages.batches`` (which
    prefetches a streamed split) when ``data`` is one."""
    if isinstance(data, DeviceImages):
        return data.batches(index_batches)
    return (data.batch(indices) for indices in index_batches)
