"""Experiment config: YAML files, key=value overrides, typed values and clear errors."""

from pathlib import Path

import pytest
import yaml

from experiments.config import (
    CONFIG_DIR,
    ExperimentConfig,
    apply,
    flatten_config,
    from_dict,
    load_config,
    parse_overrides,
)
from losses import loss_info


def test_defaults_are_the_digits_config():
    assert load_config(None, []).to_dict() == load_config("digits", []).to_dict()


@pytest.mark.parametrize("name", ["digits", "fashion-mnist", "orl-faces", "omniglot"])
def test_bundled_configs_load(name):
    cfg = load_config(str(CONFIG_DIR / f"{name}.yaml"), [])
    assert cfg.dataset.name == name
    assert cfg.loss.params == {p.name: p.default for p in loss_info(cfg.loss.name).params}


def test_overrides_are_yaml_typed_and_fill_the_loss_defaults():
    cfg = load_config(
        "digits",
        [
            "loss.name=triplet",
            "loss.margin=0.3",
            "epochs=5",
            "model.normalize=false",
            "optimizer.lr=1e-3",
            "dataset.image_size=[10, 12]",
            "eval.verification=auto",
        ],
    )
    assert (cfg.epochs, cfg.model.normalize, cfg.optimizer.lr) == (5, False, 1e-3)
    assert cfg.loss.params["margin"] == 0.3
    assert cfg.dataset.image_size == [10, 12]
    assert cfg.eval.verification is None
    assert set(cfg.loss.params) == {p.name for p in loss_info("triplet").params}


def test_yaml_file_with_overrides(tmp_path: Path):
    path = tmp_path / "exp.yaml"
    path.write_text(
        yaml.safe_dump({"loss": {"name": "triplet", "margin": 0.1}, "batch": {"p": 2, "k": 4}, "seed": 7})
    )
    cfg = load_config(str(path), ["batch.k=6"])
    assert (cfg.loss.params["margin"], cfg.batch.p, cfg.batch.k, cfg.seed) == (0.1, 2, 6, 7)


def test_changing_the_loss_resets_its_params_to_the_new_defaults():
    cfg = load_config(None, ["loss.name=triplet", "loss.margin=0.7"])
    other = apply(cfg, {"loss.name": "multi_similarity"})
    assert other.loss.params == loss_info("multi_similarity").defaults
    assert cfg.loss.params["margin"] == 0.7  # the original is untouched


def test_round_trip_through_dict_and_yaml():
    cfg = load_config(None, ["loss.name=triplet", "loss.mining=hard-triplets", "train.grad_clip=2"])
    assert from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    flat = flatten_config(cfg)
    assert flat["loss.mining"] == "hard-triplets" and flat["train.grad_clip"] == "2.0"
    assert flat["batch.p"] == "0"
    assert all(isinstance(v, str) for v in flat.values())


def test_typo_names_the_key_the_close_match_and_the_valid_keys():
    with pytest.raises(
        ValueError, match=r"unknown config key 'optimiser.lr'.*optimizer\.lr.*Valid keys:.*batch\.p"
    ):
        load_config(None, ["optimiser.lr=0.1"])
    with pytest.raises(ValueError, match=r"unknown config key 'epoch'.*Did you mean epochs"):
        load_config(None, ["epoch=3"])


def test_typo_inside_a_yaml_file(tmp_path: Path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  embeding_dim: 32\n")
    with pytest.raises(ValueError, match=r"model\.embeding_dim.*model\.embedding_dim"):
        load_config(str(path), [])


@pytest.mark.parametrize(
    "override, message",
    [
        ("loss.margn=0.1", r"unknown parameter\(s\) margn for loss 'triplet'; valid: margin"),
        ("loss.margin=-1", r"triplet\.margin must be in"),
        ("batch.p=x", r"'batch\.p' must be an integer"),
        ("batch.k=1", r"batch\.k .* must be >= 2"),
        ("model.name=vgg", r"'model\.name' must be one of auto, cnn, resnet"),
        ("optimizer.lr=0", r"optimizer\.lr must be > 0"),
        ("dataset.val_fraction=1.5", r"dataset\.val_fraction must be in"),
        ("device=tpu", r"device must be auto, cpu, cuda"),
        ("epochs", r"not key=value"),
    ],
)
def test_bad_values_raise_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, ["loss.name=triplet", override])


def test_unknown_loss_and_missing_file():
    with pytest.raises(ValueError, match="unknown loss 'tripplet'"):
        load_config(None, ["loss.name=tripplet"])
    with pytest.raises(FileNotFoundError, match="bundled config name"):
        load_config("no-such-config.yaml", [])


def test_yaml_is_loaded_safely(tmp_path: Path):
    path = tmp_path / "evil.yaml"
    path.write_text("seed: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_config(str(path), [])


def test_parse_overrides_keeps_strings_and_lists():
    assert parse_overrides(["dataset.path=/data/x", "a=[1, 2]", "b="]) == {
        "dataset.path": "/data/x",
        "a": [1, 2],
        "b": "",
    }


def test_dataclass_defaults_validate():
    cfg = from_dict({})
    assert isinstance(cfg, ExperimentConfig) and cfg.loss.params
