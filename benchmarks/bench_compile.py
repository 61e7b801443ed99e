"""Check that ``torch.compile`` of the model and of the losses works, matches eager mode, and helps.

Two checks on random inputs, each eager against compiled on the same weights and batch:

- ``model``: forward + backward of the small CNN with batch-hard loss on a PK batch of images
  (channels-last, bf16 autocast on CUDA, as the trainer runs it), the CNN compiled as
  ``train.compile=true`` does;
- ``loss:<name>``: forward + backward of a loss alone on a PK batch of embeddings, its ``compute``
  compiled (the call the trainer makes after the first, checked batch).

For each: the first compiled call's seconds (tracing and code generation), median milliseconds per
step of both over interleaved repeats, the speedup, the graph breaks dynamo reported, and the
largest difference of the loss value and of the gradients from eager. Writes
``compile-<device>.md`` and ``.json``.

    python -m benchmarks.bench_compile                          # inductor, the default backend
    python -m benchmarks.bench_compile --quick --backend aot_eager   # tracing only, a few seconds
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from experiments.eval.run_metrics import channels_last
from experiments.models.image import build_model
from experiments.tracking.provenance import git_commit
from losses import build_loss

from .bench_losses import RESULTS_DIR, describe_device, device_slug

LOSSES = ("batch_hard", "triplet", "multi_similarity", "circle")
K = 4


def _pk_labels(n: int, device) -> torch.Tensor:
    return torch.arange(n // K, device=device).repeat_interleave(K)


def _step(fn: Callable, inputs: list[torch.Tensor], params: list[torch.Tensor]):
    """One forward + backward; returns the detached value and the gradients of ``params``."""
    for p in params:
        p.grad = None
    value = fn(*inputs)
    value.backward()
    return value.detach().float(), [p.grad.detach().float().clone() for p in params]


def _max_diff(eager, compiled) -> float:
    (value, grads), (value_c, grads_c) = eager, compiled
    diffs = [(value - value_c).abs().max()] + [(g - g_c).abs().max() for g, g_c in zip(grads, grads_c)]
    return float(torch.stack(diffs).max())


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_ms(fn: Callable, device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def check(
    name: str,
    eager: Callable,
    compiled: Callable,
    inputs: list[torch.Tensor],
    params: list[torch.Tensor],
    repeats: int,
    device,
) -> dict:
    """Compare one step of ``eager`` and ``compiled`` (its first call compiles), then time both over
    interleaved repeats."""
    from torch._dynamo.utils import counters

    counters.clear()
    reference = _step(eager, inputs, params)
    _sync(device)
    start = time.perf_counter()
    result = _step(compiled, inputs, params)
    _sync(device)
    compile_seconds = time.perf_counter() - start
    times = {"eager": [], "compiled": []}
    for r in range(repeats):
        for who, fn in (
            (("eager", eager), ("compiled", compiled))
            if r % 2 == 0
            else (("compiled", compiled), ("eager", eager))
        ):
            times[who].append(_timed_ms(lambda: _step(fn, inputs, params), device))
    eager_ms, compiled_ms = statistics.median(times["eager"]), statistics.median(times["compiled"])
    scale = float(torch.stack([reference[0].abs()] + [g.abs().max() for g in reference[1]]).max())
    return {
        "check": name,
        "compile_seconds": compile_seconds,
        "eager_ms": eager_ms,
        "compiled_ms": compiled_ms,
        "speedup": eager_ms / compiled_ms,
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "max_abs_diff": _max_diff(reference, result),
        "scale": scale,
    }


def _training_step(model, loss, amp) -> Callable:
    """The trainer's forward: the model under autocast, then the loss's ``compute`` in float32."""

    def step(x, y):
        with amp:
            embeddings = model(x)
        return loss.compute(embeddings.float(), y, None, None)

    return step


def model_check(device, batch: int, backend: str, repeats: int) -> dict:
    torch._dynamo.reset()
    model = build_model("cnn", 1, (28, 28), 64, True, seed=0).to(device).to(memory_format=torch.channels_last)
    loss = build_loss("batch_hard", margin=0.1)
    generator = torch.Generator().manual_seed(0)
    images = channels_last(torch.randn(batch, 1, 28, 28, generator=generator).to(device))
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    compiled = torch.compile(model, backend=backend)  # as train.compile=true does
    return check(
        "model",
        _training_step(model, loss, amp),
        _training_step(compiled, loss, amp),
        [images, _pk_labels(batch, device)],
        list(model.parameters()),
        repeats,
        device,
    )


def loss_check(name: str, device, n: int, dim: int, backend: str, repeats: int) -> dict:
    torch._dynamo.reset()
    loss = build_loss(name).to(device)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(n, dim, generator=generator).to(device).requires_grad_(True)

    def eager(e, y):
        return loss.compute(e, y, None, None)

    return check(
        f"loss:{name}",
        eager,
        torch.compile(eager, backend=backend),
        [x, _pk_labels(n, device)],
        [x],
        repeats,
        device,
    )


def passed(row: dict, dtype_tolerance: float) -> bool:
    """Same results as eager within ``dtype_tolerance`` of the values' scale."""
    return row["max_abs_diff"] <= dtype_tolerance * max(row["scale"], 1.0)


