"""Device-resident images: normalisation, seeded crop/flip augmentation, evaluation chunks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.datasets.base import LabeledImages
from experiments.device_data import DeviceImages

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def split(n: int = 12, channels: int = 3, size: tuple[int, int] = (6, 7), hflip: bool = True, **stats) -> LabeledImages:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, *size), generator=generator, dtype=torch.uint8)
    return LabeledImages(images, torch.arange(n) % 4, hflip=hflip, **stats)


def candidates(image: np.ndarray, pad: int, flips: bool) -> list[np.ndarray]:
    """Every crop of the zero-padded image (and of its mirror image when flips are allowed)."""
    _, height, width = image.shape
    sources = [image, image[:, :, ::-1]] if flips else [image]
    out = []
    for source in sources:
        padded = np.pad(source, ((0, 0), (pad, pad), (pad, pad)))
        for dy in range(2 * pad + 1):
            for dx in range(2 * pad + 1):
                out.append(padded[:, dy:dy + height, dx:dx + width])
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_batch_without_augmentation_is_the_normalised_images(device):
    data = split(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    store = DeviceImages(data, device, augment=False)
    indices = torch.tensor([3, 0, 7, 3])
    images, labels = store.batch(indices)
    assert images.dtype == torch.float32 and images.device.type == device and images.shape == (4, 3, 6, 7)
    assert labels.dtype == torch.int64 and labels.tolist() == data.labels[indices].tolist()
    expected = (data.images[indices].double() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) \
        / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    torch.testing.assert_close(images.cpu().double(), expected, atol=1e-5, rtol=1e-5)
    assert store.images.dtype == torch.uint8 and store.images.device.type == device


def test_own_statistics_normalise_to_zero_mean_unit_std():
    store = DeviceImages(split(n=64), "cpu")
    images = torch.cat([x for x, _ in store.iterate(10)])
    torch.testing.assert_close(images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(images.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-4, rtol=0)


def test_explicit_statistics_override_the_recorded_ones():
    data = split(mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    store = DeviceImages(data, "cpu", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    images, _ = store.batch(torch.tensor([1]))
    torch.testing.assert_close(images, data.images[1:2].float() / 255 * 2 - 1, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"mean needs one value per channel \(3\); got 1"):
        DeviceImages(data, "cpu", mean=(0.5,), std=(0.5, 0.5, 0.5))


@pytest.mark.parametrize("hflip", [True, False])
def test_augmented_images_are_padded_crops_and_flips_only_where_allowed(hflip):
    data = split(n=40, size=(8, 9), hflip=hflip, mean=(0.0,) * 3, std=(1 / 255,) * 3)  # batch = raw pixels
    store = DeviceImages(data, "cpu", augment=True, seed=3)
    assert store.pad == 1
    images, _ = store.batch(torch.arange(40))
    changed = flipped = 0
    for original, augmented in zip(data.images.numpy(), images.round().to(torch.uint8).numpy()):
        assert any(np.array_equal(augmented, c) for c in candidates(original, 1, hflip))
        changed += not np.array_equal(augmented, original)
        flipped += any(np.array_equal(augmented, c) for c in candidates(original, 1, True)[9:])
    assert changed > 20
    assert (flipped > 5) if hflip else flipped == 0


def test_augmentation_is_deterministic_by_seed():
    data = split(n=16)
    a, b, c = (DeviceImages(data, "cpu", augment=True, seed=s, pad=2) for s in (5, 5, 6))
    batch = torch.arange(16)
    first_a, first_b, first_c = a.batch(batch)[0], b.batch(batch)[0], c.batch(batch)[0]
    assert torch.equal(first_a, first_b) and not torch.equal(first_a, first_c)
    second_a = a.batch(batch)[0]
    assert not torch.equal(second_a, first_a)  # the generator moves on
    assert torch.equal(b.batch(batch)[0], second_a)  # and the whole sequence repeats


def test_iterate_covers_every_image_in_order_without_augmentation():
    data = split(n=11)
    store = DeviceImages(data, "cpu", augment=True)
    chunks = list(store.iterate(4))
    assert [len(labels) for _, labels in chunks] == [4, 4, 3]
    plain = DeviceImages(data, "cpu", augment=False)
    torch.testing.assert_close(torch.cat([x for x, _ in chunks]), plain.batch(torch.arange(11))[0])
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        next(store.iterate(0))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_match_cpu_batches():
    data = split(n=20)
    cpu, cuda = DeviceImages(data, "cpu"), DeviceImages(data, "cuda")
    indices = torch.tensor([4, 19, 0])
    torch.testing.assert_close(cuda.batch(indices.cuda())[0].cpu(), cpu.batch(indices)[0])
    augmented, _ = DeviceImages(data, "cuda", augment=True, seed=1).batch(indices)
    assert augmented.device.type == "cuda" and augmented.shape == (3, 3, 6, 7)
