"""Time forward + backward of every registry loss against pytorch-metric-learning and a matmul floor.

Each registry loss runs on random PK batches (K=4) at n in {128, 512, 2048} and d in {128, 512}
(``--sizes``, ``--dims``; ``--dtypes float32,bfloat16`` adds reduced-precision inputs), side by side with
PML's equivalent (TripletMarginLoss with BatchHardMiner / TripletMarginMiner,
MultiSimilarityLoss with and without MultiSimilarityMiner, CircleLoss) and with the floor: forward
and backward of ``(x @ x.T).sum()``, the Gram matrix every pairwise loss needs. Repeats are
interleaved across contenders (rotating the order) and medians reported, so background load hits
all alike. PML contenders that enumerate every triplet are skipped above ``--pml-max-triplets``; a
contender that raises (e.g. PML on bfloat16 inputs) is left out of that grid point with its error.
On CPU the times are process CPU time (all threads; wall time is kept in the JSON), so that other
processes on a shared machine do not skew the ratios. Peak memory is CUDA's ``max_memory_allocated`` above the
inputs; on CPU it is not measured (torch
allocations are invisible to tracemalloc and a per-contender subprocess would dominate the run).
Writes ``losses-<device>.md`` and ``.json`` naming the device, threads, torch version, git commit
and date.

    python -m benchmarks.bench_losses            # full grid, CPU (2 threads) and CUDA when present
    python -m benchmarks.bench_losses --quick    # a few seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

# Idle OpenMP threads sleep instead of spinning: on a shared, loaded machine spinning threads burn
# the CPU time being measured (tens of milliseconds per call). Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytorch_metric_learning  # noqa: E402
import torch  # noqa: E402
from pytorch_metric_learning import losses as pml_losses  # noqa: E402
from pytorch_metric_learning import miners as pml_miners  # noqa: E402

from experiments.tracking.provenance import git_commit  # noqa: E402
from losses import build_loss, list_losses, loss_info  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
K = 4
MARGIN = 0.2


@dataclass(frozen=True)
class Case:
    """One benchmarked loss: registry name and parameters, and PML's equivalent if it has one."""

    label: str
    name: str
    params: dict
    pml: Callable | None = None
    all_triplets: bool = False  # PML's equivalent enumerates every (a, p, n) triplet


def _pml_with_miner(loss, miner):
    return lambda x, y: loss(x, y, miner(x, y))


def built_in_cases() -> list[Case]:
    """Registry losses configured like their PML counterparts (euclidean distance on L2-normalised
    embeddings, margin 0.2, PML's reductions)."""
    euclid = dict(distance="euclidean", normalize=True, margin=MARGIN)
    return [
        Case(
            "triplet",
            "triplet",
            dict(euclid, mining="all", reduction="mean_nonzero"),
            lambda: pml_losses.TripletMarginLoss(margin=MARGIN),
            all_triplets=True,
        ),
        Case(
            "batch_all",
            "batch_all",
            dict(euclid, reduction="mean_nonzero"),
            lambda: _pml_with_miner(
                pml_losses.TripletMarginLoss(margin=MARGIN),
                pml_miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="all"),
            ),
            all_triplets=True,
        ),
        Case(
            "semi_hard",
            "semi_hard",
            dict(euclid),
            lambda: _pml_with_miner(
                pml_losses.TripletMarginLoss(margin=MARGIN),
                pml_miners.TripletMarginMiner(margin=MARGIN, type_of_triplets="semihard"),
            ),
            all_triplets=True,
        ),
        Case(
            "batch_hard",
            "batch_hard",
            dict(euclid, reduction="mean_nonzero"),
            lambda: _pml_with_miner(pml_losses.TripletMarginLoss(margin=MARGIN), pml_miners.BatchHardMiner()),
        ),
        Case(
            "multi_similarity",
            "multi_similarity",
            dict(miner=True),
            lambda: _pml_with_miner(pml_losses.MultiSimilarityLoss(), pml_miners.MultiSimilarityMiner(0.1)),
        ),
        Case(
            "multi_similarity[miner=False]",
            "multi_similarity",
            dict(miner=False),
            lambda: pml_losses.MultiSimilarityLoss(),
        ),
        Case("circle", "circle", {}, lambda: pml_losses.CircleLoss(m=0.25, gamma=256)),
        Case("triplet_center", "triplet_center", {}),
        Case("cross_modal_triplet", "cross_modal_triplet", {}),
        Case("info_nce", "info_nce", {}),
    ]


