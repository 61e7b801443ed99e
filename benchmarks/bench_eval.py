"""Time retrieval evaluation (P@1, R-precision, MAP@R) against pytorch-metric-learning.

Runs ``experiments.eval.retrieval.retrieval_metrics`` side by side with PML's ``AccuracyCalculator``
(``k="max_bin_count"``, the smallest k that makes R-precision and MAP@R exact) using its faiss
k-NN and its torch k-NN (``CustomKNN`` over unnormalised euclidean distances) on the same
synthetic clustered embeddings (d=128; e.g. 10 classes like Fashion-MNIST, and 1000 classes).
Repeats are interleaved across methods and medians reported, so background load hits all alike.
PML is skipped (and the report says so) where its k-NN would return more than
``--pml-max-neighbours`` neighbours: at 70000 embeddings of 10 classes (k = 7000) PML with faiss
needs more than 24 GiB.
Writes ``eval-<device>.md`` and ``eval-<device>.json`` naming the device, torch version, git
commit and date.

    python -m benchmarks.bench_eval            # 10k and 70k embeddings
    python -m benchmarks.bench_eval --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import pytorch_metric_learning
import torch
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator
from pytorch_metric_learning.utils.inference import CustomKNN

from experiments.eval.retrieval import HEADLINE_METRICS, RANKING_METRICS, retrieval_metrics
from experiments.tracking.provenance import git_commit
from sweeps.markdown import markdown_lines

from .bench_losses import describe_device, device_slug
from .pml_names import PML_NAMES
from .reporting import utc_now, write_report

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def clustered_embeddings(n: int, n_classes: int, dim: int, device: torch.device, seed: int = 0):
    """Gaussian classes of roughly equal size, overlapping enough that MAP@R is mid-range."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=generator)
    centres = 0.05 * torch.randn(n_classes, dim, generator=generator)
    x = centres[labels] + torch.randn(n, dim, generator=generator) / dim**0.5
    return x.to(device), labels.to(device)


def _ours(x, y, chunk_size):
    out = retrieval_metrics(x, y, ks=(1,), chunk_size=chunk_size, with_nmi=False)
    return {name: out[name] for name in RANKING_METRICS}


def _pml(knn_func, device):
    calc = AccuracyCalculator(
        include=tuple(PML_NAMES.values()), k="max_bin_count", device=device, knn_func=knn_func
    )

    def run(x, y, chunk_size):
        out = calc.get_accuracy(x, y)
        return {name: out[pml_name] for name, pml_name in PML_NAMES.items()}

    return run


def methods(device: torch.device, with_pml_torch: bool) -> dict:
    found = {"tripletlab": _ours}
    try:
        import faiss  # noqa: F401  (PML's default k-NN)

        found["pml-faiss"] = _pml(None, device)
    except ImportError:
        pass
    if with_pml_torch:
        found["pml-torch"] = _pml(CustomKNN(LpDistance(normalize_embeddings=False), batch_size=1024), device)
    return found


