"""Device-resident images: normalisation, seeded crop/flip augmentation, evaluation chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from experiments.data.base import LabeledImages
from experiments.data.device_data import DeviceImages

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def split(
    n: int = 12, channels: int = 3, size: tuple[int, int] = (6, 7), hflip: bool = True, **stats
) -> LabeledImages:
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
                out.append(padded[:, dy : dy + height, dx : dx + width])
    return out


@pytest.mark.parametrize("device", DEVICES)
def test_batch_without_augmentation_is_the_normalised_images(device):
    data = split(mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    store = DeviceImages(data, device, augment=False)
    indices = torch.tensor([3, 0, 7, 3])
    images, labels = store.batch(indices)
    assert images.dtype == torch.float32 and images.device.type == device and images.shape == (4, 3, 6, 7)
    assert labels.dtype == torch.int64 and labels.tolist() == data.labels[indices].tolist()
    expected = (
        data.images[indices].double() / 255 - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    ) / torch.tensor([0.2, 0.25, 0.3]).view(1, 3, 1, 1)
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


def raw_pixels(n: int, size: tuple[int, int], channels: int = 3, hflip: bool = True) -> LabeledImages:
    """Images whose normalised batch is the pixels themselves (mean 0, std 1/255)."""
    return split(
        n=n, channels=channels, size=size, hflip=hflip, mean=(0.0,) * channels, std=(1 / 255,) * channels
    )


def resized_crop(image: torch.Tensor, box: list[int], side: int, flip: bool) -> torch.Tensor:
    """The oracle: crop the box, resize it with torch's own bilinear interpolation, mirror it."""
    left, top, width, height = box
    crop = image[None, :, top : top + height, left : left + width].double()
    out = F.interpolate(crop, size=(side, side), mode="bilinear", align_corners=False, antialias=False)[0]
    return out.flip(-1) if flip else out


@pytest.mark.parametrize("hflip", [True, False])
def test_random_resized_crops_are_the_resized_boxes(hflip):
    data = raw_pixels(48, (32, 40), hflip=hflip)
    store = DeviceImages(data, "cpu", augment=True, seed=4, crop_size=8)
    state = store.generator.get_state()
    boxes, flips = store.crop_boxes(48)
    store.generator.set_state(state)  # the batch draws the same boxes
    images, _ = store.batch(torch.arange(48))
    assert images.shape == (48, 3, 8, 8)
    for image, out, box, flip in zip(data.images, images.double(), boxes.tolist(), flips.tolist()):
        # Every box is at least 8 pixels a side here (area >= 0.16 of 32 x 40), so no edge clamping.
        torch.testing.assert_close(out, resized_crop(image, box, 8, flip), atol=1e-3, rtol=0)
    assert (int(flips.sum()) > 10) if hflip else not bool(flips.any())


def test_random_resized_crop_boxes_follow_the_scale_and_ratio_ranges():
    store = DeviceImages(raw_pixels(4, (60, 80)), "cpu", augment=True, seed=0, crop_size=16)
    boxes, _ = store.crop_boxes(4000)
    left, top, width, height = boxes.double().unbind(1)
    assert bool(((left >= 0) & (top >= 0) & (left + width <= 80) & (top + height <= 60)).all())
    area, aspect = width * height / (60 * 80), width / height
    assert 0.14 < float(area.min()) < 0.2 and float(area.max()) > 0.95  # 0.16..1, up to rounding
    assert 0.7 < float(aspect.min()) < 0.8 and 1.3 < float(aspect.max()) < 1.4  # 3/4..4/3
    for start, slack in ((left, 80 - width), (top, 60 - height)):  # uniform positions: 0..slack
        where = start[slack >= 10] / slack[slack >= 10]
        assert float(where.min()) == 0 and float(where.max()) > 0.97 and abs(float(where.mean()) - 0.5) < 0.03


