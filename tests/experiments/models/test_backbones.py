"""ImageNet backbones: torchvision's ResNet-18/50 layout and names, local pretrained weights,
frozen BatchNorm, grey inputs, ImageNet statistics, the torchvision/timm paths and a real run."""

import hashlib
import importlib.util
from collections import OrderedDict

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from experiments.config import load_config
from experiments.data.base import LabeledImages
from experiments.data.device_data import DeviceImages
from experiments.data.sampler import PKSampler
from experiments.models.backbones import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    LibraryBackbone,
    input_options,
    load_backbone_weights,
    replace_classifier,
)
from experiments.models.image import build_model
from experiments.train.loop import train
from experiments.train.run import run_experiment
from losses import build_loss

# torchvision's documented sizes with the 1000-way ImageNet classifier (ResNet18_Weights /
# ResNet50_Weights .meta["num_params"]) and the lengths of their state dicts.
PUBLISHED_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032}
STATE_DICT_LENGTHS = {"resnet18": 122, "resnet50": 320}


def torchvision_resnet_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """The state-dict names and shapes of torchvision's ``resnet18`` / ``resnet50`` (1000 classes),
    enumerated from its layout: stem ``conv1``/``bn1``, ``layer1..4`` of basic ([2, 2, 2, 2]) or
    bottleneck ([3, 4, 6, 3], x4 expansion) blocks, ``downsample.0/1`` projections, ``fc``."""
    bottleneck = arch == "resnet50"
    depths, expansion = ((3, 4, 6, 3), 4) if bottleneck else ((2, 2, 2, 2), 1)
    shapes: dict[str, tuple[int, ...]] = {}

    def bn(prefix: str, channels: int) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{name}"] = (channels,)
        shapes[f"{prefix}.num_batches_tracked"] = ()

    shapes["conv1.weight"] = (64, 3, 7, 7)
    bn("bn1", 64)
    cin = 64
    for stage, (width, depth) in enumerate(zip((64, 128, 256, 512), depths), start=1):
        for index in range(depth):
            p = f"layer{stage}.{index}"
            if bottleneck:
                convs = [(width, cin, 1), (width, width, 3), (width * 4, width, 1)]
            else:
                convs = [(width, cin, 3), (width, width, 3)]
            for number, (cout, cinner, kernel) in enumerate(convs, start=1):
                shapes[f"{p}.conv{number}.weight"] = (cout, cinner, kernel, kernel)
                bn(f"{p}.bn{number}", cout)
            if index == 0 and (stage > 1 or cin != width * expansion):
                shapes[f"{p}.downsample.0.weight"] = (width * expansion, cin, 1, 1)
                bn(f"{p}.downsample.1", width * expansion)
            cin = width * expansion
    shapes["fc.weight"], shapes["fc.bias"] = (1000, cin), (1000,)
    return shapes


def as_torchvision_checkpoint(model: nn.Module) -> OrderedDict:
    """``model``'s backbone tensors under torchvision's names, with a 1000-way ``fc`` as the
    ImageNet checkpoints carry (never loaded)."""
    state = OrderedDict((k, v.clone()) for k, v in model.state_dict().items() if not k.startswith("fc."))
    features = model.fc.linear.in_features
    state["fc.weight"], state["fc.bias"] = torch.randn(1000, features), torch.randn(1000)
    return state


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_parameter_counts_and_names_are_torchvision_s(arch):
    model = build_model(arch, 3, (224, 224), 1000, normalize=False)  # the head sized as the ImageNet fc
    assert sum(p.numel() for p in model.parameters()) == PUBLISHED_PARAMS[arch]
    state = model.state_dict()
    assert len(state) == STATE_DICT_LENGTHS[arch]
    ours = {k.replace("fc.linear.", "fc."): tuple(v.shape) for k, v in state.items()}
    assert ours == torchvision_resnet_shapes(arch)


def test_resnet50_is_v1_5_with_the_stride_on_the_3x3_convolution():
    model = build_model("resnet50", 3, (224, 224), 64)
    block = model.layer2[0]
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)
    assert model.conv1.stride == (2, 2) and model.layer1[0].conv2.stride == (1, 1)


