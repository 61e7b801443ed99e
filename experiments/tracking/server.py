"""``make server``: one MLflow tracking server that every sweep worker, on any machine, logs to.

Runs are kept in a database (PostgreSQL for a shared server: ``--backend-store-uri
postgresql://user@host:5432/mlflow``, the password from ``PGPASSWORD`` or ``~/.pgpass`` rather
than the command line) and artifacts in a directory the server itself serves
(``--artifacts-destination``), so workers need only the server's HTTP address. The server binds
127.0.0.1 unless the user names another host; binding beyond localhost is their explicit choice.

    python -m experiments.tracking.server --backend-store-uri postgresql://tripletlab@127.0.0.1:5432/mlflow \\
        --artifacts-destination ./mlartifacts --host 127.0.0.1 --port 5000
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from experiments.tracking.secrets import mask_secrets

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DEFAULT_BACKEND_STORE = "postgresql://tripletlab@127.0.0.1:5432/mlflow"
DEFAULT_ARTIFACTS = "mlartifacts"
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql", "sqlite")


def _scheme(uri: str) -> str:
    return uri.split(":", 1)[0].split("+", 1)[0].lower()


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def server_command(
    backend_store_uri: str,
    artifacts_destination: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int = 1,
) -> list[str]:
    """The ``mlflow server`` command line, after checking each argument (``ValueError`` names the fix)."""
    if "://" not in backend_store_uri or _scheme(backend_store_uri) not in DATABASE_SCHEMES:
        raise ValueError(
            f"backend store {mask_secrets(backend_store_uri)!r} is not a database URL; use e.g. "
            f"{DEFAULT_BACKEND_STORE} (or sqlite:///mlflow.db on one machine)"
        )
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"port {port} is out of range; pick one in 1..65535, e.g. {DEFAULT_PORT}")
    if int(workers) < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if not host or any(c.isspace() for c in host):
        raise ValueError(
            f"host {host!r} is not an address; use {DEFAULT_HOST} (this machine only) or an interface address"
        )
    artifacts = Path(artifacts_destination).resolve()
    return [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--artifacts-destination",
        str(artifacts),
        "--host",
        host,
        "--port",
        str(int(port)),
        "--workers",
        str(int(workers)),
    ]


def check_port_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as the server does: TIME_WAIT is no conflict
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise ValueError(
                f"cannot listen on {host}:{port} ({exc.strerror}); another server may be running "
                "there: stop it or choose another port (make server SERVER_PORT=...)"
            ) from None


def server_url(host: str, port: int) -> str:
    shown = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://[{shown}]:{port}" if ":" in shown else f"http://{shown}:{port}"


def start_server(
    backend_store_uri: str,
    artifacts_destination: str | Path,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    workers: int = 1,
    log_file: Path | None = None,
) -> subprocess.Popen:
    """Start the server in its own process group (stop it with :func:`stop_server`)."""
    command = server_command(backend_store_uri, artifacts_destination, host, port, workers)
    check_port_free(host, port)
    Path(command[command.index("--artifacts-destination") + 1]).mkdir(parents=True, exist_ok=True)
    output = open(log_file, "ab") if log_file else subprocess.DEVNULL
    try:
        return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        if log_file:
            output.close()


def wait_until_ready(url: str, process: subprocess.Popen | None = None, timeout: float = 60.0) -> None:
    """Poll ``<url>/health`` until the server answers; ``RuntimeError`` if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"the MLflow server exited with status {process.returncode} before it was ready"
            )
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the MLflow server at {url} did not answer within {timeout:.0f}s")


def stop_server(process: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the server's process group (uvicorn and its workers), SIGKILL if it lingers."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    except ProcessLookupError:
        pass


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.tracking.server", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--backend-store-uri",
        default=os.environ.get("TRIPLETLAB_SERVER_STORE", DEFAULT_BACKEND_STORE),
        help="database for runs (default: %(default)s; env TRIPLETLAB_SERVER_STORE)",
    )
    parser.add_argument(
        "--artifacts-destination",
        default=DEFAULT_ARTIFACTS,
        help="directory the server stores and serves artifacts in (default: %(default)s)",
    )
    parser.add_argument(
        "--host", default=DEFAULT_HOST, help="interface to bind (default: %(default)s, this machine only)"
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="port (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2, help="server processes (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        process = start_server(
            args.backend_store_uri, args.artifacts_destination, args.host, args.port, args.workers
        )
    except ValueError as exc:
        print(f"tripletlab server: error: {exc}", file=sys.stderr)
        return 2
    url = server_url(args.host, args.port)
    print(
        f"MLflow server: {url}  runs in {mask_secrets(args.backend_store_uri)}  "
        f"artifacts in {Path(args.artifacts_destination).resolve()}",
        file=sys.stderr,
    )
    if not is_loopback(args.host):
        print(
            f"warning: bound to {args.host}: other machines can reach this server. "
            f"Open port {args.port} only to your workers in the firewall; "
            "MLflow has no authentication by default.",
            file=sys.stderr,
        )
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        return process.wait()
    except KeyboardInterrupt:
        return 130
    finally:
        stop_server(process)


if __name__ == "__main__":
    sys.exit(main())
