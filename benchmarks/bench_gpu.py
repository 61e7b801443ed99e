"""Every GPU benchmark in one run on one CUDA device, within a time budget, and one summary table.

    python -m benchmarks.bench_gpu                       # one CUDA device, under 8 minutes
    python -m benchmarks.bench_gpu --data-dir DIR        # DIR/fashion-mnist/, DIR/omniglot/
    python -m benchmarks.bench_gpu --dry-run             # every step at toy size on the CPU

First the imports the benchmarks need (optuna, mlflow, pytorch-metric-learning, faiss) are checked,
and what is missing is installed without network from the wheels of ``make gpu-wheels``
(``benchmarks.gpu_deps``); the required ones must then import. Then each step of
``benchmarks.gpu_plan`` runs as its own process with a time limit: retrieval evaluation at 10k and
70k embeddings against PML (faiss-gpu k-NN where faiss sees the GPU), every loss at n = 256 to 4096,
d = 128 and 512, float32 and bfloat16, against PML and the matmul floor, training on Fashion-MNIST
and Omniglot against PML's trainer, torch.compile of the CNN and of two losses, and a short sweep
at trials_per_gpu 1, 2, 4 and 8 (trials per minute and nvidia-smi utilisation; the summary
recommends the default). A failing step is recorded and the next one runs; a step that the time
left of ``--budget-minutes`` cannot hold is skipped and says so. Each benchmark writes its own
``<benchmark>-cuda-<gpu>.md/.json``; this run adds ``gpu-cuda-<gpu>.md/.json`` with the summary.
The dry run writes to ``runs/bench-gpu-dry-run/`` on toy data it makes, and with the aot_eager
compile backend (no code generation).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from sweeps.markdown import markdown_lines

from .gpu_deps import OPTIONAL, REQUIRED, ensure, faiss_gpus, import_error
from .gpu_plan import (
    DRY_TRIALS_PER_GPU,
    SWEEP_STEP,
    SWEEP_TRIALS_PER_GPU,
    Step,
    dry_steps,
    gpu_steps,
    recommend_trials_per_gpu,
)
from .reporting import utc_now, write_report
from .toy_data import write_fashion_mnist, write_omniglot

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "benchmarks" / "results"
DRY_RUN_DIR = REPO / "runs" / "bench-gpu-dry-run"
FASHION_ENV, OMNIGLOT_ENV = "TRIPLETLAB_FASHION_MNIST_PATH", "TRIPLETLAB_OMNIGLOT_PATH"
FASHION_SYSTEM = Path("/usr/share/datasets/fashion-mnist")


def find_data(data_dir: Path | None) -> dict[str, str | None]:
    """Fashion-MNIST's folder and Omniglot's file or folder (its .npz or images_*.zip): the
    environment variables, else ``data_dir``'s ``fashion-mnist`` and ``omniglot``, else (Fashion-MNIST)
    the Debian package's folder; None where not found."""
    fashion = os.environ.get(FASHION_ENV) or (
        str(data_dir / "fashion-mnist") if data_dir else str(FASHION_SYSTEM)
    )
    omniglot = os.environ.get(OMNIGLOT_ENV) or (str(data_dir / "omniglot") if data_dir else None)
    return {
        "fashion-mnist": fashion if Path(fashion).is_dir() else None,
        "omniglot": omniglot if omniglot and Path(omniglot).exists() else None,
    }


def toy_data(folder: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    return {
        "fashion-mnist": str(write_fashion_mnist(folder / "fashion-mnist", rng)),
        "omniglot": str(write_omniglot(folder / "omniglot" / "images_background.npz", rng)),
    }


def stop(process: subprocess.Popen, grace_s: float = 30) -> None:
    """SIGTERM to the step's process group (a sweep then ends its workers), SIGKILL after ``grace_s``."""
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def run_step(step: Step, out: Path, slug: str, limit_s: float) -> dict:
    """Run one step's command in its own process for at most ``limit_s`` seconds and read its report."""
    out_arg = out.resolve().relative_to(REPO) if out.resolve().is_relative_to(REPO) else out  # as recorded
    command = [sys.executable, "-m", f"benchmarks.{step.module}", *step.argv, "--out", str(out_arg)]
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, start_new_session=True)
    try:
        status = process.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        status = None
        stop(process)
    row = {"step": step.name, "seconds": time.perf_counter() - start, "command": command[3:]}
    if status != 0:
        why = f"stopped after {limit_s:.0f} s" if status is None else f"exit status {status}"
        return {**row, "status": "failed", "result": why, "target": "", "met": None}
    try:
        result, target, met = step.read(out, slug)
    except (OSError, KeyError, ValueError, IndexError, TypeError) as error:
        return {
            **row,
            "status": "failed",
            "result": f"unreadable report: {error!r}"[:200],
            "target": "",
            "met": None,
        }
    return {**row, "status": "ok", "result": result, "target": target, "met": met}


def run_steps(steps: list[Step], out: Path, slug: str, deadline: float, judge: bool = True) -> list[dict]:
    """Run the steps in order while the time left holds them; ``judge=False`` (toy sizes) records
    the targets but not whether they were met."""
    rows = []
    for step in steps:
        left = deadline - time.monotonic()
        if step.skip or left < step.estimate_s:
            why = (
                step.skip or f"{left:.0f} s left of the budget, the step needs about {step.estimate_s:.0f} s"
            )
            rows.append(
                {
                    "step": step.name,
                    "status": "skipped",
                    "seconds": 0.0,
                    "met": None,
                    "target": "",
                    "result": why,
                }
            )
            continue
        print(f"== {step.name}: {' '.join(step.argv)}", flush=True)
        rows.append(run_step(step, out, slug, min(left, step.timeout_s)))
        if not judge:
            rows[-1]["met"] = None
    return rows


