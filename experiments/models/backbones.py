"""ImageNet backbones for metric learning, with pretrained weights read from local files.

``resnet18`` and ``resnet50`` are He et al. 2016 ("Deep Residual Learning for Image Recognition"):
basic blocks [2, 2, 2, 2] and bottleneck blocks [3, 4, 6, 3], in torchvision's "v1.5" layout (the
bottleneck's stride on its 3x3 convolution). Their state-dict names are torchvision's (``conv1``,
``bn1``, ``layer1.0.conv1``, ``layer2.0.downsample.0``...), so a torchvision or timm checkpoint
loads directly; the classifier ``fc`` is the :class:`~experiments.models.image.EmbeddingHead`.
``torchvision:<arch>`` and ``timm:<arch>`` build through those libraries with the classifier
swapped for the same head. "A Metric Learning Reality Check" (Musgrave et al. 2020) trains from
ImageNet weights with BatchNorm frozen (``freeze_bn``) and ImageNet input statistics.
"""

from __future__ import annotations

import hashlib
import importlib
from pathlib import Path

import torch
from torch import nn

from experiments.models.head import EmbeddingHead, reset_parameters

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LIBRARIES = {"torchvision": "torchvision.models", "timm": "timm"}
# Where the ImageNet-1k weights of the built-in networks are published (torchvision's model zoo).
WEIGHT_URLS = {
    "resnet18": "https://download.pytorch.org/models/resnet18-f37072fd.pth",
    "resnet50": "https://download.pytorch.org/models/resnet50-0676ba61.pth",
}
_SHOWN = 5  # offending keys listed in an error


class ImageBackbone(nn.Module):
    """A 3-channel ImageNet network ending in an embedding head.

    Grey (1-channel) inputs are repeated to 3 channels (a view, no copy). With ``freeze_bn`` every
    BatchNorm layer stays in eval mode through ``train()`` (running statistics frozen) and its
    affine parameters get no gradient. ``weights_module()`` is the module a checkpoint's names
    refer to; its keys under ``classifier`` are the ImageNet classifier, never loaded. Subclasses
    define ``features(images) -> (N, F)`` and the head ``fc``.
    """

    in_channels = 3

    def __init__(self, arch: str, classifier: str) -> None:
        super().__init__()
        self.arch = arch
        self.classifier = classifier
        self.freeze_bn = False

    def weights_module(self) -> nn.Module:
        return self

    def batch_norms(self) -> list[nn.Module]:
        return [m for m in self.weights_module().modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def set_freeze_bn(self, freeze: bool) -> ImageBackbone:
        self.freeze_bn = bool(freeze)
        for norm in self.batch_norms():
            for param in norm.parameters():
                param.requires_grad_(not self.freeze_bn)
        return self.train(self.training)

    def train(self, mode: bool = True) -> ImageBackbone:
        super().train(mode)
        if self.freeze_bn:
            for norm in self.batch_norms():
                norm.eval()
        return self

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, self.in_channels, -1, -1)
        return self.fc(self.features(images))


def _conv(cin: int, cout: int, kernel: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)


def _downsample(cin: int, cout: int, stride: int) -> nn.Sequential | None:
    """The 1x1 projection shortcut where the block changes width or resolution, else ``None``."""
    if stride == 1 and cin == cout:
        return None
    return nn.Sequential(_conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))


class ResidualBlock(nn.Module):
    """Basic block: two 3x3 conv-BN layers (stride on the first), identity or projection shortcut."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv(cin, width, 3, stride), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3), nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, width, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + shortcut)


class BottleneckBlock(nn.Module):
    """Bottleneck: 1x1 reduce, 3x3 (carrying the stride, v1.5), 1x1 expand by 4; BN after each."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1, self.bn1 = _conv(cin, width, 1), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = _conv(width, width, 3, stride), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = _conv(width, cout, 1), nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = _downsample(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + shortcut)


