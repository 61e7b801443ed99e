"""A run's dataset splits as MLflow dataset inputs, what ``mlflow.log_input`` records, so the MLflow
UI's Dataset column and dataset filter show them.

One input per split (context ``train``, ``validation``, ``test``, and ``gallery`` where the test
queries rank a gallery), named after the dataset. The source is the dataset's folder (or its
built-in origin), the profile holds the split's image and class counts, and the digest is a hash
of the split's definition (dataset, source, split, seed, class cap, its classes and count): runs
that trained and tested on the same data share it.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from pathlib import Path
from typing import Any

from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

SPLIT_CONTEXTS = {"train": "train", "val": "validation", "test": "test", "gallery": "gallery"}
DIGEST_LENGTH = 16
ATTEMPTS = 3


def dataset_source(path: str, info: dict[str, Any]) -> tuple[str, str]:
    """``(source_type, source JSON)``: the dataset folder when one is configured, else its origin."""
    if path:
        return "local", json.dumps({"uri": str(Path(path).expanduser().resolve())})
    return "code", json.dumps({"origin": str(info.get("source", info.get("dataset", "unknown")))})


def dataset_inputs(name: str, path: str, info: dict[str, Any]) -> list[DatasetInput]:
    """One :class:`DatasetInput` per split listed in ``info["counts"]``."""
    source_type, source = dataset_source(path, info)
    inputs = []
    for split, count in info.get("counts", {}).items():
        if split not in SPLIT_CONTEXTS:
            continue
        classes = info.get(f"{split}_classes", [])
        definition = {
            "dataset": name,
            "source": source,
            "split": info.get("split"),
            "seed": info.get("seed"),
            "max_per_class": info.get("max_per_class"),
            "part": split,
            "classes": classes,
            "count": count,
        }
        digest = hashlib.sha256(json.dumps(definition, sort_keys=True, default=str).encode()).hexdigest()
        profile = json.dumps({"num_rows": count, "num_classes": len(classes), "split": info.get("split")})
        dataset = Dataset(
            name=name, digest=digest[:DIGEST_LENGTH], source_type=source_type, source=source, profile=profile
        )
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, SPLIT_CONTEXTS[split])]))
    return inputs


def log_dataset_inputs(client, run_ids: list[str], inputs: list[DatasetInput]) -> None:
    """Log ``inputs`` to each run, retrying when a run logging the same dataset at the same moment
    (parallel trials share their splits) made the store refuse the duplicate; a store that still
    refuses gets a warning, never a failed run."""
    for run_id in run_ids:
        for attempt in range(ATTEMPTS):
            try:
                client.log_inputs(run_id, datasets=inputs)
                break
            except MlflowException as exc:
                if attempt == ATTEMPTS - 1:
                    warnings.warn(
                        f"dataset inputs not logged to run {run_id}: {exc}", RuntimeWarning, stacklevel=2
                    )
                time.sleep(0.1 * (attempt + 1))