def all_cases() -> list[Case]:
    """The built-in cases plus any other registered loss (plugins) at its defaults."""
    cases = built_in_cases()
    known = {c.name for c in cases}
    return cases + [Case(name, name, {}) for name in list_losses() if name not in known]


def pk_batch(n: int, d: int, device: torch.device, seed: int, dtype: torch.dtype = torch.float32):
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n // K).repeat_interleave(K)[torch.randperm(n, generator=generator)]
    x = torch.randn(n, d, generator=generator)
    x_b = x + 0.5 * torch.randn(n, d, generator=generator)
    return x.to(device, dtype), x_b.to(device, dtype), labels.to(device)


def _step(fn: Callable[[], torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], None]:
    def run() -> None:
        value = fn()
        value.backward()
        for t in inputs:
            t.grad = None

    return run


def contenders(case: Case, x, x_b, labels, device) -> dict[str, Callable[[], None]]:
    """``ours`` and, if there is one, ``pml``: closures running one forward + backward."""
    params = dict(case.params)
    declared = {p.name for p in loss_info(case.name).params}
    if "num_classes" in declared:
        params.update(num_classes=int(labels.max()) + 1, embedding_dim=x.shape[1])
    ours = build_loss(case.name, **params).to(device)
    inputs = [x, x_b, *ours.parameters()]
    if loss_info(case.name).cross_modal:
        out = {"ours": _step(lambda: ours(x, labels, x_b, labels), inputs)}
    else:
        out = {"ours": _step(lambda: ours(x, labels), inputs)}
    if case.pml is not None:
        theirs = case.pml()
        out["pml"] = _step(lambda: theirs(x, labels), inputs)
    return out


def floor_step(x) -> Callable[[], None]:
    return _step(lambda: (x @ x.T).sum(), [x])


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def drop_failing(runs: dict[str, Callable[[], None]]) -> dict[str, str]:
    """Run each once (the warm-up: allocator, kernels, lazy initialisation); remove those that raise
    and return their errors by key."""
    errors = {}
    for key, run in list(runs.items()):
        try:
            run()
        except Exception as error:  # noqa: BLE001 (any contender's failure is reported, not fatal)
            errors[key] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"[:160]
            del runs[key]
    return errors


def time_interleaved(
    runs: dict[str, Callable[[], None]], repeats: int, device
) -> dict[str, tuple[float, float]]:
    """Median (wall, process CPU) milliseconds of each run over ``repeats`` rounds, the order
    rotating every round (after a warm-up run of each, see :func:`drop_failing`)."""
    times: dict[str, list[tuple[float, float]]] = {key: [] for key in runs}
    keys = list(runs)
    for r in range(repeats):
        for key in keys[r % len(keys) :] + keys[: r % len(keys)]:
            _sync(device)
            wall, cpu = time.perf_counter(), time.process_time()
            runs[key]()
            _sync(device)
            times[key].append(((time.perf_counter() - wall) * 1e3, (time.process_time() - cpu) * 1e3))
    return {
        key: (statistics.median(t[0] for t in values), statistics.median(t[1] for t in values))
        for key, values in times.items()
    }


