"""The GPU benchmark's dry run end to end on the CPU, its offline installer and its wheel planning."""

import argparse
import base64
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from benchmarks.bench_gpu import find_data, run_steps
from benchmarks.gpu_deps import ensure, import_error, wheel_distribution
from benchmarks.gpu_plan import Step, gpu_steps, recommend_trials_per_gpu
from benchmarks.gpu_wheels import LEAVE_OUT, MANIFEST, expand_platforms, project_packages, to_download

REPO = Path(__file__).resolve().parents[2]
STEPS = ("deps", "eval", "losses", "train", "compile", "sweep tpg=1")


def test_dry_run_runs_every_step_and_writes_reports_and_summary(tmp_path):
    out = tmp_path / "results"
    args = f"--dry-run --out {out} --wheels {tmp_path / 'no-wheels'}"
    command = (
        ["make", "-s", "bench-gpu", f"ARGS={args}"]
        if shutil.which("make")
        else [sys.executable, "-m", "benchmarks.bench_gpu", *args.split()]
    )
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "gpu-cpu.json").read_text())
    assert summary["dry_run"] and [s["step"] for s in summary["steps"]] == list(STEPS)
    assert all(s["status"] == "ok" for s in summary["steps"]), summary["steps"]
    assert summary["trials_per_gpu"] == 1 and summary["trials_per_minute"]["1"] > 0
    assert "| losses | ok |" in done.stdout and "| sweep tpg=1 | ok |" in done.stdout  # the printed table
    assert (out / "gpu-cpu.md").read_text() in done.stdout
    losses = json.loads((out / "losses-cpu.json").read_text())
    assert {r["dtype"] for r in losses["results"]} == {"float32", "bfloat16"}
    assert all(r["ours_ms"] > 0 for r in losses["results"])
    evaluation = json.loads((out / "eval-cpu.json").read_text())
    assert all(d < 1e-6 for c in evaluation["cases"] for d in c["max_abs_diff"].values())
    train = json.loads((out / "train-cpu-quick.json").read_text())
    assert set(train["datasets"]) == {"fashion-mnist", "omniglot"}
    sweep = json.loads((out / "sweep-cpu-tpg1.json").read_text())
    assert sweep["exit_status"] == 0 and "trials_per_gpu=1" in sweep["overrides"]
    compiled = json.loads((out / "compile-cpu.json").read_text())
    assert [c["check"] for c in compiled["checks"]] == ["model", "loss:batch_hard"]
    assert all(c["same_as_eager"] for c in compiled["checks"]) and compiled["backend"] == "aot_eager"


def _write_sweep(out, t, per_minute):
    (out / f"sweep-cpu-tpg{t}.json").write_text(json.dumps({"trials_per_minute": per_minute}))


def test_recommendation_is_the_smallest_trials_per_gpu_near_the_best_rate(tmp_path):
    for t, rate in ((1, 10.0), (2, 19.0), (4, 19.5), (8, 12.0)):
        _write_sweep(tmp_path, t, rate)
    best, rates = recommend_trials_per_gpu(tmp_path, "cpu", (1, 2, 4, 8))
    assert best == 2 and rates == {1: 10.0, 2: 19.0, 4: 19.5, 8: 12.0}
    _write_sweep(tmp_path, 4, 30.0)
    assert recommend_trials_per_gpu(tmp_path, "cpu", (1, 2, 4, 8))[0] == 4
    assert recommend_trials_per_gpu(tmp_path, "cpu", (1, 2))[0] == 2  # only the sweeps that ran
    assert recommend_trials_per_gpu(tmp_path, "cpu", ()) == (None, {})


