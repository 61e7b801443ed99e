"""Shared test settings: deterministic, single-threaded torch so tests run alike on 2 cores."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
