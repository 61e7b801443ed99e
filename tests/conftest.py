"""Shared test settings (deterministic, single-threaded torch so tests run alike on 2 cores) and the
fixtures every test module may use: ``tiny_sweep``, ``postgres_server``, ``postgres_url``,
``restartable_postgres`` and ``mlflow_server`` (from ``tests/helpers``)."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from losses import list_losses, registry  # noqa: E402

torch.set_num_threads(1)

pytest_plugins = ["helpers.sweep_fixture", "helpers.postgres_fixture", "helpers.mlflow_server_fixture"]


@pytest.fixture(scope="session", autouse=True)
def image_cache(tmp_path_factory):
    """A decoded-image cache of the test session's own (``TRIPLETLAB_CACHE``), not the user's."""
    os.environ["TRIPLETLAB_CACHE"] = str(tmp_path_factory.mktemp("image-cache"))
    return os.environ["TRIPLETLAB_CACHE"]


@pytest.fixture
def restore_registry():
    """The loss registry as it was before the test (built-ins and entry points included)."""
    list_losses()
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)
