"""Time a whole comparison sweep end to end, sampling GPU utilisation while it runs.

Runs ``tripletlab sweep`` in a fresh output folder, MLflow store and Optuna journal (default: the
Fashion-MNIST comparison of every built-in loss, 20 trials each, 10 epochs, 3 final seeds, the
end-to-end benchmark of the speed issue) and samples ``nvidia-smi`` twice a second when it is
present. Writes ``sweep-<device>[-<tag>].md`` and ``.json``: the wall time, each loss's trials
(complete, pruned, failed), the tuning throughput (finished trials per minute between the first
trial's start and the last trial's end), and the GPU utilisation (mean, median, share of samples at
least 70% busy) and memory, with the device, torch version, commit, date and command.

    python -m benchmarks.bench_sweep                           # needs Fashion-MNIST (see README)
    python -m benchmarks.bench_sweep --config quick trials=2   # a smoke run on digits
    python -m benchmarks.bench_sweep --tag tpg4 trials_per_gpu=4 trials=8 epochs=1 seeds=1
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import optuna
import torch

from experiments.tracking.provenance import git_commit
from sweeps.markdown import markdown_lines
from sweeps.storage import default_storage, open_storage

from .bench_losses import RESULTS_DIR, describe_device, device_slug
from .reporting import utc_now, write_report

DEFAULT_OVERRIDES = ("trials=20", "epochs=10", "seeds=3")
BUSY = 70  # percent: the target share of time the GPU is busy
TIMED_OUT = -1  # exit status recorded for a sweep stopped at --timeout


class GpuSampler:
    """``nvidia-smi`` utilisation (%) and memory (MiB) of every GPU, sampled every ``interval_ms``
    in a background process; no samples where there is no ``nvidia-smi``."""

    def __init__(self, interval_ms: int = 500) -> None:
        self.samples: list[tuple[float, float]] = []
        query = [
            "nvidia-smi",
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
            f"-lms={interval_ms}",
        ]
        try:
            self.process = subprocess.Popen(
                query, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
        except OSError:
            self.process = None
            return
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                busy, memory = (float(v) for v in line.split(","))
            except ValueError:
                continue
            self.samples.append((busy, memory))

    def stop(self) -> dict | None:
        if self.process is None:
            return None
        self.process.terminate()
        self.process.wait()
        self.reader.join(timeout=5)
        if not self.samples:
            return None
        busy = [b for b, _ in self.samples]
        return {
            "samples": len(busy),
            "mean_percent": statistics.fmean(busy),
            "median_percent": statistics.median(busy),
            "share_at_least_busy": sum(b >= BUSY for b in busy) / len(busy),
            "max_memory_mib": max(m for _, m in self.samples),
        }


def trial_counts(storage_spec: str) -> tuple[dict[str, dict[str, int]], float | None]:
    """Each study's trials by state (complete, pruned, failed), read back from the sweep's storage,
    and the finished trials per minute over the span from the first start to the last finish."""
    storage = open_storage(storage_spec)
    counts, starts, ends = {}, [], []
    for summary in optuna.get_all_study_summaries(storage, include_best_trial=False):
        study = optuna.load_study(study_name=summary.study_name, storage=storage)
        trials = study.get_trials(deepcopy=False)
        states = [t.state.name.lower() for t in trials]
        counts[summary.study_name] = {state: states.count(state) for state in ("complete", "pruned", "fail")}
        finished = [t for t in trials if t.datetime_start and t.datetime_complete]
        starts += [t.datetime_start for t in finished]
        ends += [t.datetime_complete for t in finished]
    span = (max(ends) - min(starts)).total_seconds() if ends else 0.0
    return counts, (60 * len(ends) / span if span > 0 else None)


def run_sweep(
    config: str, overrides: list[str], workers: int | None, work_dir: Path, timeout: float | None = None
) -> tuple[list[str], float, int]:
    """Run the sweep CLI in ``work_dir``; returns the command, its wall seconds and exit status
    (``TIMED_OUT`` when it ran past ``timeout`` seconds and was stopped)."""
    command = [
        sys.executable,
        "-m",
        "tripletlab.cli",
        "sweep",
        "--config",
        config,
        *overrides,
        "--output-dir",
        str(work_dir / "runs"),
        "--tracking-uri",
        f"sqlite:///{work_dir / 'mlflow.db'}",
    ]
    if workers:
        command += ["--workers", str(workers)]
    start = time.perf_counter()
    process = subprocess.Popen(command, start_new_session=True)  # its workers share its process group
    status = TIMED_OUT
    try:
        status = process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
    finally:  # timed out, or this process is being stopped: the sweep's workers go too
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
    return command, time.perf_counter() - start, status


def _exit_on_sigterm(signum, frame) -> None:
    raise SystemExit(128 + signum)


def to_markdown(report: dict) -> str:
    device, gpu = report["device"], report["gpu_utilisation"]
    lines = [
        f"# End-to-end sweep benchmark ({device['name']})",
        "",
        f"- device: {device['name']} ({device['type']}); torch {report['torch']}",
        f"- git commit {report['git_commit']}, {report['date']}",
        f"- command: `tripletlab sweep --config {report['config']} {' '.join(report['overrides'])}"
        + (f" --workers {report['workers']}`" if report["workers"] else "`"),
        f"- wall time: **{report['wall_seconds'] / 60:.1f} min** ({report['wall_seconds']:.0f} s), "
        + (
            "stopped at the time limit"
            if report["exit_status"] == TIMED_OUT
            else f"exit status {report['exit_status']}"
        ),
        "- tuning throughput: "
        + (
            f"{report['trials_per_minute']:.1f} finished trials per minute"
            if report["trials_per_minute"]
            else "no finished trial"
        ),
        "",
    ]
    if gpu is None:
        lines.append("- GPU utilisation: not measured (no `nvidia-smi` on this machine)")
    else:
        lines.append(
            f"- GPU utilisation over {gpu['samples']} samples: mean {gpu['mean_percent']:.0f}%, "
            f"median {gpu['median_percent']:.0f}%, at least {BUSY}% busy in "
            f"{100 * gpu['share_at_least_busy']:.0f}% "
            f"of samples; peak memory {gpu['max_memory_mib']:.0f} MiB"
        )
    rows = [[name, c["complete"], c["pruned"], c["fail"]] for name, c in report["trials"].items()]
    lines += ["", *markdown_lines(["study", "complete", "pruned", "failed"], rows, "lrrr")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="fashion-mnist", help="sweep config (default: fashion-mnist)")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help=f"sweep overrides (default: {' '.join(DEFAULT_OVERRIDES)})",
    )
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: the sweep's)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for sweep-<device>.md/.json")
    parser.add_argument("--tag", default="", help="suffix of the result files: sweep-<device>-<tag>.md")
    parser.add_argument("--timeout", type=float, default=None, help="stop the sweep after this many seconds")
    parser.add_argument(
        "--allow-failure",
        action="store_true",
        help="write the report and return even when the sweep fails or times out",
    )
    args = parser.parse_intermixed_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)  # stopped from outside: end the sweep's process group
    overrides = args.overrides or list(DEFAULT_OVERRIDES)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory(prefix="tripletlab-bench-sweep-") as tmp:
        work_dir = Path(tmp)
        sampler = GpuSampler()
        command, seconds, status = run_sweep(args.config, overrides, args.workers, work_dir, args.timeout)
        utilisation = sampler.stop()
        runs = work_dir / "runs"
        sweep_dirs = [p for p in runs.iterdir() if p.is_dir()] if runs.exists() else []
        trials, per_minute = (
            trial_counts(default_storage(sweep_dirs[0])) if len(sweep_dirs) == 1 else ({}, None)
        )
    info = describe_device(device)
    report = {
        "device": info,
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "date": utc_now(),
        "config": args.config,
        "overrides": overrides,
        "workers": args.workers,
        "command": command[1:],
        "wall_seconds": seconds,
        "exit_status": status,
        "gpu_utilisation": utilisation,
        "trials": trials,
        "trials_per_minute": per_minute,
    }
    write_report(
        args.out,
        f"sweep-{device_slug(info)}{'-' + args.tag if args.tag else ''}",
        report,
        to_markdown(report),
    )
    if status != 0 and not args.allow_failure:
        raise SystemExit(f"the sweep exited with status {status}; see its output above")
    return report


if __name__ == "__main__":
    main()