class ImageNetResNet(ImageBackbone):
    """ImageNet ResNet: 7x7/2 stem and 3x3/2 max-pool, four stages of 64-128-256-512 block widths
    (stride 2 from the second), global average pooling, then the embedding head as ``fc``."""

    def __init__(
        self, arch: str, block: type[nn.Module], depths: tuple[int, ...], embedding_dim: int, normalize: bool
    ) -> None:
        super().__init__(arch, classifier="fc")
        self.conv1, self.bn1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin = 64
        for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), depths)):
            blocks = []
            for index in range(depth):
                blocks.append(block(cin, width, 2 if stage > 0 and index == 0 else 1))
                cin = width * block.expansion
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = EmbeddingHead(cin, embedding_dim, normalize)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.avgpool(x).flatten(1)


RESNETS = {"resnet18": (ResidualBlock, (2, 2, 2, 2)), "resnet50": (BottleneckBlock, (3, 4, 6, 3))}


class LibraryBackbone(ImageBackbone):
    """A torchvision or timm network (``trunk``, giving pooled features) with the embedding head."""

    def __init__(
        self, arch: str, trunk: nn.Module, features: int, classifier: str, embedding_dim: int, normalize: bool
    ) -> None:
        super().__init__(arch, classifier)
        self.trunk = trunk
        self.fc = EmbeddingHead(features, embedding_dim, normalize)

    def weights_module(self) -> nn.Module:
        return self.trunk

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images).flatten(1)


def is_backbone(name: str) -> bool:
    """Whether ``name`` is an ImageNet backbone (``resnet18``, ``resnet50``, ``<library>:<arch>``)."""
    library, sep, arch = name.partition(":")
    return name in RESNETS or (bool(sep) and library in LIBRARIES and bool(arch))


def import_library(library: str, arch: str):
    """The torchvision models package or timm, or a ``ValueError`` saying why it did not import."""
    try:
        return importlib.import_module(LIBRARIES[library])
    except Exception as exc:  # a torchvision built for another torch fails with RuntimeError, not ImportError
        raise ValueError(
            f"model.name={library}:{arch} needs {library}, which failed to import "
            f"({type(exc).__name__}: {exc}). Install a {library} build that matches torch "
            f"{torch.__version__} (pip install {library}), or use the built-in model.name=resnet18 or "
            "resnet50"
        ) from exc


