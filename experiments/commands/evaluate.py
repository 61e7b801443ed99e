"""``tripletlab evaluate``: test a trained model again, from an MLflow run or a checkpoint file.

    tripletlab evaluate 3f2a9c0e1b7d4e58a6c1d2b3e4f5a6b7 --tracking-uri sqlite:///mlflow.db
    tripletlab evaluate checkpoints/<run id>/last.pt dataset.path=/data/omniglot/images_evaluation.zip

The source is a run that logged its weights (every final run of a sweep: ``model/weights.pt``, or
``model/fold_<i>/weights.pt`` for each fold's model) or a ``train.checkpoint_dir`` file; either
carries the resolved config that rebuilds the model. ``dataset.*`` and ``eval.*`` overrides
(and ``device``) change what is tested, nothing else. The test split is embedded and scored with
the run's own evaluation (folds: the concatenated embeddings as ``test/<metric>``, the separated
models' mean as ``test/separated/<metric>``) and logged to a new MLflow run with role
``evaluate`` and tag ``tripletlab.source_run`` (a run id) or ``tripletlab.source_checkpoint``.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import yaml

from experiments.config import ExperimentConfig, apply, flatten_config, from_dict, parse_overrides
from experiments.tracking.store import add_tracking_uri_argument

EVALUATE_KEYS = ("dataset.", "eval.", "device")  # what an override may change
_FOLD_DIR = re.compile(r"^fold_(\d+)$")


def configure(parser) -> None:
    parser.add_argument(
        "source",
        metavar="RUN_ID_OR_CHECKPOINT",
        help="an MLflow run id whose run logged model weights, or a checkpoint file (.pt)",
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="dataset.* / eval.* / device overrides, e.g. dataset.split=class-disjoint "
        "dataset.path=/data/omniglot.npz",
    )
    add_tracking_uri_argument(parser)
    parser.add_argument(
        "--experiment",
        default=None,
        help="MLflow experiment of the new run (default: the source run's, or tripletlab)",
    )


def evaluate_overrides(overrides: list[str]) -> dict:
    """The ``key=value`` overrides as values, refusing keys that would change the trained model."""
    values = parse_overrides(overrides)
    stray = sorted(k for k in values if not k.startswith(EVALUATE_KEYS))
    if stray:
        raise ValueError(
            f"evaluate changes only the data and the evaluation (dataset.*, eval.*, device); "
            f"{', '.join(stray)} would change the trained model"
        )
    return values


def _checkpoint_source(path: Path):
    """``(config dict, [state dicts])`` of a checkpoint file."""
    from experiments.train.loop import read_checkpoint

    state = read_checkpoint(path)
    if state.get("config") is None:
        raise ValueError(
            f"checkpoint {path} carries no config (it predates configs in checkpoints); "
            "evaluate a checkpoint written by this version, or the run id of its run"
        )
    return state["config"], [state["model"]]


def _run_source(client, run_id: str, uri: str):
    """``(config dict, [state dicts], experiment name)`` of an MLflow run that logged its weights."""
    import torch
    from mlflow.exceptions import MlflowException

    from experiments.tracking.secrets import mask_secrets
    from experiments.train.record import MODEL_ARTIFACT, WEIGHTS_FILE

    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ValueError(
            f"no MLflow run {run_id!r} at {mask_secrets(uri)} (and no such checkpoint file); "
            "pass a run id from the MLflow UI with the --tracking-uri it was logged to"
        ) from None
    listed = {a.path for a in client.list_artifacts(run_id, MODEL_ARTIFACT)}
    folds = sorted((int(m.group(1)), path) for path in listed if (m := _FOLD_DIR.match(Path(path).name)))
    weights = (
        [f"{MODEL_ARTIFACT}/{WEIGHTS_FILE}"]
        if f"{MODEL_ARTIFACT}/{WEIGHTS_FILE}" in listed
        else [f"{path}/{WEIGHTS_FILE}" for _, path in folds]
    )
    if not weights:
        raise ValueError(
            f"run {run_id} logged no model weights ({MODEL_ARTIFACT}/{WEIGHTS_FILE}); final "
            "runs of a sweep log them, or evaluate a train.checkpoint_dir file"
        )
    with tempfile.TemporaryDirectory() as tmp:
        try:
            config = yaml.safe_load(Path(client.download_artifacts(run_id, "config.yaml", tmp)).read_text())
        except (MlflowException, OSError):
            raise ValueError(f"run {run_id} has no config.yaml artifact to rebuild its model from") from None
        states = [
            torch.load(client.download_artifacts(run_id, w, tmp), map_location="cpu", weights_only=True)
            for w in weights
        ]
    name = client.get_experiment(run.info.experiment_id).name
    return config, states, name


def _models(cfg: ExperimentConfig, states: list[dict], image_shape, device):
    """The run's networks rebuilt from ``cfg`` with ``states`` loaded, in eval mode on ``device``."""
    import torch

    from experiments.train.tasks import build_run_model

    models = []
    for state in states:
        model = build_run_model(cfg, image_shape)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ValueError(
                f"the weights do not fit model.name={cfg.model.name} rebuilt for "
                f"{cfg.dataset.name} images {tuple(image_shape)}: {first}"
            ) from None
        models.append(model.to(device).to(memory_format=torch.channels_last).eval())
    return models