def _wheel(folder: Path, module: str) -> str:
    """A minimal pure-Python wheel of distribution ``module`` holding ``module.py``."""
    name = f"{module}-1.0-py3-none-any.whl"
    files = {
        f"{module}.py": "VALUE = 42\n",
        f"{module}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {module}\nVersion: 1.0\n",
        f"{module}-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{module}-1.0.dist-info/RECORD,,")
    with zipfile.ZipFile(folder / name, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
        archive.writestr(f"{module}-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    return name


def test_ensure_installs_a_missing_module_offline_into_the_site_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    installed_already = f"pytest-{pytest.__version__}-py3-none-any.whl"  # same version here: not installed
    manifest = {"wheels": [_wheel(wheels, "tl_offline_probe"), installed_already]}
    (wheels / MANIFEST).write_text(json.dumps(manifest))
    outcome = ensure(wheels, modules=("tl_offline_probe", "json"), site=tmp_path / "site")
    assert outcome["missing"] == ["tl_offline_probe"] and outcome["still_missing"] == []
    assert outcome["installed"] == ["tl_offline_probe-1.0-py3-none-any.whl"] and outcome["error"] is None
    assert (tmp_path / "site" / "tl_offline_probe.py").is_file()
    assert str(tmp_path / "site") in os.environ["PYTHONPATH"].split(os.pathsep)
    import tl_offline_probe

    assert tl_offline_probe.VALUE == 42
    sys.modules.pop("tl_offline_probe")


def test_ensure_refuses_wheels_of_another_python(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    manifest = {"python_version": "2.7", "wheels": [_wheel(wheels, "tl_probe27")]}
    (wheels / MANIFEST).write_text(json.dumps(manifest))
    outcome = ensure(wheels, modules=("tl_probe27",), site=tmp_path / "site")
    assert outcome["installed"] == [] and outcome["still_missing"] == ["tl_probe27"]
    assert "Python 2.7" in outcome["error"] and "GPU_PYTHON_VERSION=" in outcome["error"]
    assert not (tmp_path / "site").exists()


def test_wheel_names_and_import_check():
    assert wheel_distribution("pytorch_metric_learning-2.9.0-py3-none-any.whl") == (
        "pytorch-metric-learning",
        "2.9.0",
    )
    assert import_error(("json", "csv")) is None
    assert "ModuleNotFoundError" in import_error(("json", "tl_module_nobody_has"))


def test_ensure_without_wheels_says_how_to_get_them(tmp_path):
    outcome = ensure(tmp_path, modules=("tl_module_nobody_has",))
    assert outcome["still_missing"] == ["tl_module_nobody_has"] and "make gpu-wheels" in outcome["error"]
    assert ensure(tmp_path, modules=("json",)) == {
        "missing": [],
        "installed": [],
        "still_missing": [],
        "error": None,
    }


def test_platforms_expand_to_older_manylinux_tags():
    tags = expand_platforms(["manylinux_2_28_x86_64", "linux_aarch64"])
    assert tags[0] == "manylinux_2_28_x86_64" and "manylinux_2_17_x86_64" in tags
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64"} <= set(tags)
    assert "manylinux_2_29_x86_64" not in tags and tags[-1] == "linux_aarch64"


def _item(name, version, requires=()):
    return {"metadata": {"name": name, "version": version, "requires_dist": list(requires)}}


def test_download_list_drops_what_the_target_has_and_cuda_libraries():
    items = [
        _item("mlflow", "3.17.2", ["pandas<4", "pyarrow>=4", "flask", "pytest; extra == 'dev'"]),
        _item("pandas", "3.1.1", ["numpy>=2", "python-dateutil"]),
        _item("numpy", "2.4.6"),
        _item("python_dateutil", "2.9"),
        _item("pyarrow", "25.0"),
        _item("Flask", "3.1.3", ["click"]),
        _item("click", "8.5"),
        _item("nvidia-cublas-cu12", "12.6"),
        _item("faiss-gpu-cu12", "1.14", ["nvidia-cublas-cu12"]),
        _item("nvidia-ml-py", "13.5"),
    ]
    keep, dropped = to_download(items, provided=["pandas"], leave_out=["pyarrow"])
    assert keep == [
        "mlflow==3.17.2",
        "flask==3.1.3",
        "click==8.5",
        "faiss-gpu-cu12==1.14",
        "nvidia-ml-py==13.5",
    ]
    assert dropped == ["numpy", "nvidia-cublas-cu12", "pandas", "pyarrow", "python-dateutil"]


def test_data_is_found_in_the_data_folder_and_training_is_skipped_without_it(tmp_path, monkeypatch):
    monkeypatch.delenv("TRIPLETLAB_FASHION_MNIST_PATH", raising=False)
    monkeypatch.delenv("TRIPLETLAB_OMNIGLOT_PATH", raising=False)
    assert find_data(tmp_path) == {"fashion-mnist": None, "omniglot": None}
    train = next(s for s in gpu_steps(find_data(tmp_path), threads=8) if s.name == "train")
    assert "no Fashion-MNIST or Omniglot" in train.skip
    (tmp_path / "fashion-mnist").mkdir()
    (tmp_path / "omniglot").mkdir()
    data = find_data(tmp_path)
    assert data == {"fashion-mnist": str(tmp_path / "fashion-mnist"), "omniglot": str(tmp_path / "omniglot")}
    train = next(s for s in gpu_steps(data, threads=8) if s.name == "train")
    assert not train.skip and str(tmp_path / "omniglot") in train.argv


def test_full_plan_fits_the_budget_and_covers_every_measurement():
    steps = gpu_steps({"fashion-mnist": "f", "omniglot": "o"}, threads=8)
    assert sum(s.estimate_s for s in steps) <= 8 * 60 - 30  # 30 s left for installing the wheels
    assert [s.name for s in steps] == [
        "eval",
        "losses",
        "train",
        "compile",
        "sweep tpg=1",
        "sweep tpg=2",
        "sweep tpg=4",
        "sweep tpg=8",
    ]
    losses = next(s for s in steps if s.name == "losses").argv
    assert losses[losses.index("--sizes") + 1] == "256,512,1024,2048,4096"
    assert losses[losses.index("--dtypes") + 1] == "float32,bfloat16" and "cuda" in losses
    evaluation = next(s for s in steps if s.name == "eval").argv
    assert "70000x1000" in evaluation[evaluation.index("--cases") + 1].split(",")


def test_a_step_the_time_left_cannot_hold_is_skipped_without_running(tmp_path):
    def never_read(out, slug):
        raise AssertionError("the step ran")

    steps = [
        Step("late", "bench_nothing", [], 60, never_read),
        Step("no data", "bench_nothing", [], 1, never_read, skip="no data"),
    ]
    rows = run_steps(steps, tmp_path, "cpu", deadline=0.0)
    assert [(r["step"], r["status"]) for r in rows] == [("late", "skipped"), ("no data", "skipped")]
    assert "needs about 60 s" in rows[0]["result"] and rows[1]["result"] == "no data"


class _Parsed(Exception):
    pass


def test_every_gpu_command_line_is_accepted_by_its_benchmark(monkeypatch):
    for method in ("parse_args", "parse_intermixed_args"):
        original = getattr(argparse.ArgumentParser, method)

        def parse_then_stop(self, *args, original=original, **kwargs):
            original(self, *args, **kwargs)  # exits with status 2 on an unknown or malformed argument
            raise _Parsed

        monkeypatch.setattr(argparse.ArgumentParser, method, parse_then_stop)
    for step in gpu_steps({"fashion-mnist": "f", "omniglot": "o"}, threads=8):
        module = importlib.import_module(f"benchmarks.{step.module}")
        with pytest.raises(_Parsed):
            module.main([*step.argv, "--out", "results"])


def test_wheels_are_resolved_for_the_project_dependencies_less_those_left_out():
    packages = project_packages(REPO / "pyproject.toml", LEAVE_OUT)
    names = {p.split(">")[0].split("=")[0].split(";")[0].strip() for p in packages}
    assert {"optuna", "mlflow", "pytorch-metric-learning", "torch"} <= names
    assert "optuna-dashboard" not in names


def test_without_the_required_modules_the_run_stops_and_says_why(tmp_path, monkeypatch, capsys):
    import benchmarks.bench_gpu as bench_gpu

    outcome = {
        "missing": ["mlflow"],
        "installed": [],
        "still_missing": ["mlflow"],
        "error": "no manifest.json",
    }
    monkeypatch.setattr(bench_gpu, "ensure", lambda wheels: outcome)
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # main() extends it
    assert bench_gpu.main(["--dry-run", "--out", str(tmp_path / "out"), "--wheels", str(tmp_path)]) == 1
    assert "still missing: mlflow" in capsys.readouterr().err and not (tmp_path / "out").exists()
