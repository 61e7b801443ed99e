"""System metrics of a run (CPU, memory, disk, network and, where NVIDIA's management library is
installed, GPU utilisation and memory), logged by MLflow's own monitor under ``system/``.

On by default; MLflow's switch ``MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false`` turns it off and
``MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL`` (seconds, default 10) sets how often it samples.
"""

from __future__ import annotations

import contextlib
import logging
import os

SWITCH = "MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING"
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per run


def enabled() -> bool:
    """Whether runs log system metrics (unless the switch says false)."""
    return os.environ.get(SWITCH, "true").strip().lower() not in ("false", "0", "no", "off")


@contextlib.contextmanager
def system_metrics(run_id: str, tracking_uri: str):
    """Sample system metrics into run ``run_id`` while the block runs (the run must be RUNNING)."""
    if not enabled():
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=tracking_uri)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()