@pytest.mark.parametrize("arch, size", [("resnet18", (64, 48)), ("resnet50", (32, 32))])
def test_forward_shapes_normalisation_and_seeding(arch, size):
    model = build_model(arch, 3, size, 24, normalize=True, seed=3).eval()
    out = model(torch.rand(2, 3, *size))
    assert out.shape == (2, 24)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(2))
    same, other = build_model(arch, 3, size, 24, seed=3), build_model(arch, 3, size, 24, seed=4)
    assert torch.equal(same.layer3[0].conv1.weight, model.layer3[0].conv1.weight)
    assert not torch.equal(other.layer3[0].conv1.weight, model.layer3[0].conv1.weight)
    # He-normal fan-out initialisation, as torchvision's: std sqrt(2 / (out channels * k * k)).
    conv = model.layer4[0].conv1.weight
    assert abs(conv.std().item() / (2 / (conv.shape[0] * conv.shape[2] * conv.shape[3])) ** 0.5 - 1) < 0.05


def test_grey_images_are_repeated_to_three_channels():
    model = build_model("resnet18", 1, (32, 32), 16, seed=0).eval()
    grey = torch.rand(3, 1, 32, 32)
    torch.testing.assert_close(model(grey), model(grey.repeat(1, 3, 1, 1)))
    assert model.conv1.in_channels == 3
    with pytest.raises(ValueError, match="model.name=resnet18 takes RGB or grey images, got 2 channels"):
        build_model("resnet18", 2, (32, 32), 16)


@pytest.mark.parametrize("layout", ["plain", "state_dict", "model", "module-prefix"])
def test_weights_file_loads_the_backbone_but_never_the_classifier(tmp_path, layout):
    source = build_model("resnet18", 3, (32, 32), 16, seed=1)
    state = as_torchvision_checkpoint(source)
    if layout == "module-prefix":  # saved from DataParallel / DistributedDataParallel
        state = OrderedDict((f"module.{k}", v) for k, v in state.items())
    payload = (
        {"state_dict": state, "epoch": 90}
        if layout == "state_dict"
        else {"model": state, "optimizer": {}}
        if layout == "model"
        else state
    )
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(payload, path)
    model = build_model("resnet18", 3, (32, 32), 16, seed=2)
    head = model.fc.linear.weight.clone()
    info = load_backbone_weights(model, str(path))
    for key, value in source.state_dict().items():
        if not key.startswith("fc."):
            assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(model.fc.linear.weight, head)  # the embedding head keeps its own initialisation
    assert info == {
        "weights.sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "weights.tensors": "120",
        "weights.skipped": "2",
    }


def test_missing_weights_file_says_how_to_obtain_it(tmp_path):
    model = build_model("resnet50", 3, (32, 32), 8)
    file, url = r"resnet50-0676ba61\.pth", r"https://download\.pytorch\.org/models/resnet50-0676ba61\.pth"
    with pytest.raises(
        ValueError,
        match=rf"no such file; download the ImageNet weights {file} from {url} "
        r"on a machine with internet access, then pass its path",
    ):
        load_backbone_weights(model, str(tmp_path / "absent.pth"))
    not_a_checkpoint = tmp_path / "notes.pth"
    not_a_checkpoint.write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"is not a torch checkpoint of tensors \(UnpicklingError"):
        load_backbone_weights(model, str(not_a_checkpoint))
    no_tensors = tmp_path / "metrics.pth"
    torch.save({"accuracy": 0.7}, no_tensors)
    with pytest.raises(ValueError, match="holds no state dict of tensors"):
        load_backbone_weights(model, str(no_tensors))