def replace_classifier(network: nn.Module) -> tuple[str, int]:
    """Swap the last ``nn.Linear`` of ``network`` (its classifier) for an identity; returns its
    qualified name and input width."""
    linears = [(name, m) for name, m in network.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(
            f"{type(network).__name__} has no linear classifier to replace with the embedding head"
        )
    name, linear = linears[-1]
    parent_name, _, attribute = name.rpartition(".")
    setattr(network.get_submodule(parent_name), attribute, nn.Identity())
    return name, linear.in_features


def _library_backbone(name: str, embedding_dim: int, normalize: bool) -> LibraryBackbone:
    library, _, arch = name.partition(":")
    module = import_library(library, arch)
    if library == "timm":
        trunk = module.create_model(arch, pretrained=False, num_classes=0)
        classifier = getattr(trunk, "pretrained_cfg", {}).get("classifier", "fc")
        return LibraryBackbone(name, trunk, trunk.num_features, classifier, embedding_dim, normalize)
    trunk = module.get_model(arch, weights=None)
    classifier, features = replace_classifier(trunk)
    return LibraryBackbone(name, trunk, features, classifier, embedding_dim, normalize)


def build_backbone(
    name: str, embedding_dim: int, normalize: bool, freeze_bn: bool = False, seed: int = 0
) -> ImageBackbone:
    """The backbone ``name`` with a fresh embedding head, initialised from ``seed`` (the built-in
    ResNets as ``reset_parameters``, as torchvision's; library networks by their own scheme)."""
    if name in RESNETS:
        block, depths = RESNETS[name]
        model: ImageBackbone = ImageNetResNet(name, block, depths, embedding_dim, normalize)
        reset_parameters(model, torch.Generator().manual_seed(seed))
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = _library_backbone(name, embedding_dim, normalize)
    return model.set_freeze_bn(freeze_bn)


def _weights_hint(arch: str) -> str:
    if arch in WEIGHT_URLS:
        url = WEIGHT_URLS[arch]
        return (
            f"download the ImageNet weights {url.rsplit('/', 1)[-1]} from {url} on a machine with "
            "internet access, then pass its path"
        )
    library, _, name = arch.partition(":")
    if library == "timm":
        return (
            f"on a machine with internet access save timm.create_model({name!r}, pretrained=True)"
            ".state_dict() with torch.save, then pass that file's path"
        )
    return (
        f"download the file at torchvision.models.get_model_weights({name!r}).DEFAULT.url on a "
        "machine with internet access, then pass its path"
    )


def _tensors(checkpoint, path: str) -> dict[str, torch.Tensor]:
    """The state dict in a checkpoint: plain, or under ``state_dict`` / ``model``; ``module.`` stripped."""
    if isinstance(checkpoint, dict):
        for key in ("state_dict", "model"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise ValueError(
            f"model.weights={path!r} holds no state dict of tensors (a plain state dict, or one "
            "under 'state_dict' or 'model'); save one with torch.save(model.state_dict(), path)"
        )
    return {k.removeprefix("module."): v for k, v in checkpoint.items()}


def _listed(keys: list[str]) -> str:
    more = f" and {len(keys) - _SHOWN} more" if len(keys) > _SHOWN else ""
    return ", ".join(keys[:_SHOWN]) + more


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def load_backbone_weights(model: nn.Module, path: str) -> dict[str, str]:
    """Load pretrained backbone weights from the local file ``path`` into ``model``, never the
    classifier; returns what was loaded (``weights.sha256``, ``weights.tensors``, ``weights.skipped``,
    the classifier tensors left out) for the run's params. Nothing is ever downloaded."""
    if not isinstance(model, ImageBackbone):
        raise ValueError(
            f"model.weights needs an ImageNet backbone (resnet18, resnet50, torchvision:<arch>, "
            f"timm:<arch>); {type(model).__name__} has no pretrained weights"
        )
    file = Path(path).expanduser()
    if not file.is_file():
        raise ValueError(f"model.weights={path!r}: no such file; {_weights_hint(model.arch)}")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(
            f"model.weights={path!r} is not a torch checkpoint of tensors "
            f"({type(exc).__name__}: {exc}); {_weights_hint(model.arch)}"
        ) from None
    given = _tensors(checkpoint, path)

    def backbone(key: str) -> bool:
        return key != model.classifier and not key.startswith(model.classifier + ".")

    target = model.weights_module()
    expected = {k: v for k, v in target.state_dict().items() if backbone(k)}
    loaded = {k: v for k, v in given.items() if backbone(k)}
    # BatchNorm's step counter is absent from older checkpoints and unused with momentum set.
    missing = sorted(k for k in expected.keys() - loaded.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(loaded.keys() - expected.keys())
    mismatched = sorted(
        f"{k} (file {tuple(loaded[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected.keys() & loaded.keys()
        if loaded[k].shape != expected[k].shape
    )
    problems = [
        f"{label} ({len(keys)}): {_listed(keys)}"
        for label, keys in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"model.weights={path!r} does not fit model.name={model.arch}: "
            f"{'; '.join(problems)}. Pass a checkpoint of this architecture (torchvision/timm "
            f"names); {_weights_hint(model.arch)}"
        )
    target.load_state_dict(loaded, strict=False)
    return {
        "weights.sha256": _sha256(file),
        "weights.tensors": str(len(loaded)),
        "weights.skipped": str(len(given) - len(loaded)),
    }


def input_options(crop_size: int, weights: str) -> dict:
    """``DeviceImages`` options for a run: the crop side, and with pretrained weights the ImageNet
    statistics on 3 channels (grey images repeated), the inputs those weights were trained on."""
    options: dict = {"crop_size": crop_size}
    if weights:
        options.update(mean=IMAGENET_MEAN, std=IMAGENET_STD, channels=3)
    return options
