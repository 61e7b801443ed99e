"""Embedding networks: a small CNN for small grey images and a small ResNet for larger ones.

Both end in a linear embedding head with optional L2 normalisation. Input channels and size come
from the dataset; ``model.name=auto`` picks the CNN up to 32 pixels a side and the ResNet above.
The ResNet follows He et al. 2016 ("Deep Residual Learning", basic blocks, BN after each conv)
at CIFAR width (16-32-64-128 channels), with a strided stem for large inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from experiments.models.backbones import build_backbone, is_backbone
from experiments.models.head import EmbeddingHead, reset_parameters

SMALL_IMAGE_SIDE = 32  # auto: CNN up to this side, ResNet above


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """Three conv-BN-ReLU stages (32, 64, 128 channels), 2x2 max-pooling after the first two while
    the feature map is at least 4 pixels a side, global average pooling, then the embedding head.
    About 0.1M parameters: on 28x28 inputs 28 -> 14 -> 7 pixels, on 8x8 digits 8 -> 4 -> 2. The
    last stage keeps its resolution: a third pool (7 -> 3) cost a third of the MAP@R on unseen
    characters against the textbook network of the same widths (benchmarks/bench_reference.py)."""

    POOLED_STAGES = 2

    def __init__(
        self, in_channels: int, image_size: tuple[int, int], embedding_dim: int, normalize: bool
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        side = min(image_size)
        cin = in_channels
        for stage, cout in enumerate((32, 64, 128)):
            layers += _conv_bn_relu(cin, cout)
            if stage < self.POOLED_STAGES and side >= 4:
                layers.append(nn.MaxPool2d(2))
                side //= 2
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.head = EmbeddingHead(cin, embedding_dim, normalize)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with an identity (or 1x1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x), inplace=True)


class SmallResNet(nn.Module):
    """A ResNet-10-style network: stem (stride 2 above 64 pixels a side), four stages of one basic
    block each (16, 32, 64, 128 channels; stride 2 from the second), global average pooling."""

    def __init__(
        self, in_channels: int, image_size: tuple[int, int], embedding_dim: int, normalize: bool
    ) -> None:
        super().__init__()
        stem_stride = 2 if min(image_size) > 64 else 1
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, stride=stem_stride, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        widths = (16, 32, 64, 128)
        self.stages = nn.Sequential(
            *(BasicBlock(widths[max(i - 1, 0)], w, stride=1 if i == 0 else 2) for i, w in enumerate(widths))
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = EmbeddingHead(widths[-1], embedding_dim, normalize)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stages(self.stem(images))))


MODELS = {"cnn": SmallCNN, "resnet": SmallResNet}


def build_model(
    name: str,
    in_channels: int,
    image_size: tuple[int, int],
    embedding_dim: int,
    normalize: bool = True,
    seed: int = 0,
    freeze_bn: bool = False,
) -> nn.Module:
    """The embedding network ``name`` (``auto``, ``cnn``, ``resnet``, or an ImageNet backbone of
    ``experiments.models.backbones``: ``resnet18``, ``resnet50``, ``torchvision:<arch>``, ``timm:<arch>``),
    initialised from ``seed``; ``freeze_bn`` keeps a backbone's BatchNorm frozen."""
    if name == "auto":
        name = "cnn" if max(image_size) <= SMALL_IMAGE_SIDE else "resnet"
    if name not in MODELS and not is_backbone(name):
        raise ValueError(
            f"unknown model {name!r}; choose one of auto, {', '.join(MODELS)}, resnet18, "
            "resnet50, torchvision:<arch> or timm:<arch>"
        )
    if in_channels < 1 or min(image_size) < 1:
        raise ValueError(f"images must have >= 1 channel and positive size, got {in_channels} x {image_size}")
    if is_backbone(name):
        if in_channels not in (1, 3):
            raise ValueError(f"model.name={name} takes RGB or grey images, got {in_channels} channels")
        return build_backbone(name, embedding_dim, normalize, freeze_bn, seed)
    if freeze_bn:
        raise ValueError(
            "model.freeze_bn freezes pretrained BatchNorm statistics: use it with resnet18, "
            f"resnet50, torchvision:<arch> or timm:<arch>, not {name}"
        )
    model = MODELS[name](in_channels, tuple(image_size), embedding_dim, normalize)
    reset_parameters(model, torch.Generator().manual_seed(seed))
    return model