def test_weights_of_another_architecture_are_a_clear_error(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(as_torchvision_checkpoint(build_model("resnet50", 3, (32, 32), 8)), path)
    model = build_model("resnet18", 3, (32, 32), 8)
    with pytest.raises(ValueError) as error:
        load_backbone_weights(model, str(path))
    message = str(error.value)
    assert "does not fit model.name=resnet18" in message
    assert "unexpected keys (198): layer1.0.bn3.bias, " in message and " and 193 more;" in message
    assert (
        "shape mismatches (23): layer1.0.conv1.weight (file (64, 64, 1, 1), model (64, 64, 3, 3))" in message
    )
    renamed = as_torchvision_checkpoint(model)
    renamed["layer1.0.conv_one.weight"] = renamed.pop("layer1.0.conv1.weight")
    torch.save(renamed, path)
    with pytest.raises(
        ValueError,
        match=r"missing keys \(1\): layer1\.0\.conv1\.weight; "
        r"unexpected keys \(1\): layer1\.0\.conv_one\.weight\.",
    ):
        load_backbone_weights(model, str(path))


def test_weights_need_an_imagenet_backbone(tmp_path):
    with pytest.raises(ValueError, match="model.weights needs an ImageNet backbone"):
        load_backbone_weights(build_model("cnn", 1, (8, 8), 8), str(tmp_path / "w.pth"))
    with pytest.raises(ValueError, match="model.freeze_bn freezes pretrained BatchNorm statistics"):
        build_model("cnn", 1, (8, 8), 8, freeze_bn=True)


def tiny_split(n: int = 32, channels: int = 3, side: int = 32) -> LabeledImages:
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, channels, side, side), generator=generator, dtype=torch.uint8)
    return LabeledImages(images, torch.arange(n) % 4)


def train_one_epoch(model: nn.Module, optimizer: str = "sgd") -> None:
    """One real epoch of the project's trainer (which calls ``model.train()``) on random images."""
    cfg = load_config(
        None,
        [
            "epochs=1",
            "batch.p=2",
            "batch.k=4",
            "device=cpu",
            "train.amp=false",
            f"optimizer.name={optimizer}",
            "optimizer.schedule=constant",
        ],
    )
    data = tiny_split()
    train(
        model,
        build_loss(cfg.loss.name, **cfg.loss.params),
        DeviceImages(data, "cpu"),
        PKSampler(data.labels, 2, 4),
        None,
        cfg,
        torch.device("cpu"),
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_frozen_batch_norm_keeps_statistics_and_affine_parameters(optimizer):
    model = build_model("resnet18", 3, (32, 32), 16, seed=0, freeze_bn=True)
    with torch.no_grad():  # statistics as a pretrained network would have them
        for norm in model.batch_norms():
            norm.running_mean.uniform_(-0.1, 0.1)
            norm.running_var.uniform_(0.5, 2.0)
            norm.weight.uniform_(0.5, 1.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_one_epoch(model, optimizer)
    after = model.state_dict()
    norms = [k for k in before if ".bn" in k or k.startswith("bn1") or "downsample.1" in k]
    assert len(norms) == 20 * 5
    for key in norms:
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    assert not torch.equal(before["fc.linear.weight"], after["fc.linear.weight"])
    assert model.training and not any(norm.training for norm in model.batch_norms())
    assert not any(p.requires_grad for norm in model.batch_norms() for p in norm.parameters())


def test_unfrozen_batch_norm_does_update():
    model = build_model("resnet18", 3, (32, 32), 16, seed=0)
    before = model.bn1.running_mean.clone(), model.bn1.weight.detach().clone()
    train_one_epoch(model)
    assert not torch.equal(before[0], model.bn1.running_mean) and not torch.equal(before[1], model.bn1.weight)
    assert all(norm.training for norm in model.batch_norms())


def test_pretrained_weights_use_imagenet_statistics_on_three_channels():
    grey = tiny_split(n=4, channels=1, side=6)
    store = DeviceImages(grey, "cpu", **input_options(0, "weights.pth"))
    images, _ = store.batch(torch.arange(4))
    expected = (grey.images.double() / 255 - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(
        IMAGENET_STD
    ).view(1, 3, 1, 1)
    torch.testing.assert_close(images.double(), expected, atol=1e-5, rtol=0)
    assert input_options(4, "") == {"crop_size": 4}  # random init: the dataset's own statistics


@pytest.mark.parametrize("library", ["torchvision", "timm"])
def test_library_backbones_build_or_say_why_they_cannot(library):
    name = f"{library}:resnet18"
    if importlib.util.find_spec(library) is not None:  # a working install builds the network
        try:
            model = build_model(name, 3, (64, 64), 16)
        except ValueError as exc:  # an install that does not match this torch build
            assert f"needs {library}, which failed to import" in str(exc)
        else:
            assert model.eval()(torch.rand(2, 3, 64, 64)).shape == (2, 16)
        return
    with pytest.raises(ValueError) as error:
        build_model(name, 3, (64, 64), 16)
    message = str(error.value)
    assert f"model.name={name} needs {library}, which failed to import (ModuleNotFoundError" in message
    assert f"Install a {library} build that matches torch {torch.__version__}" in message
    assert "or use the built-in model.name=resnet18 or resnet50" in message


def test_library_wrapper_swaps_the_classifier_and_loads_weights(tmp_path):
    # A torchvision-style network (features, pooling, dropout + linear classifier), as get_model returns.
    def network() -> nn.Sequential:
        return nn.Sequential(
            OrderedDict(
                features=nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU()),
                pool=nn.AdaptiveAvgPool2d(1),
                flatten=nn.Flatten(),
                classifier=nn.Sequential(nn.Dropout(0.2), nn.Linear(8, 1000)),
            )
        )

    source, trunk = network(), network()
    name, features = replace_classifier(trunk)
    assert (name, features) == ("classifier.1", 8) and isinstance(trunk.classifier[1], nn.Identity)
    model = LibraryBackbone("torchvision:toy", trunk, features, name, 5, normalize=True).set_freeze_bn(True)
    assert model.eval()(torch.rand(2, 1, 16, 16)).shape == (2, 5)
    path = tmp_path / "toy.pth"
    torch.save(source.state_dict(), path)
    assert load_backbone_weights(model, str(path))["weights.skipped"] == "2"  # classifier.1.weight / .bias
    assert torch.equal(trunk.features[0].weight, source.features[0].weight)
    model.train()
    assert not trunk.features[1].training and not trunk.features[1].weight.requires_grad
    with pytest.raises(ValueError, match=r"torchvision\.models\.get_model_weights\('toy'\)\.DEFAULT\.url"):
        load_backbone_weights(model, str(tmp_path / "absent.pth"))


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["model.name=tv:resnet18"],
            r"'model\.name' must be one of auto, cnn, resnet, resnet18, resnet50, "
            r"torchvision:<arch>, timm:<arch>, got 'tv:resnet18'",
        ),
        (["model.weights=w.pth"], r"model\.weights needs an ImageNet backbone .* got model\.name=auto"),
        (["model.name=cnn", "model.freeze_bn=true"], r"model\.freeze_bn needs an ImageNet backbone"),
        (["dataset.crop_size=-1"], r"dataset\.crop_size must be >= 0"),
        (
            ["dataset.image_size=32", "dataset.crop_size=64"],
            r"dataset\.crop_size=64 is larger than dataset\.image_size=32",
        ),
    ],
)
def test_backbone_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_backbone_config_keys_resolve():
    cfg = load_config(
        None,
        [
            "model.name=timm:convnext_tiny",
            "model.weights=/models/convnext.pth",
            "model.freeze_bn=true",
            "dataset.image_size=256",
            "dataset.crop_size=224",
        ],
    )
    assert (cfg.model.name, cfg.model.weights) == ("timm:convnext_tiny", "/models/convnext.pth")
    assert cfg.model.freeze_bn is True
    assert cfg.dataset.crop_size == 224 and load_config(None, []).model.weights == ""


