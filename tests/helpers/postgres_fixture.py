"""PostgreSQL for tests: a real server, a fresh database per test.

Use ``TRIPLETLAB_TEST_POSTGRES_URL`` (a role allowed to create databases) when it is set, as CI
does. Otherwise start a throwaway cluster with the installed ``initdb``/``pg_ctl``
(``/usr/lib/postgresql/*/bin``) in a temporary directory on a free port, as the ``postgres``
system user when running as root (PostgreSQL refuses to run as root). Without either, the tests
that need it skip and say why.

The fixtures ``postgres_server`` and ``postgres_url`` are registered in ``tests/conftest.py``. A test
that restarts the server uses ``restartable_postgres`` instead: always a throwaway cluster of its
own, never the shared server.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

import pytest

ENV_URL = "TRIPLETLAB_TEST_POSTGRES_URL"
CLUSTER_ROLE = "tripletlab"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def with_database(url: str, database: str) -> str:
    """``url`` pointing at another database on the same server, with the same credentials."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


@dataclass(frozen=True)
class PostgresServer:
    """A reachable server and the URL of a role that may create databases."""

    admin_url: str

    def _execute(self, statement: str) -> None:
        import psycopg2

        conn = psycopg2.connect(self.admin_url, connect_timeout=10)
        try:
            conn.autocommit = True  # CREATE/DROP DATABASE cannot run in a transaction
            with conn.cursor() as cur:
                cur.execute(statement)
        finally:
            conn.close()

    def create_database(self) -> str:
        name = f"tripletlab_test_{uuid.uuid4().hex[:12]}"
        self._execute(f'CREATE DATABASE "{name}"')
        return with_database(self.admin_url, name)

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        self._execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _bin_dir() -> Path | None:
    candidates = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1]).parent
    pg_ctl = shutil.which("pg_ctl")
    return Path(pg_ctl).parent if pg_ctl else None


class _ThrowawayCluster:
    """initdb + pg_ctl in a temporary directory, listening on 127.0.0.1 only.

    The directory records the test process's pid; a later session stops and removes clusters
    whose test process died without tearing down (killed by a timeout, say).
    """

    PREFIX = "tripletlab-pg-"

    def __init__(self, bin_dir: Path):
        self.bin_dir = bin_dir
        self.user = None
        if os.geteuid() == 0:
            try:
                self.user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root and there is no 'postgres' system user to run "
                    "PostgreSQL as; set TRIPLETLAB_TEST_POSTGRES_URL instead"
                ) from None
        self._reap_orphans()
        self.root = Path(tempfile.mkdtemp(prefix=self.PREFIX))
        (self.root / "owner.pid").write_text(str(os.getpid()))
        self.data = self.root / "data"
        self.port = free_port()
        self.password = secrets.token_urlsafe(12)

    def _reap_orphans(self) -> None:
        for root in Path(tempfile.gettempdir()).glob(self.PREFIX + "*"):
            try:
                owner = int((root / "owner.pid").read_text())
                os.kill(owner, 0)
                continue  # its session is still running
            except ProcessLookupError:
                pass
            except (OSError, ValueError):
                continue  # not ours to judge: no readable owner
            orphan = object.__new__(_ThrowawayCluster)
            orphan.bin_dir, orphan.user, orphan.root, orphan.data = (
                self.bin_dir,
                self.user,
                root,
                root / "data",
            )
            try:
                orphan.stop()
            except RuntimeError:
                shutil.rmtree(root, ignore_errors=True)

    def _run(self, *args: str) -> None:
        kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid} if self.user else {}
        result = subprocess.run(
            [str(self.bin_dir / args[0]), *args[1:]],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
            **kwargs,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {result.stderr.strip() or result.stdout.strip()}")

    def start(self) -> str:
        """Create the cluster and start it; returns the URL of its admin role."""
        password_file = self.root / "password"
        password_file.write_text(self.password + "\n")
        if self.user:
            for path in (self.root, password_file):
                os.chown(path, self.user.pw_uid, self.user.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            CLUSTER_ROLE,
            "-E",
            "UTF8",
            "--no-sync",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            f"--pwfile={password_file}",
        )
        self._start_server()
        return f"postgresql://{CLUSTER_ROLE}:{self.password}@127.0.0.1:{self.port}/postgres"

    def _start_server(self) -> None:
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -c unix_socket_directories={self.root}"
            " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        self._run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.root / "server.log"),
            "-o",
            options,
            "-w",
            "-t",
            "60",
            "start",
        )

    def restart(self, down_seconds: float) -> None:
        """Stop the server as an administrator would (``-m fast``: sessions are cut), stay down
        ``down_seconds``, start it again on the same port."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")
        time.sleep(down_seconds)
        self._start_server()

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def _started_cluster(why_needed: str) -> tuple[_ThrowawayCluster, str]:
    """A throwaway cluster, started, and its admin URL; or a skip saying why there is none."""
    bin_dir = _bin_dir()
    if bin_dir is None:
        pytest.skip(f"no PostgreSQL: {why_needed} (apt-get install postgresql; .ci/run does it)")
    try:
        cluster = _ThrowawayCluster(bin_dir)
    except RuntimeError as exc:
        pytest.skip(str(exc))
    try:
        return cluster, cluster.start()
    except Exception as exc:  # noqa: BLE001
        cluster.stop()
        pytest.skip(f"could not start a throwaway PostgreSQL cluster with {bin_dir}: {exc}")


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server (see the module docstring), or a skip with the reason."""
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install '.[postgres]')")
    url = os.environ.get(ENV_URL)
    if url:
        server = PostgresServer(url)
        try:
            server._execute("SELECT 1")
        except Exception as exc:  # noqa: BLE001 - any connection problem means "cannot use it"
            pytest.fail(f"{ENV_URL} is set but the server cannot be used: {exc}")
        yield server
        return
    cluster, admin_url = _started_cluster(f"set {ENV_URL} or install the server")
    try:
        yield PostgresServer(admin_url)
    finally:
        cluster.stop()


@dataclass(frozen=True)
class RestartablePostgres:
    """A server of the test module's own, and how to restart it."""

    server: PostgresServer
    restart: Callable[[float], None]  # restart(down_seconds)


@pytest.fixture(scope="module")
def restartable_postgres():
    """A throwaway PostgreSQL cluster for one test module, which its tests may restart."""
    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install '.[postgres]')")
    cluster, admin_url = _started_cluster("a test that restarts the server needs initdb and pg_ctl")
    try:
        yield RestartablePostgres(PostgresServer(admin_url), cluster.restart)
    finally:
        cluster.stop()


@pytest.fixture
def postgres_url(postgres_server):
    """URL of a fresh, empty database, dropped after the test."""
    url = postgres_server.create_database()
    yield url
    postgres_server.drop_database(url)
