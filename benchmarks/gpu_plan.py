"""What ``make bench-gpu`` runs: each benchmark's command line at GPU size and at toy size, and how
one summary line is read back from the result files it writes.

A step is one ``python -m benchmarks.<module>`` command with an estimate of its seconds on one CUDA
device (the runner skips a step that the time left cannot hold) and a reader of its JSON report;
a step that cannot run here (no data) carries the reason instead.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

SWEEP_TRIALS_PER_GPU = (1, 2, 4, 8)
DRY_TRIALS_PER_GPU = (1,)
SWEEP_STEP = "sweep tpg={}"
EVAL_SECONDS_TARGET = 2.0  # MAP@R of 70k embeddings on one GPU
TRAIN_SPEEDUP_TARGET = 10.0  # tripletlab images/s over PML's trainer
SAME_METRICS = 1e-4  # largest difference from PML's metrics (GPU top-k may order near-ties differently)
FASTER_WITHIN = 0.05  # a smaller trials_per_gpu within 5% of the best trials/minute is preferred


@dataclass(frozen=True)
class Step:
    """One benchmark command; ``read(out, slug)`` turns its report into (result, target, met)."""

    name: str
    module: str
    argv: list[str]
    estimate_s: float
    read: Callable[[Path, str], tuple[str, str, bool | None]]
    skip: str = ""

    @property
    def timeout_s(self) -> float:
        """When the runner stops the step's process (a sweep stops itself sooner, at 2x, to report)."""
        return 3 * self.estimate_s


def _load(out: Path, stem: str) -> dict:
    return json.loads((out / f"{stem}.json").read_text())


def read_eval(out: Path, slug: str) -> tuple[str, str, bool | None]:
    cases = _load(out, f"eval-{slug}")["cases"]
    parts, largest = [], max(c["n"] for c in cases)
    for c in cases:
        vs = ", ".join(f"{v:.1f}x {name}" for name, v in c["speedup"].items()) or "no PML"
        parts.append(f"{c['n']}x{c['classes']}: {c['median_seconds']['tripletlab']:.2f} s ({vs})")
    worst = max(c["median_seconds"]["tripletlab"] for c in cases if c["n"] == largest)
    exact = all(d < SAME_METRICS for c in cases for d in c["max_abs_diff"].values())
    target = f"{largest} embeddings < {EVAL_SECONDS_TARGET:.0f} s; same metrics as PML"
    return "; ".join(parts), target, worst < EVAL_SECONDS_TARGET and exact


def read_losses(out: Path, slug: str) -> tuple[str, str, bool | None]:
    report = _load(out, f"losses-{slug}")
    rows = [r for r in report["results"] if r["n"] >= 512] or report["results"]  # toy sizes: all
    parts = []
    for dtype in dict.fromkeys(r["dtype"] for r in rows):
        ratios = [r["ratio_floor"] for r in rows if r["dtype"] == dtype and r["ratio_floor"]]
        pml = [r["ratio_pml"] for r in rows if r["dtype"] == dtype and r["ratio_pml"]]
        parts.append(
            f"{dtype}: worst {max(ratios):.2f}x floor" + (f", worst {max(pml):.2f}x PML" if pml else "")
        )
    failed = sum(bool(r["ours_note"]) for r in report["results"])
    misses = report["target_misses"]
    result = "; ".join(parts) + (f"; {failed} failed" if failed else "") + f"; {len(misses)} target misses"
    return result, "n >= 512: <= 3x floor, <= 0.5x PML (0.1x all-triplet)", bool(rows) and not misses


def train_reader(suffix: str = "") -> Callable[[Path, str], tuple[str, str, bool | None]]:
    """Reads ``train-<slug><suffix>.json`` (``-quick`` for bench_train's quick mode)."""

    def read(out: Path, slug: str) -> tuple[str, str, bool | None]:
        datasets = _load(out, f"train-{slug}{suffix}")["datasets"]
        parts = [
            f"{name}: {d['tripletlab']['images_per_second']:,.0f} images/s, {d['speedup_vs_pml']:.1f}x PML"
            for name, d in datasets.items()
        ]
        met = all(d["speedup_vs_pml"] >= TRAIN_SPEEDUP_TARGET for d in datasets.values())
        return "; ".join(parts), f">= {TRAIN_SPEEDUP_TARGET:.0f}x PML's trainer", met

    return read


def read_compile(out: Path, slug: str) -> tuple[str, str, bool | None]:
    checks = _load(out, f"compile-{slug}")["checks"]
    parts = [
        f"{c['check']}: failed"
        if "error" in c
        else f"{c['check']}: {c['speedup']:.2f}x, {c['graph_breaks']} breaks"
        + ("" if c["same_as_eager"] else ", differs from eager")
        for c in checks
    ]
    works = all("error" not in c and c["same_as_eager"] for c in checks)
    helps = works and all(c["speedup"] > 1 for c in checks)
    return "; ".join(parts), "compiles, equals eager, faster", helps


