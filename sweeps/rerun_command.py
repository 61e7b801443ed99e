"""``tripletlab rerun``: train one final run of a sweep again, same configuration and seed, several
times, to measure the noise at a fixed seed (nondeterministic kernels, on GPUs mostly).

Each rerun is a child of the loss's parent run with role ``rerun`` and tag
``tripletlab.rerun_of`` naming the final run it repeats, so the sweep's own final runs, table and
paired tests are unchanged; ``tripletlab analyze`` shows the spread of each final run with its
reruns beside the spread over seeds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

from experiments.tracking.store import add_tracking_uri_argument

from .tracking import LOSS_TAG, RERUN_OF_TAG, RERUN_ROLE, ROLE_TAG, SEED_TAG


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--loss", required=True, help="the loss whose final run is repeated")
    parser.add_argument(
        "--seed", type=int, help="the final seed to repeat (default: the loss's first final seed)"
    )
    parser.add_argument("--times", type=int, default=3, help="how many reruns (default 3)")
    parser.add_argument(
        "--experiment", metavar="NAME", help="the sweep's MLflow experiment (default: the most recent sweep)"
    )
    add_tracking_uri_argument(parser)


def final_run(client, experiment_id: str, loss: str, seed: int | None):
    """The latest finished final run of ``loss`` with ``seed`` (default: its smallest final seed)."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{ROLE_TAG}` = 'final' and tags.`{LOSS_TAG}` = '{loss}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    seeds = sorted({int(r.data.tags[SEED_TAG]) for r in runs})
    if not seeds:
        raise ValueError(f"no finished final run of loss {loss!r} in this sweep")
    seed = seeds[0] if seed is None else seed
    if seed not in seeds:
        raise ValueError(f"loss {loss!r} has no final run with seed {seed}; its final seeds: {seeds}")
    return next(r for r in runs if int(r.data.tags[SEED_TAG]) == seed)


def main(args: argparse.Namespace) -> int:
    if args.times < 1:
        raise ValueError(f"--times must be at least 1, got {args.times}")
    from mlflow import MlflowClient

    from experiments.config import load_config
    from experiments.tracking.store import existing_store_uri
    from experiments.train.run import run_experiment

    from .tracking import find_experiment

    uri = existing_store_uri(args.tracking_uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = find_experiment(client, args.experiment)
    original = final_run(client, experiment.experiment_id, args.loss, args.seed)
    seed = int(original.data.tags[SEED_TAG])
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(client.download_artifacts(original.info.run_id, "config.yaml", tmp), [])
    params = original.data.params
    folds = int(params.get("data.folds", 1))
    values = [original.data.metrics["test/map_at_r"]]
    print(
        f"[{args.loss}] final seed {seed} (run {original.info.run_id}): test MAP@R {values[0]:.4f}",
        flush=True,
    )
    for index in range(1, args.times + 1):
        result = run_experiment(
            cfg,
            tracking_uri=uri,
            experiment_name=experiment.name,
            parent_run_id=original.data.tags.get("mlflow.parentRunId"),
            run_name=f"{args.loss}/seed-{seed}/rerun-{index}",
            tags={
                ROLE_TAG: RERUN_ROLE,
                RERUN_OF_TAG: original.info.run_id,
                "tripletlab.sweep": experiment.name,
            },
            folds=folds,
            fold_seed=int(params["data.fold_seed"]) if folds > 1 else None,
        )
        values.append(result.test_metrics["map_at_r"])
        print(f"[{args.loss}] rerun {index} of seed {seed}: test MAP@R {values[-1]:.4f}", flush=True)
    print(
        f"[{args.loss}] seed {seed}: sd of test MAP@R over {len(values)} runs {statistics.stdev(values):.4f}"
    )
    return 0
