"""``make ui``'s first line: the address of the most recent sweep's runs view.

Each sweep stores its runs view as an experiment tag (``sweeps.tracking.prepare_tracking``); the
most recent sweep is the one ``tripletlab analyze`` and ``rerun`` take by default
(``sweeps.tracking.sweep_experiments``: its latest run started last). Reads the store only: a
missing SQLite file is reported, not created.

    python -m sweeps.runs_view --tracking-uri sqlite:///mlflow.db --address http://127.0.0.1:5000
"""

from __future__ import annotations

import argparse

from mlflow.entities import Experiment
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from experiments.tracking.secrets import mask_secrets
from experiments.tracking.store import add_tracking_uri_argument, resolve_tracking_uri, sqlite_file
from sweeps.tracking import runs_view_path, sweep_experiments

RUN_A_SWEEP = "run one with `make sweep`"


def latest_sweep(tracking_uri: str) -> Experiment | None:
    """The most recent sweep of the store, if any."""
    return next(iter(sweep_experiments(MlflowClient(tracking_uri=tracking_uri))), None)


def describe(tracking_uri: str | None, address: str) -> str:
    """One line: the runs view's URL of the most recent sweep, or why there is none."""
    try:
        uri = resolve_tracking_uri(tracking_uri)
    except ValueError as exc:
        return f"No runs view to show: {exc}"
    database = sqlite_file(uri)
    if database is not None and not database.is_file():
        return f"No sweep has been run yet (no MLflow store at {database}); {RUN_A_SWEEP}."
    try:
        experiment = latest_sweep(uri)
    except MlflowException as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return f"Cannot read the sweeps in {mask_secrets(uri)}: {mask_secrets(first_line)}"
    if experiment is None:
        return f"No sweep has been run yet in {mask_secrets(uri)}; {RUN_A_SWEEP}."
    return (
        f"Runs of sweep {experiment.name!r} with the test metrics as columns: "
        f"{address.rstrip('/')}{runs_view_path(experiment.experiment_id)}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m sweeps.runs_view", description=__doc__.splitlines()[0])
    add_tracking_uri_argument(parser)
    parser.add_argument("--address", default="http://127.0.0.1:5000", help="where the MLflow UI serves")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    print(describe(args.tracking_uri, args.address), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
