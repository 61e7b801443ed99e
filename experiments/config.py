"""Experiment configuration: typed dataclasses, YAML files and ``key=value`` overrides.

    cfg = load_config("experiments/configs/digits.yaml", ["loss.name=batch_hard", "loss.margin=0.2"])

Every key is checked: a typo raises ``ValueError`` naming the key, the closest valid keys and the
full list; loss hyperparameters are checked against the loss's own declaration
(``losses.validate_params``). The defaults train on the bundled digits data.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from experiments.data.imaging import parse_image_size
from experiments.data.splits import DEFAULT_SPLIT
from losses import validate_params

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DatasetConfig:
    name: str = "digits"
    path: str = ""  # empty: the dataset's environment variable or its built-in location
    split: str = DEFAULT_SPLIT  # standard | class-disjoint | official (see experiments/splits.py)
    val_fraction: float = 0.2  # share of the training classes held out for validation
    image_size: int | list = 0  # 0: the dataset's default; N: N x N; [height, width]
    max_per_class: int = 0  # 0: all images
    augment: bool = False  # random flips/shifts on the training batches (random resized crops with crop_size)
    crop_size: int = 0  # S > 0: train on S x S random resized crops (augment) and evaluate the centre crop
    # largest split (MiB of uint8) kept whole on the device, larger ones stream; 0: measured
    resident_mb: float = 0


@dataclass
class LossConfig:
    name: str = "batch_hard"
    params: dict[str, Any] = field(default_factory=dict)  # the loss's own hyperparameters


@dataclass
class ModelConfig:
    name: str = "auto"  # auto | cnn | resnet | resnet18 | resnet50 | torchvision:<arch> | timm:<arch>
    embedding_dim: int = 64
    normalize: bool = True  # L2-normalise the embedding
    weights: str = ""  # local file of pretrained backbone weights (ImageNet statistics); empty = random init
    freeze_bn: bool = False  # backbone BatchNorm in eval mode, affine parameters fixed (Musgrave et al. 2020)


@dataclass
class BatchConfig:
    p: int = 0  # classes per batch; 0 = auto: min(32, training classes), Hermans et al.'s P=32
    k: int = 4  # images per class (Hermans et al.'s K=4)


@dataclass
class OptimizerConfig:
    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 1e-4
    warmup_fraction: float = 0.2  # linear warm-up over this share of all steps, then the schedule
    schedule: str = "cosine"  # cosine: decay to zero by the last step | constant
    momentum: float = 0.9  # sgd only


@dataclass
class TrainConfig:
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    early_stopping_patience: int = 0  # epochs without a better val MAP@R; 0 = off
    checkpoint_dir: str = ""  # empty = no checkpoints
    compile: bool = False  # torch.compile the model
    amp: bool = True  # bf16 autocast (CUDA only)


@dataclass
class EvalConfig:
    every: int = 1  # validate every N epochs (and after the last)
    batch_size: int = 1024  # images per forward pass when embedding a split
    verification: bool | None = None  # verification metrics; None = auto (identity datasets)


@dataclass
class TrackingConfig:
    log_embeddings: bool = True  # embeddings/test.npz artifact


@dataclass
class ExperimentConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    epochs: int = 10
    seed: int = 0
    device: str = "auto"  # auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps

    def to_dict(self) -> dict[str, Any]:
        """The nested dict form (``loss`` flattened to ``{name, <param>...}``), as YAML would hold it."""
        out = dataclasses.asdict(self)
        out["loss"] = {"name": self.loss.name, **self.loss.params}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = {f.name: f.type for f in dataclasses.fields(ExperimentConfig)}
_SECTION_TYPES = {
    "dataset": DatasetConfig,
    "model": ModelConfig,
    "batch": BatchConfig,
    "optimizer": OptimizerConfig,
    "train": TrainConfig,
    "eval": EvalConfig,
    "tracking": TrackingConfig,
}
_CHOICES = {
    "model.name": ("auto", "cnn", "resnet", "resnet18", "resnet50", "torchvision:<arch>", "timm:<arch>"),
    "optimizer.name": ("adamw", "sgd"),
    "optimizer.schedule": ("cosine", "constant"),
}


def valid_keys() -> list[str]:
    """Every dotted key a config accepts (loss hyperparameters are ``loss.<param>``)."""
    keys = [f"{s}.{f.name}" for s, cls in _SECTION_TYPES.items() for f in dataclasses.fields(cls)]
    keys += ["loss.name", "loss.<param>", "epochs", "seed", "device"]
    return sorted(keys)


def _unknown_key(key: str) -> ValueError:
    close = difflib.get_close_matches(key, valid_keys(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"unknown config key {key!r}.{hint} Valid keys: {', '.join(valid_keys())}")


def _coerce(key: str, value: Any, kind: Any) -> Any:
    """``value`` as the field type ``kind``, or a ``ValueError`` naming the key."""
    if isinstance(kind, str):
        kind = eval(kind, {"Any": Any})  # annotations are strings under postponed evaluation
    optional = isinstance(kind, types.UnionType) and type(None) in typing.get_args(kind)
    if optional:
        if value is None or (isinstance(value, str) and value.lower() in ("auto", "none", "null")):
            return None
        kind = next(t for t in typing.get_args(kind) if t is not type(None))
    elif isinstance(kind, types.UnionType):  # int | list: an int, or a list of ints
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} must be an integer or a list of integers, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ValueError(
            f"config key {key!r} must be true or false{' or auto' if optional else ''}, got {value!r}"
        )
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"config key {key!r} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value == value:
            return float(value)
        raise ValueError(f"config key {key!r} must be a number, got {value!r}")
    if kind is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise ValueError(f"config key {key!r} must be a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config field type {kind!r} for {key!r}")


def _set(cfg: ExperimentConfig, key: str, value: Any) -> None:
    parts = key.split(".")
    if len(parts) == 1 and parts[0] in ("epochs", "seed", "device"):
        setattr(cfg, key, _coerce(key, value, {"epochs": int, "seed": int, "device": str}[key]))
        return
    if len(parts) == 2 and parts[0] == "loss":
        if parts[1] == "name":
            cfg.loss.name = _coerce(key, value, str)
        else:
            cfg.loss.params[parts[1]] = value  # checked against the loss declaration in validate()
        return
    if len(parts) == 2 and parts[0] in _SECTION_TYPES:
        section = getattr(cfg, parts[0])
        fields = {f.name: f.type for f in dataclasses.fields(section)}
        if parts[1] in fields:
            setattr(section, parts[1], _coerce(key, value, fields[parts[1]]))
            return
    raise _unknown_key(key)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and (prefix or k in SECTIONS):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def apply(cfg: ExperimentConfig, values: dict[str, Any]) -> ExperimentConfig:
    """A validated copy of ``cfg`` with ``values`` (nested dict or dotted keys) applied.

    Changing ``loss.name`` resets the loss hyperparameters to the new loss's defaults, except those
    given in ``values`` too.
    """
    out = copy.deepcopy(cfg)
    flat = _flatten(values)
    new_loss = flat.get("loss.name")
    if new_loss is not None and new_loss != cfg.loss.name:
        out.loss.params = {}
    for key, value in flat.items():
        _set(out, key, value)
    validate(out)
    return out


def from_dict(values: dict[str, Any]) -> ExperimentConfig:
    """A validated config from a nested dict (the form ``to_dict`` and the YAML files use)."""
    return apply(ExperimentConfig(), values)


def parse_override(item: str, example: str = "loss.margin=0.2") -> tuple[str, Any]:
    """One ``key=value`` override: the stripped key and the value read as YAML (``""`` when empty).

    ``example`` shows a valid override in the error for a malformed one. Experiment and sweep
    overrides both go through here.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ValueError(f"override {item!r} is not key=value, e.g. {example}")
    try:
        return key.strip(), (yaml.safe_load(raw) if raw.strip() else "")
    except yaml.YAMLError as exc:
        raise ValueError(f"override {item!r}: the value is not valid YAML ({exc.problem})") from None


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["loss.margin=0.2", "model.normalize=false"]`` -> dotted keys with YAML-typed values."""
    return dict(parse_override(item) for item in overrides)


def resolve_config_path(path: str, config_dir: Path = CONFIG_DIR, kind: str = "config") -> Path:
    """``path`` itself, or a bundled YAML file of ``config_dir`` by bare name (``digits`` ->
    ``experiments/configs/digits.yaml``); ``kind`` (``config``, ``sweep``) names it in the error."""
    candidate = Path(path)
    if candidate.is_file():
        return candidate
    bundled = config_dir / f"{candidate.stem}.yaml"
    if candidate.suffix in ("", ".yaml") and candidate.parent == Path(".") and bundled.is_file():
        return bundled
    names = ", ".join(sorted(p.stem for p in config_dir.glob("*.yaml")))
    raise FileNotFoundError(
        f"{kind} file {path!r} not found; pass a YAML path or a bundled {kind} name ({names})"
    )


def read_yaml_mapping(path: Path, kind: str = "config") -> dict[str, Any]:
    """The mapping a YAML file holds (``{}`` when empty), read safely; ``kind`` names it in errors."""
    try:
        values = yaml.safe_load(Path(path).read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{kind} file {str(path)!r} is not valid YAML: {exc}") from None
    if not isinstance(values, dict):
        raise ValueError(
            f"{kind} file {str(path)!r} must hold a mapping of keys, got {type(values).__name__}"
        )
    return values


def load_config(path: str | None = None, overrides: list[str] | None = None) -> ExperimentConfig:
    """The config from a YAML file (defaults if ``None``) with ``key=value`` overrides applied."""
    values = read_yaml_mapping(resolve_config_path(path)) if path is not None else {}
    cfg = from_dict(values)
    return apply(cfg, parse_overrides(overrides or []))


def flatten_config(cfg: ExperimentConfig) -> dict[str, str]:
    """Dotted keys -> string values, as logged to MLflow params (``loss.margin``, ``batch.p``...)."""
    return {k: "" if v is None else str(v) for k, v in _flatten(cfg.to_dict()).items()}


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _is_choice(value: Any, choices: tuple[str, ...]) -> bool:
    """``value`` is one of ``choices`` or fills a ``<library>:<arch>`` choice with a name."""
    library, sep, arch = str(value).partition(":")
    return value in choices or (bool(sep and arch) and f"{library}:<arch>" in choices)


def validate(cfg: ExperimentConfig) -> None:
    """Check ranges and the loss hyperparameters; fills the loss's defaults into ``cfg.loss.params``."""
    for key, choices in _CHOICES.items():
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        _check(
            _is_choice(value, choices),
            f"config key {key!r} must be one of {', '.join(choices)}, got {value!r}",
        )
    backbone = cfg.model.name not in ("auto", "cnn", "resnet")
    for key, value in (("model.weights", cfg.model.weights), ("model.freeze_bn", cfg.model.freeze_bn)):
        _check(
            backbone or not value,
            f"{key} needs an ImageNet backbone (model.name resnet18, resnet50, "
            f"torchvision:<arch> or timm:<arch>), got model.name={cfg.model.name}",
        )
    _check(cfg.epochs >= 1, f"epochs must be >= 1, got {cfg.epochs}")
    _check(
        cfg.batch.p == 0 or cfg.batch.p >= 2,
        "batch.p (classes per batch) must be >= 2 so each batch has negatives (or 0 = auto), "
        f"got {cfg.batch.p}",
    )
    _check(
        cfg.batch.k >= 2,
        f"batch.k (images per class) must be >= 2 so each batch has positives, got {cfg.batch.k}",
    )
    _check(cfg.model.embedding_dim >= 1, f"model.embedding_dim must be >= 1, got {cfg.model.embedding_dim}")
    _check(cfg.optimizer.lr > 0, f"optimizer.lr must be > 0, got {cfg.optimizer.lr}")
    _check(
        cfg.optimizer.weight_decay >= 0,
        f"optimizer.weight_decay must be >= 0, got {cfg.optimizer.weight_decay}",
    )
    _check(
        0 <= cfg.optimizer.warmup_fraction < 1,
        "optimizer.warmup_fraction (share of all steps) must be in [0, 1), "
        f"got {cfg.optimizer.warmup_fraction}",
    )
    _check(
        0 <= cfg.optimizer.momentum < 1, f"optimizer.momentum must be in [0, 1), got {cfg.optimizer.momentum}"
    )
    _check(
        0 <= cfg.dataset.val_fraction < 1,
        f"dataset.val_fraction must be in [0, 1), got {cfg.dataset.val_fraction}",
    )
    size = parse_image_size(cfg.dataset.image_size, None)
    _check(
        cfg.dataset.max_per_class >= 0,
        f"dataset.max_per_class must be >= 0 (0 = all), got {cfg.dataset.max_per_class}",
    )
    _check(
        cfg.dataset.resident_mb >= 0,
        f"dataset.resident_mb must be >= 0 (0 = measured from free memory), got {cfg.dataset.resident_mb}",
    )
    crop = cfg.dataset.crop_size
    _check(crop >= 0, f"dataset.crop_size must be >= 0 (0 = no crop), got {crop}")
    _check(
        size is None or crop <= min(size),
        f"dataset.crop_size={crop} is larger than dataset.image_size={cfg.dataset.image_size}; crops are "
        "taken from the resized images, so raise image_size (e.g. 256 for 224 crops)",
    )
    _check(cfg.train.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {cfg.train.grad_clip}")
    _check(
        cfg.train.early_stopping_patience >= 0,
        f"train.early_stopping_patience must be >= 0 (0 = off), got {cfg.train.early_stopping_patience}",
    )
    _check(cfg.eval.every >= 1, f"eval.every must be >= 1, got {cfg.eval.every}")
    _check(cfg.eval.batch_size >= 1, f"eval.batch_size must be >= 1, got {cfg.eval.batch_size}")
    device = cfg.device
    _check(
        device in ("auto", "cpu", "cuda", "mps") or (device.startswith("cuda:") and device[5:].isdigit()),
        f"device must be auto, cpu, cuda, cuda:N or mps, got {device!r}",
    )
    cfg.loss.params = validate_params(cfg.loss.name, cfg.loss.params)