def sweep_reader(trials_per_gpu: int) -> Callable[[Path, str], tuple[str, str, bool | None]]:
    def read(out: Path, slug: str) -> tuple[str, str, bool | None]:
        report = _load(out, f"sweep-{slug}-tpg{trials_per_gpu}")
        gpu = report["gpu_utilisation"]
        per_minute = report["trials_per_minute"]
        result = (f"{per_minute:.1f} trials/min" if per_minute else "no finished trial") + (
            f", GPU busy {gpu['mean_percent']:.0f}% (mean)" if gpu else ", GPU utilisation not measured"
        )
        if report["exit_status"] != 0:
            result += f", sweep exit status {report['exit_status']}"
        return result, "trials/min (highest picks the default)", None

    return read


def recommend_trials_per_gpu(out: Path, slug: str, values) -> tuple[int | None, dict[int, float]]:
    """The trials_per_gpu with the most finished trials per minute (the smallest one within
    ``FASTER_WITHIN`` of the best) among ``values`` (those whose sweep ran), and the rate of each."""
    rates = {}
    for t in values:
        path = out / f"sweep-{slug}-tpg{t}.json"
        if path.is_file() and (rate := json.loads(path.read_text()).get("trials_per_minute")):
            rates[t] = rate
    if not rates:
        return None, rates
    best = max(rates.values())
    return min(t for t, r in rates.items() if r >= (1 - FASTER_WITHIN) * best), rates


def _sweep_step(trials_per_gpu: int, argv: list[str], estimate_s: float) -> Step:
    return Step(
        SWEEP_STEP.format(trials_per_gpu),
        "bench_sweep",
        [
            *argv,
            f"trials_per_gpu={trials_per_gpu}",
            "--tag",
            f"tpg{trials_per_gpu}",
            "--timeout",
            f"{2 * estimate_s:.0f}",
            "--allow-failure",
        ],
        estimate_s,
        sweep_reader(trials_per_gpu),
    )


def gpu_steps(data: dict[str, str | None], threads: int) -> list[Step]:
    """The full run on one CUDA device, about 7 minutes in all."""
    device = ["--device", "cuda", "--threads", str(threads)]
    train_data = []
    for flag, key in (("--fashion-mnist", "fashion-mnist"), ("--omniglot", "omniglot")):
        train_data += [flag, data.get(key) or ""]  # '' skips that dataset
    no_data = "" if any(data.values()) else "no Fashion-MNIST or Omniglot found (--data-dir)"
    sweep_config = [
        "--config",
        "fashion-mnist" if data.get("fashion-mnist") else "digits",
        "losses=[batch_hard,multi_similarity]",
        "epochs=1",
        "seeds=1",
        "pruner=none",
    ]
    if data.get("fashion-mnist"):
        sweep_config.append("dataset.max_per_class=500")
    steps = [
        Step(
            "eval",
            "bench_eval",
            [
                *device,
                "--cases",
                "10000x10,10000x1000,70000x10,70000x1000",
                "--repeats",
                "3",
                "--max-seconds",
                "30",
            ],
            45,
            read_eval,
        ),
        Step(
            "losses",
            "bench_losses",
            [
                *device,
                "--sizes",
                "256,512,1024,2048,4096",
                "--dims",
                "128,512",
                "--dtypes",
                "float32,bfloat16",
                "--repeats",
                "5",
            ],
            70,
            read_losses,
        ),
        Step(
            "train",
            "bench_train",
            [*device, *train_data, "--epochs", "2", "--max-per-class", "2000", "--workers", "4"],
            70,
            train_reader(),
            skip=no_data,
        ),
        Step(
            "compile", "bench_compile", [*device, "--losses", "batch_hard,multi_similarity"], 80, read_compile
        ),
    ]  # the sweeps last: the recommendation uses those that ran
    return steps + [
        _sweep_step(t, [*sweep_config, f"trials={max(4, 2 * t)}"], 45) for t in SWEEP_TRIALS_PER_GPU
    ]


def dry_steps(toy_data: dict[str, str]) -> list[Step]:
    """Every step at toy size on the CPU: checks the commands, the reports and the readers."""
    cpu = ["--device", "cpu", "--threads", "2"]
    steps = [
        Step("eval", "bench_eval", [*cpu, "--cases", "400x5,400x40", "--repeats", "1"], 10, read_eval),
        Step("losses", "bench_losses", [*cpu, "--quick", "--dtypes", "float32,bfloat16"], 10, read_losses),
        Step(
            "train",
            "bench_train",
            [
                *cpu,
                "--quick",
                "--workers",
                "0",
                "--fashion-mnist",
                toy_data["fashion-mnist"],
                "--omniglot",
                toy_data["omniglot"],
            ],
            15,
            train_reader("-quick"),
        ),
        Step(
            "compile",
            "bench_compile",
            [*cpu, "--quick", "--backend", "aot_eager", "--losses", "batch_hard"],
            15,
            read_compile,
        ),
    ]
    return steps + [
        _sweep_step(
            t,
            [
                "--config",
                "quick",
                "losses=[batch_hard]",
                "trials=1",
                "seeds=1",
                "epochs=1",
                "pruner=none",
                "--workers",
                str(t),
            ],
            30,
        )
        for t in DRY_TRIALS_PER_GPU
    ]