def to_markdown(report: dict) -> str:
    lines = [
        f"# torch.compile check ({report['device']['name']})",
        "",
        f"- torch {report['torch']}, backend `{report['backend']}`; git commit {report['git_commit']}, "
        f"{report['date']}",
        f"- model: CNN + batch-hard forward and backward on {report['batch']} images"
        + (" (bf16 autocast)" if report["device"]["type"] == "cuda" else "")
        + f"; losses alone on n={report['n']}, d={report['dim']}; median of {report['repeats']} "
        "interleaved repeats after the compiling call",
        "",
        "| check | compile s | eager ms | compiled ms | speedup | graph breaks | max abs diff "
        "| same as eager |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in report["checks"]:
        if "error" in r:
            lines.append(f"| {r['check']} | - | - | - | - | - | - | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['check']} | {r['compile_seconds']:.1f} | {r['eager_ms']:.2f} "
            f"| {r['compiled_ms']:.2f} "
            f"| {r['speedup']:.2f}x | {r['graph_breaks']} | {r['max_abs_diff']:.1e} "
            f"| {'yes' if r['same_as_eager'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (aot_eager: no codegen)")
    parser.add_argument("--quick", action="store_true", help="toy sizes and 2 repeats")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--losses", default=",".join(LOSSES), help="comma-separated registry losses")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="folder for compile-<device>.md/.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("torch._dynamo").setLevel(logging.ERROR)  # graph breaks are counted, not printed
    device = torch.device(args.device)
    batch, n, dim, repeats = (32, 32, 16, 2) if args.quick else (256, 1024, 128, args.repeats)
    runs = [("model", lambda: model_check(device, batch, args.backend, repeats))]
    runs += [
        (f"loss:{name}", lambda name=name: loss_check(name, device, n, dim, args.backend, repeats))
        for name in args.losses.split(",")
    ]
    tolerance = 2e-2 if device.type == "cuda" else 1e-4  # bf16 autocast on CUDA
    checks = []
    for name, run in runs:
        try:
            row = run()
            row["same_as_eager"] = passed(row, tolerance)
        except Exception as error:  # noqa: BLE001 (a failing compile is the finding, not a crash)
            row = {"check": name, "error": f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"}
        checks.append(row)
        print(json.dumps(row), flush=True)
    info = describe_device(device)
    report = {
        "device": info,
        "torch": torch.__version__,
        "git_commit": git_commit(),
        "backend": args.backend,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "batch": batch,
        "n": n,
        "dim": dim,
        "repeats": repeats,
        "tolerance": tolerance,
        "checks": checks,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"compile-{device_slug(info)}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    stem.with_suffix(".md").write_text(to_markdown(report))
    print(to_markdown(report))
    return report


if __name__ == "__main__":
    main()
