"""``tripletlab sweep``: tune every loss with the same budget, retrain the best with N seeds, compare.

    tripletlab sweep --config sweeps/configs/digits.yaml trials=4 epochs=1 seeds=2 --workers 2

Outputs go to ``<output-dir>/<sweep name>/`` (``comparison.csv``, ``comparison.md``, ``sweep.yaml``,
``optuna.journal``) and to MLflow (one experiment per sweep). Re-running the same command resumes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import optuna

from experiments.data.folds import class_folds, training_pool
from experiments.data.registry import is_paired, load_dataset
from experiments.tracking.secrets import mask_secrets
from experiments.tracking.store import add_tracking_uri_argument, resolve_tracking_uri

from .config import load_sweep_config
from .context import SweepContext
from .final import final_tasks, summarize, wait_for_finished_studies, write_outputs
from .storage import budget_lock, default_storage, open_storage
from .study import base_experiment, create_studies
from .table import markdown_table
from .tracking import ensure_parent_runs, finish_runs, prepare_tracking, runs_view_path
from .workers import finish_finals, plan_workers, run_phase


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        default="digits",
        metavar="YAML",
        help="sweep config: a YAML path or a bundled name (digits, fashion-mnist, omniglot, quick)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override sweep keys (trials=4 seeds=2 losses=[triplet,circle]) "
        "or experiment keys (epochs=1 batch.p=8)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes sharing the studies (default: 1 on CPU, trials_per_gpu per GPU)",
    )
    parser.add_argument(
        "--storage",
        default=None,
        metavar="URL",
        help="Optuna storage: a SQLAlchemy URL (sqlite:///optuna.db, postgresql://...) "
        "(default: a journal file <output-dir>/<sweep>/optuna.journal)",
    )
    add_tracking_uri_argument(parser)
    parser.add_argument("--output-dir", default="runs", help="where runs/<sweep name>/ goes (default: runs)")
    parser.add_argument(
        "--print-storage",
        action="store_true",
        help="print the sweep's Optuna storage (for optuna-dashboard) and exit",
    )


def _browse_hint(ctx: SweepContext, experiment_id: str) -> str:
    storage = mask_secrets(ctx.storage)
    return (
        f"Browse the runs:   make ui TRACKING_URI={mask_secrets(ctx.tracking_uri)}   "
        f"(mlflow ui --backend-store-uri {mask_secrets(ctx.tracking_uri)})\n"
        f"  with the test metrics as columns: http://127.0.0.1:5000{runs_view_path(experiment_id)}\n"
        f"Browse the studies: make dashboard STORAGE={storage}   (optuna-dashboard {storage})"
    )


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    cfg = load_sweep_config(args.config, args.overrides)
    sweep_dir = Path(args.output_dir) / cfg.name
    storage_spec = args.storage or default_storage(sweep_dir)
    if args.print_storage:
        print(storage_spec)
        return 0
    plugins = tuple(
        dict.fromkeys([*cfg.plugins, *getattr(args, "plugin", []), *getattr(args, "sub_plugin", [])])
    )
    ctx = SweepContext(cfg, storage_spec, resolve_tracking_uri(args.tracking_uri), sweep_dir, plugins)
    base = base_experiment(ctx)
    data = load_dataset(base.dataset, base.seed)  # a missing or broken data file fails here, before any run
    if cfg.folds > 1:  # and so do folds the data cannot fill
        if is_paired(base.dataset.name):
            raise ValueError(
                f"folds={cfg.folds}: cross-validation folds are for image datasets, not the "
                f"paired dataset {base.dataset.name!r}; use folds=1"
            )
        class_folds(training_pool(data).classes(), cfg.folds, cfg.seed)
    slots = plan_workers(args.workers, base.device, cfg.trials_per_gpu)
    optuna.logging.set_verbosity(optuna.logging.WARNING)

    # Everything shared is opened and created once, here, before any worker starts; the budget lock
    # keeps the commands of several machines from each creating the parent runs.
    storage = open_storage(storage_spec, cfg.heartbeat_interval, cfg.grace_period)
    experiment_id = prepare_tracking(ctx)
    create_studies(ctx, storage)
    sweep_dir.mkdir(parents=True, exist_ok=True)
    lock = budget_lock(storage, ctx.lock_path, cfg.name)
    with lock:
        ensure_parent_runs(ctx, experiment_id)
    (sweep_dir / "sweep.yaml").write_text(cfg.to_yaml())
    folds = f" x {cfg.folds} folds" if cfg.folds > 1 else ""
    print(
        f"sweep {cfg.name!r}: {len(cfg.losses)} losses x {cfg.trials} trials{folds}, "
        f"{cfg.seeds} final seeds, {len(slots)} worker(s); studies in {mask_secrets(storage_spec)}",
        flush=True,
    )

    failed = run_phase(ctx, "tune", slots, storage)
    wait_for_finished_studies(ctx, storage)  # final runs start only on finished studies
    tasks = final_tasks(ctx, storage)
    failed += run_phase(ctx, "final", slots[: max(1, min(len(slots), len(tasks)))], storage, tasks)
    finish_finals(ctx, storage, tasks)
    table = summarize(ctx, storage)
    paths = write_outputs(ctx, table)
    with lock:
        finish_runs(ctx, experiment_id, paths)

    print()
    print(markdown_table(table))
    if cfg.folds > 1:
        print(
            f"Test metrics of the {cfg.folds} fold models' concatenated embeddings (concat.) and the mean "
            "of the separated fold models' (separated)."
        )
    print(
        f"Test metrics in % as mean [95% t-interval] over seeds; trials complete/pruned/failed. "
        f"Wrote {', '.join(str(p) for p in paths[:2])} in {time.perf_counter() - start:.0f}s."
    )
    print(_browse_hint(ctx, experiment_id))
    return 1 if failed else 0