def peak_memory_mb(run: Callable[[], None], device) -> float | None:
    if device.type != "cuda":
        return None
    _sync(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    run()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def _row(case: Case, n: int, d: int, dtype: torch.dtype, timed: dict, clock: int, notes: dict) -> dict:
    """One result row from the timings (``None`` where a contender did not run) and its notes."""

    def ms(key, index=clock):
        return timed[key][index] if key in timed else None

    ours, pml, floor = ms(f"ours:{case.label}"), ms(f"pml:{case.label}"), ms("floor")
    return {
        "loss": case.label,
        "name": case.name,
        "n": n,
        "d": d,
        "dtype": str(dtype).removeprefix("torch."),
        "ours_ms": ours,
        "pml_ms": pml,
        "floor_ms": floor,
        "ratio_floor": ours / floor if ours and floor else None,
        "ours_wall_ms": ms(f"ours:{case.label}", 0),
        "floor_wall_ms": ms("floor", 0),
        "pml_wall_ms": ms(f"pml:{case.label}", 0),
        "ratio_pml": ours / pml if ours and pml else None,
        "ours_note": notes.get(f"ours:{case.label}"),
        "pml_note": notes.get(f"pml:{case.label}", None if case.pml else "no PML equivalent"),
    }


def bench_device(
    device: torch.device, sizes, dims, repeats: int, max_triplets: int, cases, dtypes=(torch.float32,)
) -> list[dict]:
    rows = []
    for dtype in dtypes:
        for n in sizes:
            triplets = n * (K - 1) * (n - K)
            for d in dims:
                x, x_b, labels = pk_batch(n, d, device, seed=n + d, dtype=dtype)
                x.requires_grad_(True)
                x_b.requires_grad_(True)
                runs = {"floor": floor_step(x)}
                notes = {}
                for case in cases:
                    for who, run in contenders(case, x, x_b, labels, device).items():
                        if who == "pml" and case.all_triplets and triplets > max_triplets:
                            notes[f"pml:{case.label}"] = (
                                f"skipped: enumerates {triplets} triplets (> --pml-max-triplets)"
                            )
                            continue
                        runs[f"{who}:{case.label}"] = run
                notes.update({key: f"failed: {why}" for key, why in drop_failing(runs).items()})
                timed = time_interleaved(runs, repeats, device)
                clock = 1 if device.type == "cpu" else 0  # CPU: process time, robust to other processes' load
                for case in cases:
                    row = _row(case, n, d, dtype, timed, clock, notes)
                    row["ours_peak_mb"] = (
                        peak_memory_mb(runs[f"ours:{case.label}"], device)
                        if row["ours_ms"] is not None
                        else None
                    )
                    row["pml_peak_mb"] = (
                        peak_memory_mb(runs[f"pml:{case.label}"], device)
                        if row["pml_ms"] is not None
                        else None
                    )
                    rows.append(row)
                print(
                    f"{device.type} {row['dtype']} n={n} d={d}: "
                    + ", ".join(
                        f"{r['loss']} {_fmt(r['ours_ms'])} ms"
                        + (f" ({r['ratio_pml']:.2f}x PML)" if r["ratio_pml"] else "")
                        for r in rows[-len(cases) :]
                    ),
                    flush=True,
                )
    return rows


def describe_device(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"type": "cuda", "name": torch.cuda.get_device_name(device), "cuda": torch.version.cuda}
    model = platform.processor() or platform.machine()
    try:
        match = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        model = match.group(1).strip() if match else model
    except OSError:
        pass
    return {"type": "cpu", "name": model, "threads": torch.get_num_threads()}


def device_slug(info: dict) -> str:
    if info["type"] == "cpu":
        return "cpu"
    return "cuda-" + re.sub(r"[^a-z0-9]+", "-", info["name"].lower()).strip("-")


def _fmt(value, spec=".2f"):
    return "-" if value is None else format(value, spec)


def target_misses(rows: list[dict], all_triplet_labels: set[str]) -> list[str]:
    """Rows at n >= 512 over the targets: <= 0.5x PML (0.1x for all-triplet miners) and <= 3x floor."""
    misses = []
    for r in rows:
        if r["n"] < 512:
            continue
        where = f"{r['loss']} n={r['n']} d={r['d']}" + ("" if r["dtype"] == "float32" else f" {r['dtype']}")
        pml_target = 0.1 if r["loss"] in all_triplet_labels else 0.5
        if r["ratio_pml"] is not None and r["ratio_pml"] > pml_target:
            misses.append(f"{where}: {r['ratio_pml']:.2f}x PML (target {pml_target}x)")
        if r["ratio_floor"] is not None and r["ratio_floor"] > 3:
            misses.append(f"{where}: {r['ratio_floor']:.2f}x floor (target 3x)")
        if r["ours_note"]:
            misses.append(f"{where}: {r['ours_note']}")
    return misses


def to_markdown(report: dict) -> str:
    dev = report["device"]
    lines = [
        f"# Loss benchmark: {dev['name']}",
        "",
        f"- device: {dev['type']} {dev['name']}"
        + (f", {dev['threads']} threads" if "threads" in dev else ""),
        f"- torch {report['torch']}, pytorch-metric-learning {report['pytorch_metric_learning']}",
        f"- git commit {report['git_commit']}, {report['date']}",
        f"- forward + backward, PK batches with K={K}, median of {report['repeats']} interleaved repeats; "
        + (
            "times are process CPU time (all threads), which other processes' load barely affects; "
            "wall-clock medians are in the JSON"
            if dev["type"] == "cpu"
            else "wall-clock times"
        ),
        "- floor: forward + backward of `(x @ x.T).sum()`; ratios < 1 are faster than the reference",
        "- peak memory: "
        + ("CUDA max_memory_allocated above the inputs" if dev["type"] == "cuda" else "not measured on CPU"),
        "",
        "| loss | n | d | dtype | ours ms | PML ms | floor ms | ours / PML | ours / floor | peak MB ours "
        "| peak MB PML | note |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["results"]:
        note = "; ".join(n for n in (r["ours_note"] and f"ours {r['ours_note']}", r["pml_note"]) if n)
        lines.append(
            f"| {r['loss']} | {r['n']} | {r['d']} | {r['dtype']} | {_fmt(r['ours_ms'])} | "
            f"{_fmt(r['pml_ms'])} | {_fmt(r['floor_ms'])} | {_fmt(r['ratio_pml'])} | "
            f"{_fmt(r['ratio_floor'])} | {_fmt(r['ours_peak_mb'], '.1f')} "
            f"| {_fmt(r['pml_peak_mb'], '.1f')} "
            f"| {note} |"
        )
    misses = report["target_misses"]
    lines += [
        "",
        "Targets at n >= 512: <= 0.5x PML (<= 0.1x for PML's all-triplet miners), <= 3x floor.",
        "Missed: " + ("none" if not misses else ""),
    ]
    lines += [f"- {m}" for m in misses]
    return "\n".join(lines) + "\n"


def run(
    device: torch.device, sizes, dims, repeats: int, max_triplets: int, out_dir: Path, dtypes=(torch.float32,)
) -> dict:
    cases = all_cases()
    info = describe_device(device)
    commit = git_commit()  # before the run: the code being measured
    rows = bench_device(device, sizes, dims, repeats, max_triplets, cases, dtypes)
    report = {
        "device": info,
        "torch": torch.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "git_commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "repeats": repeats,
        "k": K,
        "results": rows,
        "target_misses": target_misses(rows, {c.label for c in cases if c.all_triplets}),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"losses-{device_slug(info)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(report))
    print(f"wrote {stem}.md and {stem}.json")
    return report


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(v) for v in text.split(","))


def _dtypes(text: str) -> tuple[torch.dtype, ...]:
    names = text.split(",")
    unknown = [n for n in names if not isinstance(getattr(torch, n, None), torch.dtype)]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown dtype(s) {', '.join(unknown)}; e.g. float32,bfloat16")
    return tuple(getattr(torch, n) for n in names)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 2 repeats: a smoke run")
    parser.add_argument(
        "--device",
        choices=("auto", "cpu", "cuda"),
        default="auto",
        help="auto: CPU, and CUDA too when present",
    )
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--pml-max-triplets",
        type=int,
        default=5_000_000,
        help="skip PML contenders that enumerate more triplets than this",
    )
    parser.add_argument(
        "--sizes", type=_ints, help="comma-separated batch sizes n (default 128,512,2048; quick: 32,64)"
    )
    parser.add_argument(
        "--dims", type=_ints, help="comma-separated dimensions d (default 128,512; quick: 16)"
    )
    parser.add_argument(
        "--dtypes",
        type=_dtypes,
        default=(torch.float32,),
        help="comma-separated input dtypes, e.g. float32,bfloat16 (default float32)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available; use --device cpu")
    torch.set_num_threads(args.threads)
    sizes, dims, repeats = (
        ((32, 64), (16,), 2) if args.quick else ((128, 512, 2048), (128, 512), args.repeats)
    )
    sizes, dims = args.sizes or sizes, args.dims or dims
    devices = [torch.device("cpu")] if args.device in ("auto", "cpu") else []
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        devices.append(torch.device("cuda"))
    for device in devices:
        run(device, sizes, dims, repeats, args.pml_max_triplets, args.out, args.dtypes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