def deps_row(wheels: Path) -> dict:
    start = time.perf_counter()
    outcome = ensure(wheels)
    gpus, faiss_error = faiss_gpus()
    missing = [m for m in outcome["still_missing"] if m in REQUIRED]
    broken = None if missing else import_error(REQUIRED)
    result = (
        "all present"
        if not outcome["missing"]
        else f"installed {len(outcome['installed'])} wheels for {', '.join(outcome['missing'])}"
    )
    if outcome["error"]:
        result += f"; {outcome['error']}"
    result += f"; faiss: {f'{gpus} GPU(s)' if not faiss_error else 'not importable (' + faiss_error + ')'}"
    result += f"; still missing: {', '.join(missing)}" if missing else ""
    result += f"; import fails: {broken.splitlines()[-1]}" if broken else ""
    ok = not missing and not broken
    return {
        "step": "deps",
        "status": "ok" if ok else "failed",
        "seconds": time.perf_counter() - start,
        "result": result,
        "target": "optuna, mlflow, PML importable",
        "met": ok,
        "faiss_gpus": gpus,
        "import_error": broken,
        **outcome,
    }


def summary_markdown(report: dict) -> str:
    mark = {True: "yes", False: "**no**", None: "-"}
    lines = [
        f"# GPU benchmark summary ({report['device']})",
        "",
        f"- {'dry run at toy size on the CPU; ' if report['dry_run'] else ''}torch {report['torch']}, "
        f"git commit {report['git_commit']}, {report['date']}; {report['seconds']:.0f} s of a "
        f"{report['budget_minutes']:.0f}-minute budget",
        f"- data: Fashion-MNIST {report['data']['fashion-mnist'] or 'not found'}, "
        f"Omniglot {report['data']['omniglot'] or 'not found'}",
        "",
    ]
    rows = [
        [r["step"], r["status"], f"{r['seconds']:.0f}", r["result"], r["target"], mark[r["met"]]]
        for r in report["steps"]
    ]
    lines += markdown_lines(["step", "status", "seconds", "result", "target", "met"], rows, "llr")
    best, rates = report["trials_per_gpu"], report["trials_per_minute"]
    lines += [
        "",
        "trials_per_gpu: "
        + (
            f"**{best}** has the most finished trials per minute ("
            + ", ".join(f"{t}: {r:.1f}" for t, r in rates.items())
            + ")"
            if best
            else "not measured"
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="every step at toy size on the CPU")
    parser.add_argument("--budget-minutes", type=float, default=8.0, help="stop starting steps after this")
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="folder with fashion-mnist/ (the IDX files) and omniglot/ "
        f"(its .npz or images_*.zip; else ${FASHION_ENV}, ${OMNIGLOT_ENV})",
    )
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="the folder of `make gpu-wheels`")
    parser.add_argument("--only", help="comma-separated step names to run (e.g. eval,losses)")
    parser.add_argument(
        "--out", type=Path, help="result folder (default benchmarks/results; dry run: runs/bench-gpu-dry-run)"
    )
    args = parser.parse_args(argv)
    start, deadline = time.perf_counter(), time.monotonic() + 60 * args.budget_minutes
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    steps_done = [deps_row(args.wheels)]  # before the imports that need PML
    if steps_done[0]["status"] != "ok":
        print(f"bench_gpu: {steps_done[0]['result']}", file=sys.stderr)
        return 1
    import torch

    from experiments.tracking.provenance import git_commit

    from .bench_losses import describe_device, device_slug

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit(
            "bench_gpu: no CUDA device is visible; run with --dry-run to check the steps on the CPU"
        )
    out = args.out or (DRY_RUN_DIR if args.dry_run else RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cpu" if args.dry_run else "cuda")
    slug = device_slug(describe_device(device))
    data = toy_data(out / "toy-data") if args.dry_run else find_data(args.data_dir)
    if data.get("fashion-mnist"):
        os.environ[FASHION_ENV] = data["fashion-mnist"]  # the sweep's fashion-mnist config reads it
    steps = dry_steps(data) if args.dry_run else gpu_steps(data, threads=min(8, os.cpu_count() or 1))
    if args.only:
        steps = [s for s in steps if s.name.split()[0] in args.only.split(",")]
    steps_done += run_steps(steps, out, slug, deadline, judge=not args.dry_run)
    swept = [
        t
        for t in (DRY_TRIALS_PER_GPU if args.dry_run else SWEEP_TRIALS_PER_GPU)
        if any(r["step"] == SWEEP_STEP.format(t) and r["status"] == "ok" for r in steps_done)
    ]
    best, rates = recommend_trials_per_gpu(out, slug, swept)
    report = {
        "device": slug,
        "device_info": describe_device(device),
        "dry_run": args.dry_run,
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "date": utc_now(),
        "budget_minutes": args.budget_minutes,
        "seconds": time.perf_counter() - start,
        "data": data,
        "modules": {"required": list(REQUIRED), "optional": list(OPTIONAL)},
        "steps": steps_done,
        "trials_per_gpu": best,
        "trials_per_minute": rates,
    }
    write_report(out, f"gpu-{slug}", report, summary_markdown(report))
    return 0 if all(r["status"] != "failed" for r in steps_done) else 1


if __name__ == "__main__":
    raise SystemExit(main())