@pytest.mark.slow
def test_resnet18_trains_end_to_end_from_a_weights_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRIPLETLAB_PROGRESS", "0")
    weights = tmp_path / "resnet18-f37072fd.pth"
    torch.save(as_torchvision_checkpoint(build_model("resnet18", 3, (32, 32), 16, seed=9)), weights)
    cfg = load_config(
        None,
        [
            "epochs=1",
            "device=cpu",
            "dataset.image_size=32",
            "dataset.crop_size=28",
            "dataset.augment=true",
            "dataset.max_per_class=24",
            "batch.p=4",
            "batch.k=4",
            "model.name=resnet18",
            "model.embedding_dim=16",
            f"model.weights={weights}",
            "model.freeze_bn=true",
            "optimizer.lr=1e-3",
            "eval.batch_size=64",
        ],
    )
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_experiment(cfg, tracking_uri=uri, experiment_name="backbones")
    run = MlflowClient(uri).get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["model.name"] == "resnet18" and params["dataset.crop_size"] == "28"
    assert params["weights.sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert params["weights.tensors"] == "120" and params["weights.skipped"] == "2"
    loss = result.history[0]["train/loss"]
    assert loss == loss and loss > 0  # finite and positive: batch-hard on fresh embeddings
    assert 0 <= result.val_metrics["map_at_r"] <= 1 and 0 <= result.test_metrics["precision_at_1"] <= 1