def evaluate(cfg: ExperimentConfig, states: list[dict]) -> tuple[dict[str, float], str]:
    """Test metrics (unprefixed) of the models ``states`` on ``cfg``'s test split, and the device used."""
    from experiments.data.registry import is_paired, load_dataset
    from experiments.train.cross_validation import test_fold_models
    from experiments.train.loop import pick_device
    from experiments.train.tasks import ImageTask

    if is_paired(cfg.dataset.name):
        raise ValueError(
            f"evaluate tests image models; {cfg.dataset.name!r} is a paired (cross-modal) dataset"
        )
    device = pick_device(cfg.device)
    task = ImageTask(cfg, load_dataset(cfg.dataset, cfg.seed))
    models = _models(cfg, states, task.splits.test.image_shape, device)
    if len(models) > 1:
        return test_fold_models(task, models, device)[0], str(device)
    return task.test(models[0], device)[0], str(device)


def main(args) -> int:
    from mlflow import MlflowClient

    from experiments.tracking.provenance import provenance_tags
    from experiments.tracking.store import (
        RunLogger,
        get_or_create_experiment,
        prepare_store,
        resolve_tracking_uri,
    )

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar per weights file is noise
    overrides = evaluate_overrides(args.overrides)
    path = Path(args.source)
    if path.is_file():
        config, states = _checkpoint_source(path)
        experiment, source = "tripletlab", {"tripletlab.source_checkpoint": str(path.resolve())}
    elif path.suffix in (".pt", ".pth") or len(path.parts) > 1:
        raise ValueError(f"checkpoint file {args.source} does not exist")
    uri = prepare_store(resolve_tracking_uri(args.tracking_uri))
    if not path.is_file():
        config, states, experiment = _run_source(MlflowClient(tracking_uri=uri), args.source, uri)
        source = {"tripletlab.source_run": args.source}
    cfg = apply(from_dict(config), overrides)
    test, device = evaluate(cfg, states)
    tags = {
        "tripletlab.role": "evaluate",
        "tripletlab.loss": cfg.loss.name,
        "tripletlab.dataset": cfg.dataset.name,
        "tripletlab.split": cfg.dataset.split,
        "tripletlab.seed": str(cfg.seed),
        "tripletlab.device": device,
        "tripletlab.folds": str(len(states)),
        **provenance_tags(),
        **source,
    }
    run = RunLogger(
        uri,
        get_or_create_experiment(args.experiment or experiment, uri),
        f"evaluate-{cfg.loss.name}-{cfg.dataset.name}",
        tags,
    )
    status = "FAILED"
    try:
        run.log_params(flatten_config(cfg))
        run.log_metrics({f"test/{k}": v for k, v in test.items()})
        run.log_text(cfg.to_yaml(), "config.yaml")
        run.log_json({"test": test, **source}, "metrics.json")
        status = "FINISHED"
    finally:
        run.end(status)
    for key, value in test.items():
        print(f"test/{key} {value:.6g}")
    print(f"run {run.run_id} logged the metrics of {next(iter(source.values()))}")
    return 0
