"""The three plugin routes (decorator, entry point, --plugin file / TRIPLETLAB_PLUGINS), a broken
plugin and a duplicate name. The command-line checks share one ``tripletlab losses`` run."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch

from losses import MetricLoss, build_loss, list_losses, loss_info, register_loss

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "tripletlab-example-plugin"
TRIPLETLAB = Path(sys.executable).with_name("tripletlab")

FILE_PLUGIN = '''
from losses import HyperParam, MetricLoss, register_loss

@register_loss("{name}")
class FileLoss(MetricLoss):
    """A loss from a plugin file."""
    paper = "plugin file paper"
    hyperparams = (HyperParam("scale", float, 1.0, "scale", low=0.0, search=(0.5, 2.0)),)

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = scale

    def compute(self, embeddings, labels, ref_embeddings, ref_labels):
        return self.scale * embeddings.pow(2).mean()
'''

DUPLICATE_PLUGIN = '''
from losses import MetricLoss, register_loss

@register_loss("triplet")
class Impostor(MetricLoss):
    """Tries to take the built-in name."""
    paper = "impostor paper"
'''


def install_as_distribution(site: Path) -> None:
    """What ``pip install`` leaves behind: the package and a dist-info with the entry points taken
    from the example's pyproject.toml."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    shutil.copytree(EXAMPLE / "tripletlab_example_plugin", site / "tripletlab_example_plugin")
    dist_info = site / f"tripletlab_example_plugin-{project['version']}.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n"
    )
    entry_points = project["entry-points"]["tripletlab.losses"]
    lines = ["[tripletlab.losses]"] + [f"{k} = {v}" for k, v in entry_points.items()]
    (dist_info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One ``tripletlab --plugin ... losses`` with every kind of plugin installed at once."""
    root = tmp_path_factory.mktemp("plugins")
    site = root / "site"
    site.mkdir()
    install_as_distribution(site)
    (root / "by_flag.py").write_text(FILE_PLUGIN.format(name="flag_loss"))
    (root / "by_env.py").write_text(FILE_PLUGIN.format(name="env_loss"))
    (root / "broken.py").write_text("raise RuntimeError('plugin exploded on import')\n")
    (root / "duplicate.py").write_text(DUPLICATE_PLUGIN)
    env = {
        **os.environ,
        "PYTHONPATH": str(site),
        "OMP_NUM_THREADS": "1",
        "TRIPLETLAB_PLUGINS": f"{root / 'by_env.py'},{root / 'broken.py'}",
    }
    result = subprocess.run(
        [
            str(TRIPLETLAB),
            "--plugin",
            str(root / "by_flag.py"),
            "--plugin",
            str(root / "duplicate.py"),
            "losses",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return root, site, result


def test_decorator_in_user_code(restore_registry):
    @register_loss("user_code_loss")
    class UserLoss(MetricLoss):
        """Mean squared norm, scaled."""

        paper = "user paper"
        hyperparams = (loss_info("triplet").param("margin"),)

        def __init__(self, margin=0.2):
            super().__init__()
            self.margin = margin

        def compute(self, embeddings, labels, ref_embeddings, ref_labels):
            return self.margin * embeddings.pow(2).mean()

    assert "user_code_loss" in list_losses("user_*")
    loss = build_loss("user_code_loss", margin=0.5)
    assert float(loss(torch.ones(2, 3), torch.tensor([0, 1]))) == pytest.approx(0.5)
    assert loss_info("user_code_loss").source == "tripletlab"


def test_installed_distribution_entry_point(cli_run):
    root, site, result = cli_run
    assert result.returncode == 0, result.stderr
    assert "angular" in result.stdout
    assert "Wang et al., Deep Metric Learning with Angular Loss" in result.stdout
    code = (
        "import torch; from losses import build_loss, loss_info; "
        "l = build_loss('angular', alpha=45); print(loss_info('angular').source); "
        "print(float(l(torch.randn(8, 4), torch.arange(4).repeat(2))) > 0)"
    )
    probe = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"},
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [
        "entry",
        "point",
        "angular",
        "(tripletlab_example_plugin.angular)",
        "True",
    ]


def test_plugin_file_by_flag_and_by_environment(cli_run):
    root, _, result = cli_run
    lines = {line.split()[0]: line for line in result.stdout.splitlines() if line and not line[0].isspace()}
    assert "flag_loss" in lines and str(root / "by_flag.py") in lines["flag_loss"]
    assert "env_loss" in lines and str(root / "by_env.py") in lines["env_loss"]
    assert "scale" in lines["flag_loss"] and "[0.5, 2]" in lines["flag_loss"]


def test_broken_plugin_warns_and_others_still_work(cli_run):
    root, _, result = cli_run
    assert result.returncode == 0
    assert "broken.py" in result.stderr and "RuntimeError: plugin exploded on import" in result.stderr
    for name in ("triplet", "circle", "flag_loss", "angular"):
        assert any(line.startswith(name + " ") for line in result.stdout.splitlines())


def test_duplicate_name_warns_and_keeps_the_original(cli_run):
    root, _, result = cli_run
    assert "duplicate.py" in result.stderr and "'triplet' is already registered" in result.stderr
    triplet = next(line for line in result.stdout.splitlines() if line.startswith("triplet "))
    assert "FaceNet" in triplet and "impostor" not in result.stdout


def test_load_plugins_reports_a_broken_plugin_and_loads_the_others(tmp_path):
    """``losses.load_plugins`` itself, without the command line: files, modules and the environment."""
    (tmp_path / "good.py").write_text(FILE_PLUGIN.format(name="good_loss"))
    (tmp_path / "env_module.py").write_text(FILE_PLUGIN.format(name="module_loss"))
    (tmp_path / "broken.py").write_text("raise RuntimeError('plugin exploded on import')\n")
    code = (
        "import sys; from losses import load_plugins, loss_info; "
        "load_plugins([sys.argv[1], sys.argv[2], 'no_such_plugin_module']); "
        "print(*(loss_info(name).source for name in ('good_loss', 'module_loss', 'triplet')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "broken.py"), str(tmp_path / "good.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "PYTHONPATH": str(tmp_path),
            "TRIPLETLAB_PLUGINS": "env_module",
        },
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(tmp_path / "good.py"), "env_module", "tripletlab"]
    assert "broken.py" in result.stderr and "RuntimeError: plugin exploded on import" in result.stderr
    assert "'no_such_plugin_module' failed to load" in result.stderr
    assert "ModuleNotFoundError" in result.stderr