@pytest.mark.parametrize("size, box_size", [((10, 60), (13, 10)), ((60, 10), (10, 13))])
def test_random_resized_crop_falls_back_to_the_whole_image_clipped_to_the_ratio(size, box_size):
    # No box of 0.9..1 of the area with aspect 3/4..1.3 fits a 10-pixel strip: torchvision's fallback
    # is the whole short side with the nearest allowed aspect, 10 * 1.3 = 13 or 10 / 0.75 = 13.
    store = DeviceImages(
        raw_pixels(2, size), "cpu", augment=True, crop_size=10, scale=(0.9, 1.0), ratio=(0.75, 1.3)
    )
    boxes, _ = store.crop_boxes(64)
    assert {tuple(b) for b in boxes[:, 2:].tolist()} == {box_size}
    inside = (boxes[:, :2] >= 0) & (boxes[:, :2] + boxes[:, 2:] <= torch.tensor(size[::-1]))
    assert bool(inside.all())


def test_random_resized_crops_are_reproducible_by_seed():
    data = split(n=16, size=(20, 20))
    a, b, c = (DeviceImages(data, "cpu", augment=True, seed=s, crop_size=12) for s in (7, 7, 8))
    indices = torch.arange(16)
    first_a, first_b, first_c = a.batch(indices)[0], b.batch(indices)[0], c.batch(indices)[0]
    assert torch.equal(first_a, first_b) and not torch.equal(first_a, first_c)
    second_a, second_b = a.batch(indices)[0], b.batch(indices)[0]
    assert torch.equal(second_a, second_b) and not torch.equal(second_a, first_a)  # moving on in step


@pytest.mark.parametrize(
    "size, crop, corner", [((9, 12), 5, (2, 3)), ((8, 8), 8, (0, 0)), ((7, 10), 4, (1, 3))]
)
def test_centre_crop_is_exact_for_evaluation_and_plain_training(size, crop, corner):
    data = raw_pixels(5, size)
    top, left = corner
    expected = data.images[:, :, top : top + crop, left : left + crop].float()
    store = DeviceImages(data, "cpu", augment=False, crop_size=crop)
    torch.testing.assert_close(torch.cat([x for x, _ in store.iterate(2)]), expected, atol=1e-3, rtol=0)
    torch.testing.assert_close(store.batch(torch.arange(5))[0], expected, atol=1e-3, rtol=0)
    augmented = DeviceImages(data, "cpu", augment=True, crop_size=crop)  # evaluation never augments
    torch.testing.assert_close(torch.cat([x for x, _ in augmented.iterate(5)]), expected, atol=1e-3, rtol=0)


def test_grey_images_repeat_to_three_channels_before_normalising():
    data = split(n=6, channels=1, size=(5, 5))
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    store = DeviceImages(data, "cpu", mean=mean, std=std, channels=3)
    images, _ = store.batch(torch.arange(6))
    grey = data.images.double() / 255
    expected = (grey - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(images.double(), expected, atol=1e-5, rtol=0)
    own = DeviceImages(split(n=6, channels=1, size=(5, 5), mean=(0.5,), std=(0.25,)), "cpu", channels=3)
    assert own.mean.flatten().tolist() == [0.5] * 3 and next(own.iterate(6))[0].shape == (6, 3, 5, 5)
    with pytest.raises(ValueError, match=r"only grey images can be repeated \(to 3 channels\); these have 3"):
        DeviceImages(split(n=2), "cpu", channels=1)


def test_bad_crop_options_are_clear_errors():
    with pytest.raises(
        ValueError,
        match=r"dataset.crop_size=9 must be in \[0, 6\] \(0 = no crop\) for 6 x 7 "
        r"images; raise dataset.image_size to resize them on loading",
    ):
        DeviceImages(split(n=2), "cpu", crop_size=9)
    with pytest.raises(ValueError, match=r"0 < scale\[0\] <= scale\[1\] <= 1"):
        DeviceImages(split(n=2), "cpu", crop_size=4, scale=(0.5, 0.2))


@pytest.mark.parametrize("device", DEVICES)
def test_random_resized_crops_stay_on_the_device(device):
    data = split(n=10, size=(24, 24))
    store = DeviceImages(data, device, augment=True, seed=2, crop_size=16)
    images, labels = store.batch(torch.arange(10))
    assert images.device.type == device and images.shape == (10, 3, 16, 16) and labels.device.type == device
    assert bool(torch.isfinite(images).all())