def _timed(fn, x, y, chunk_size, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn(x, y, chunk_size)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def pml_neighbours(labels: torch.Tensor) -> int:
    """Neighbours PML's k-NN returns with ``k="max_bin_count"``: n queries x the largest class."""
    return labels.numel() * int(torch.bincount(labels).max())


def run_case(n, n_classes, dim, repeats, device, runners, chunk_size, max_seconds, pml_max_neighbours):
    x, y = clustered_embeddings(n, n_classes, dim, device)
    neighbours = pml_neighbours(y)
    skipped = [name for name in runners if name != "tripletlab" and neighbours > pml_max_neighbours]
    runners = {name: fn for name, fn in runners.items() if name not in skipped}
    runners["tripletlab"](x[:256], y[:256], chunk_size)  # warm-up: kernels, allocator
    times = {name: [] for name in runners}
    values = {}
    for _ in range(repeats):
        for name, fn in runners.items():
            if times[name] and times[name][-1] > max_seconds:
                continue  # too slow to repeat: keep the runs we have
            seconds, values[name] = _timed(fn, x, y, chunk_size, device)
            times[name].append(seconds)
    medians = {name: statistics.median(ts) for name, ts in times.items()}
    ours = values["tripletlab"]
    others = [name for name in runners if name != "tripletlab"]
    return {
        "n": n,
        "classes": n_classes,
        "dim": dim,
        "repeats": repeats,
        "median_seconds": medians,
        "all_seconds": times,
        "metrics": ours,
        "speedup": {name: medians[name] / medians["tripletlab"] for name in others},
        "max_abs_diff": {
            name: max(abs(values[name][m] - ours[m]) for m in RANKING_METRICS) for name in others
        },
        "skipped": {name: f"k-NN of {neighbours:,} neighbours (> --pml-max-neighbours)" for name in skipped},
    }


def device_label(device: torch.device) -> tuple[str, str]:
    """(file-name tag, description) of the device; the tag as the other benchmarks write it."""
    info = describe_device(device)
    if device.type == "cuda":
        return device_slug(info), info["name"]
    cpu = platform.processor() or platform.machine()
    return device_slug(info), f"CPU ({cpu}), {torch.get_num_threads()} threads"


def to_markdown(report: dict) -> str:
    names = list(
        dict.fromkeys(
            name for case in report["cases"] for name in [*case["median_seconds"], *case.get("skipped", {})]
        )
    )
    lines = [
        f"# Retrieval evaluation benchmark ({report['device']})",
        "",
        f"- device: {report['device_description']}",
        f"- torch {report['torch']}, pytorch-metric-learning {report['pytorch_metric_learning']}",
        f"- git commit {report['git_commit']}, {report['date']}",
        f"- median of up to {report['cases'][0]['repeats']} interleaved repeats (one run where a run "
        f"took over {report['max_seconds']:.0f} s); P@1, R-precision and MAP@R; PML with "
        '`k="max_bin_count"`; speedup = PML time / tripletlab time; synthetic Gaussian classes, '
        f"d={report['cases'][0]['dim']}",
        "",
    ]
    header = [
        "n",
        "classes",
        *(f"{n} (s)" for n in names),
        *(f"speedup vs {n}" for n in names[1:]),
        "max abs diff",
        HEADLINE_METRICS["map_at_r"],
    ]
    rows, notes = [], []
    for case in report["cases"]:
        seconds = case["median_seconds"]
        skipped = case.get("skipped", {})
        diffs = case["max_abs_diff"].values()
        rows.append(
            [
                case["n"],
                case["classes"],
                *(f"{seconds[n]:.3f}" if n in seconds else "skipped" for n in names),
                *(f"{case['speedup'][n]:.2f}x" if n in seconds else "-" for n in names[1:]),
                f"{max(diffs):.1e}" if diffs else "-",
                f"{case['metrics']['map_at_r']:.4f}",
            ]
        )
        notes += [
            f"- {case['n']} x {case['classes']}: {name} skipped, {why}" for name, why in skipped.items()
        ]
    lines += markdown_lines(header, rows)
    if notes:
        lines += ["", "Skipped contenders:", *notes]
    return "\n".join(lines) + "\n"


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat (a smoke test)")
    parser.add_argument(
        "--sizes", help="comma-separated numbers of embeddings (default 10000,70000; quick: 1000)"
    )
    parser.add_argument(
        "--classes", help="comma-separated numbers of classes (default 10,1000; quick: 10,100)"
    )
    parser.add_argument(
        "--cases",
        help="comma-separated NxC pairs (e.g. 10000x10,70000x1000) "
        "instead of every size with every class count",
    )
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, help="interleaved repeats (default 3; quick: 1)")
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=120.0,
        help="stop repeating a method once one of its runs took longer than this",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=int, default=None, help="queries per chunk (default: automatic)")
    parser.add_argument(
        "--pml-max-neighbours",
        type=int,
        default=100_000_000,
        help="skip PML where its k-NN returns more neighbours than this (n x largest "
        "class): 70000 x 7000 runs out of 24 GiB",
    )
    parser.add_argument("--no-pml-torch", action="store_true", help="skip PML's torch k-NN")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for eval-<device>.md/.json")
    args = parser.parse_args(argv)
    defaults = ("1000", "10,100", 1) if args.quick else ("10000,70000", "10,1000", 3)
    for name, default in zip(("sizes", "classes", "repeats"), defaults):
        if getattr(args, name) is None:
            setattr(args, name, default)
    return args


def case_list(args) -> list[tuple[int, int]]:
    """(n, classes) pairs to time."""
    if args.cases:
        try:
            return [tuple(int(v) for v in case.lower().split("x")) for case in args.cases.split(",")]
        except ValueError:
            raise SystemExit(f"--cases must look like 10000x10,70000x1000, got {args.cases!r}") from None
    return [(int(n), int(c)) for n in args.sizes.split(",") for c in args.classes.split(",")]


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    runners = methods(device, with_pml_torch=not args.no_pml_torch)
    cases = []
    for n, n_classes in case_list(args):
        case = run_case(
            n,
            n_classes,
            args.dim,
            args.repeats,
            device,
            runners,
            args.chunk_size,
            args.max_seconds,
            args.pml_max_neighbours,
        )
        print(
            json.dumps({k: case[k] for k in ("n", "classes", "median_seconds", "speedup", "max_abs_diff")}),
            flush=True,
        )
        cases.append(case)
    tag, description = device_label(device)
    report = {
        "device": tag,
        "device_description": description,
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "git_commit": git_commit(),
        "date": utc_now(),
        "threads": torch.get_num_threads(),
        "max_seconds": args.max_seconds,
        "cases": cases,
    }
    write_report(args.out, f"eval-{tag}", report, to_markdown(report))
    return report


if __name__ == "__main__":
    main()
