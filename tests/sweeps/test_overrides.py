"""``key=value`` overrides and config-file lookup, one implementation (``experiments.config``) for the
experiment configs and the sweep configs alike."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments.config import CONFIG_DIR as EXPERIMENT_CONFIGS
from experiments.config import parse_override, parse_overrides, read_yaml_mapping, resolve_config_path
from sweeps.config import CONFIG_DIR as SWEEP_CONFIGS
from sweeps.config import apply_overrides, load_sweep_config


@pytest.mark.parametrize(
    "item, expected",
    [
        ("trials=4", ("trials", 4)),
        (" losses = [triplet, circle]", ("losses", ["triplet", "circle"])),
        ("optimizer.lr=1e-3", ("optimizer.lr", "1e-3")),  # YAML 1.1: no dot, so text; the config coerces it
        ("dataset.path=/data/x=y", ("dataset.path", "/data/x=y")),
        ("name=", ("name", "")),
        ("model.normalize=false", ("model.normalize", False)),
    ],
)
def test_parse_override_reads_the_value_as_yaml(item, expected):
    assert parse_override(item) == expected


def test_malformed_overrides_name_an_example_of_their_kind():
    with pytest.raises(ValueError, match=r"not key=value, e\.g\. loss\.margin=0\.2"):
        parse_overrides(["epochs"])
    with pytest.raises(ValueError, match=r"not key=value, e\.g\. trials=4"):
        apply_overrides({}, ["=3"])
    with pytest.raises(ValueError, match="not valid YAML"):
        apply_overrides({}, ["losses=[triplet"])


def test_the_same_lookup_finds_bundled_experiment_and_sweep_configs(tmp_path, monkeypatch):
    assert resolve_config_path("digits") == EXPERIMENT_CONFIGS / "digits.yaml"
    assert resolve_config_path("quick.yaml", SWEEP_CONFIGS, "sweep config") == SWEEP_CONFIGS / "quick.yaml"
    own = tmp_path / "quick.yaml"
    own.write_text("trials: 1\n")
    assert resolve_config_path(str(own), SWEEP_CONFIGS, "sweep config") == own  # a file wins over a name
    monkeypatch.chdir(tmp_path)
    # a path into a folder is a path: it is not found, rather than read as the bundled file of that name
    with pytest.raises(FileNotFoundError, match="bundled sweep config name"):
        load_sweep_config(str(Path("elsewhere") / "quick.yaml"))
    with pytest.raises(FileNotFoundError, match="bundled config name"):
        resolve_config_path("no-such-config")


def test_yaml_files_must_hold_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- trials\n")
    with pytest.raises(ValueError, match="sweep config file .* must hold a mapping of keys, got list"):
        load_sweep_config(str(path))
    path.write_text("")
    assert read_yaml_mapping(path) == {}
