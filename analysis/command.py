"""``tripletlab analyze``: figures, comparison table and report of a finished sweep.

Reads the sweep's MLflow experiment (the most recent sweep by default) and its Optuna storage
(``runs/<sweep>/optuna.journal`` by default); writes ``runs/<sweep>/report/`` and logs it to the
sweep's summary run. ``--output-dir`` means what it means to ``tripletlab sweep``: the folder holding
``<sweep>/``. Never trains.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from experiments.tracking.store import add_tracking_uri_argument
from sweeps.storage import default_storage

from .embeddings import PROJECTION_POINTS
from .load import BASELINE_LOSS, load_studies, load_sweep
from .paired import DETECT_POINTS, PAIRINGS
from .report import build_report


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--experiment",
        metavar="NAME",
        help="the sweep's MLflow experiment (default: the most recently created sweep)",
    )
    add_tracking_uri_argument(parser)
    parser.add_argument(
        "--storage",
        metavar="URL_OR_PATH",
        help="the sweep's Optuna storage: a journal file or a database URL "
        "(default: <output-dir>/<sweep>/optuna.journal when it exists)",
    )
    parser.add_argument(
        "--output-dir",
        metavar="DIR",
        type=Path,
        default=Path("runs"),
        help="where the sweep wrote runs/<sweep>/, as given to `tripletlab sweep` "
        "(default: runs); the report goes to <output-dir>/<sweep>/report",
    )
    parser.add_argument(
        "--points",
        type=int,
        default=PROJECTION_POINTS,
        help=f"test points per loss in the 2-D projection (default {PROJECTION_POINTS})",
    )
    parser.add_argument(
        "--baseline",
        default=BASELINE_LOSS,
        metavar="LOSS",
        help=f"loss the others are tested against, paired by seed (default {BASELINE_LOSS})",
    )
    parser.add_argument(
        "--pairs",
        choices=PAIRINGS,
        default="all",
        help="paired comparisons of every pair of losses, or of each loss against --baseline (default all)",
    )
    parser.add_argument(
        "--detect",
        type=float,
        default=DETECT_POINTS,
        metavar="POINTS",
        help=f"MAP@R difference, in points, to estimate the seeds needed for (80%% power; "
        f"default {DETECT_POINTS:g})",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the subsampling and the projection")
    parser.add_argument("--no-log", action="store_true", help="do not log the report to MLflow")


def main(args: argparse.Namespace) -> int:
    if args.points < 10:
        raise ValueError(f"--points must be at least 10, got {args.points}")
    if not args.detect > 0:
        raise ValueError(f"--detect must be a positive number of MAP@R points, got {args.detect}")
    sweep = load_sweep(args.experiment, args.tracking_uri)
    sweep_dir = args.output_dir / sweep.name
    storage = args.storage
    if storage is None and Path(default_storage(sweep_dir)).is_file():
        storage = default_storage(sweep_dir)
    if storage:
        sweep.storage = storage
        sweep.studies = load_studies(storage, sweep.name, sweep.losses)
    report = build_report(
        sweep,
        sweep_dir / "report",
        points=args.points,
        seed=args.seed,
        baseline=args.baseline,
        log_to_mlflow=not args.no_log,
        pairing=args.pairs,
        detect_points=args.detect,
    )
    print(f"analysed sweep {sweep.name!r}: {len(report.figures)} figures, {len(report.table)} losses")
    print("ranking by test MAP@R (points), with paired decisions:")
    for line in report.decisions.lines:
        print(f"  {line}")
    for note in report.notes:
        print(f"  note: {note}")
    print(f"report: {report.html}")
    print(f"markdown: {report.markdown}")
    if report.run_id:
        print(f"logged to MLflow run {report.run_id} (artifacts under report/)")
    return 0
