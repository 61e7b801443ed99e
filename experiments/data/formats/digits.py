"""scikit-learn's bundled handwritten digits (UCI optdigits test set): 1,797 images, 8x8, 10 classes.

Pixels are counts 0..16 of set bits in 4x4 blocks of the original 32x32 bitmaps; they are scaled
to uint8 0..255. Ships with scikit-learn, so nothing is read from disk or the network.
"""

from __future__ import annotations

import torch

from experiments.data.base import SourceImages


def load_digits(path=None) -> SourceImages:
    """All 1,797 digits as (N, 1, 8, 8) uint8; ``path`` is ignored (the data is bundled)."""
    from sklearn.datasets import load_digits as sklearn_digits  # heavy import, only when used

    bunch = sklearn_digits()
    pixels = torch.as_tensor(bunch.images, dtype=torch.float64)  # (N, 8, 8), values 0..16
    images = (pixels * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).unsqueeze(1)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return SourceImages(images, labels, class_names={i: str(i) for i in range(10)})
