"""A real browser on the real UI: ``mlflow server`` on a finished tiny sweep, its experiment page
rendered by headless Chromium in the view the sweep stores (the URL ``tripletlab sweep`` prints),
which must list the sweep's parent runs (one per loss) by name, each with its dataset in the Dataset
column, and show the test metrics as columns; and a run's page, whose System metrics tab must draw a
chart of each system metric the run logged (a run of its own, sampled every second: at MLflow's
default 10 s a run this short logs none, like the tiny sweep's runs).

Skips when Chromium is not installed (``apt-get install chromium``; ``.ci/run`` installs it). The
screenshot is saved with the test's files, and also to ``$TRIPLETLAB_UI_SCREENSHOT`` when set
(``make ui-check`` sets it).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from experiments.tracking.server import server_url, start_server, stop_server, wait_until_ready
from experiments.tracking.store import prepare_store
from experiments.tracking.system_metrics import system_metrics
from helpers.postgres_fixture import free_port
from sweeps.tracking import RUNS_VIEW_COLUMNS, runs_view_path

pytestmark = pytest.mark.browser

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=2400,900",
]  # wide: the grid draws only the columns in view
# (virtual time for the React app to fetch and draw the runs, wall-clock limit) per attempt
ATTEMPTS = ((10_000, 45), (10_000, 90), (30_000, 150))
# The metric charts draw only once the compositor has drawn their cards: without this flag the System
# metrics tab keeps its loading placeholders, whatever the virtual time. Tall, to draw every card.
CHART_FLAGS = [*CHROMIUM_FLAGS[:-1], "--window-size=2400,2400", "--run-all-compositor-stages-before-draw"]
CHART_ATTEMPTS = ((5_000, 60), (10_000, 90))


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("Chromium is not installed (apt-get install chromium); .ci/run installs it")


def render(
    browser: str,
    url: str,
    screenshot: Path,
    profile: Path,
    budget_ms: int,
    timeout: float,
    flags: list[str] = CHROMIUM_FLAGS,
) -> str | None:
    """The DOM of ``url`` after ``budget_ms`` of virtual time, and a screenshot of the page; ``None``
    if Chromium hangs (headless virtual time now and then never runs out): the caller tries again."""
    shutil.rmtree(profile, ignore_errors=True)
    process = subprocess.Popen(
        [
            browser,
            *flags,
            f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}",
            f"--screenshot={screenshot}",
            "--dump-dom",
            url,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        dom, errors = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)  # the browser and its helper processes
        process.communicate()
        return None
    assert process.returncode == 0, errors[-2000:]
    return dom


def run_link(dom: str, run_id: str, name: str) -> bool:
    """Whether the page links to run ``run_id`` with ``name`` as the link text."""
    anchor = rf'<a [^>]*href="[^"]*/runs/{run_id}"[^>]*>(?:(?!</a>).)*?>{re.escape(name)}</'
    return re.search(anchor, dom, re.DOTALL) is not None


def test_experiment_page_lists_the_parent_runs(tiny_sweep, tmp_path):
    browser = chromium()
    assert tiny_sweep.exit_code == 0
    client = MlflowClient(tracking_uri=tiny_sweep.tracking_uri)
    experiment = client.get_experiment_by_name(tiny_sweep.experiment_name)
    parents = {
        r.info.run_name: r.info.run_id
        for r in client.search_runs(
            [experiment.experiment_id], filter_string="tags.`tripletlab.role` = 'parent'"
        )
    }
    assert sorted(parents) == sorted(tiny_sweep.losses)

    port = free_port()
    server = start_server(
        tiny_sweep.tracking_uri,
        tiny_sweep.root / "mlartifacts",
        port=port,
        workers=1,
        log_file=tmp_path / "server.log",
    )
    try:
        url = server_url("127.0.0.1", port)
        wait_until_ready(url, server, timeout=180)
        page = url + runs_view_path(experiment.experiment_id)
        screenshot = tmp_path / "mlflow-ui.png"
        dom = ""
        for budget, timeout in ATTEMPTS:  # a busy machine may need more time to draw the table
            dom = render(browser, page, screenshot, tmp_path / "profile", budget, timeout) or ""
            if all(run_link(dom, run_id, name) for name, run_id in parents.items()):
                break
    finally:
        stop_server(server, timeout=5)
    assert dom, f"Chromium hung on {page} in all {len(ATTEMPTS)} attempts"

    missing = [name for name, run_id in parents.items() if not run_link(dom, run_id, name)]
    assert not missing, f"the experiment page does not list parent runs {missing}"
    # the Dataset column: name and digest of a split the loss's runs used
    for name, run_id in parents.items():
        digests = {d.dataset.digest for d in client.get_run(run_id).inputs.dataset_inputs}
        assert any(f'title="digits ({digest})"' in dom for digest in digests), f"no dataset shown for {name}"
    metrics = [column for column in RUNS_VIEW_COLUMNS if column.startswith("metrics.")]
    assert "metrics.`test/map_at_r`" in metrics
    for column in metrics:  # header cells of the metric columns, which MLflow's default view leaves out
        key = column.split("`")[1]
        header = f'data-testid="sort-header-{key}">{key}</span>'
        assert f'col-id="{column}"' in dom and header in dom, f"no {key} column shown"
    assert screenshot.stat().st_size > 10_000 and screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    target = os.environ.get("TRIPLETLAB_UI_SCREENSHOT")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(screenshot, target)


def chart_drawn(dom: str, run_name: str, key: str) -> bool:
    """Whether the page has a chart titled ``key`` whose legend names the run's line."""
    return f'title="{key}">' in dom and f">{run_name} ({key})</" in dom


def test_run_page_shows_system_metrics(tmp_path, monkeypatch):
    browser = chromium()
    monkeypatch.delenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", raising=False)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
    uri = prepare_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client = MlflowClient(tracking_uri=uri)
    artifacts = tmp_path / "mlartifacts"
    experiment_id = client.create_experiment("system-metrics", artifact_location=artifacts.as_uri())
    run_id = client.create_run(experiment_id, run_name="short").info.run_id
    with system_metrics(run_id, uri):  # as a training run samples them
        time.sleep(3)
    client.set_terminated(run_id)
    keys = sorted(k for k in client.get_run(run_id).data.metrics if k.startswith("system/"))
    assert "system/cpu_utilization_percentage" in keys, f"the run logged no CPU metric, only {keys}"

    port = free_port()
    server = start_server(uri, artifacts, port=port, workers=1, log_file=tmp_path / "server.log")
    try:
        url = server_url("127.0.0.1", port)
        wait_until_ready(url, server, timeout=180)
        page = f"{url}/#/experiments/{experiment_id}/runs/{run_id}/system-metrics"
        dom = ""
        for budget, timeout in CHART_ATTEMPTS:
            screenshot = tmp_path / "system-metrics.png"
            dom = render(browser, page, screenshot, tmp_path / "profile", budget, timeout, CHART_FLAGS) or ""
            if all(chart_drawn(dom, "short", key) for key in keys):
                break
    finally:
        stop_server(server, timeout=5)
    assert dom, f"Chromium hung on {page} in all {len(CHART_ATTEMPTS)} attempts"
    assert f">({len(keys)})</" in dom, "the System metrics section does not count the run's system metrics"
    missing = [key for key in keys if not chart_drawn(dom, "short", key)]
    assert not missing, f"the System metrics tab draws no chart of {missing}"
