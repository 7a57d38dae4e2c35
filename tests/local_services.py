"""Throwaway servers for tests: PostgreSQL, a moto S3 server, an MLflow server and a model server.

Every server is started by the test run, listens on 127.0.0.1 on a free port, and is stopped
by the PID (or process group) of the process the test started. Tests that need PostgreSQL
skip when its binaries are missing, except under CI=true, where they fail instead.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# Test-only credentials of servers that exist for one test session on 127.0.0.1.
POSTGRES_USER = "aeplat"
POSTGRES_PASSWORD = "aeplat-test-password"
POSTGRES_DATABASE = "mlflow"
AWS_TEST_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}

# PostgreSQL does not run as root, so under root the cluster runs as this system user, which
# Debian's postgresql package creates.
POSTGRES_SYSTEM_USER = "postgres"

STARTUP_TIMEOUT_S = 90.0
STOP_TIMEOUT_S = 20.0
LOG_TAIL_CHARS = 3000


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def skip_or_fail(reason: str) -> None:
    """Skip the test locally, but fail it under CI=true, where every service must be present."""
    if in_ci():
        pytest.fail(f"{reason} (CI=true, so this fails instead of skipping; .ci/run installs it)")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class ManagedProcess:
    """A server process started in its own session, with its output in a log file."""

    def __init__(self, name: str, command: list[str], log_path: Path, **popen_options) -> None:
        self.name = name
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            command, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True, **popen_options
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]

    def stop(self, first_signal: int = signal.SIGTERM) -> None:
        """Send first_signal to the started process, then kill its process group if it outlives the timeout."""
        if self.process.poll() is None:
            self.process.send_signal(first_signal)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()
        self.process.wait(timeout=STOP_TIMEOUT_S)
        self._log.close()

    def _kill_group(self) -> None:
        # The process leads its own session, so its group id is its PID; children such as
        # uvicorn workers are in that group too.
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for_http(url: str, server: ManagedProcess, timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Poll url until it returns HTTP 200; fail with the server's log when it exits or times out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with code {server.process.returncode}:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{server.name} did not answer {url} within {timeout_s:.0f} s:\n{server.log_tail()}")


def postgres_bin_dir() -> Path | None:
    """Return the folder of initdb and postgres: Debian's newest /usr/lib/postgresql/N/bin, else PATH."""
    debian = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda path: _version_key(path.parent.parent.name))
    if debian:
        return debian[-1].parent

    initdb = shutil.which("initdb")
    if initdb and (Path(initdb).resolve().parent / "postgres").exists():
        return Path(initdb).resolve().parent
    return None


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


class PostgresCluster:
    """A PostgreSQL cluster in a temporary folder, owned by one test session."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = free_port()
        self.folder = Path(tempfile.mkdtemp(prefix="aeplat-postgres-"))
        self.data_dir = self.folder / "data"
        self.server: ManagedProcess | None = None
        self._user_options = self._system_user_options()

    @property
    def uri(self) -> str:
        # SQLAlchemy 2.1 defaults postgresql:// to the psycopg 3 driver, so the psycopg2 driver is named.
        return f"postgresql+psycopg2://{POSTGRES_USER}:{POSTGRES_PASSWORD}@127.0.0.1:{self.port}/{POSTGRES_DATABASE}"

    def start(self) -> None:
        """Create the cluster, start its server on 127.0.0.1 and create the MLflow database."""
        self._initdb()
        command = [
            str(self.bin_dir / "postgres"),
            "-D", str(self.data_dir),
            "-h", "127.0.0.1",
            "-p", str(self.port),
            "-k", str(self.folder),
            # A throwaway cluster needs no crash safety, and fsync off makes MLflow's schema migration faster.
            "-c", "fsync=off",
            "-c", "full_page_writes=off",
            "-c", "shared_buffers=16MB",
        ]  # fmt: skip
        self.server = ManagedProcess("PostgreSQL", command, self.folder / "postgres.log", cwd=self.folder, **self._user_options)
        self._wait_until_ready()
        self._create_database()

    def stop(self) -> None:
        # SIGINT requests a fast shutdown from the postmaster, which ends its sessions and exits.
        if self.server is not None:
            self.server.stop(signal.SIGINT)
        shutil.rmtree(self.folder, ignore_errors=True)

    def _system_user_options(self) -> dict:
        if os.geteuid() != 0:
            return {}
        try:
            account = pwd.getpwnam(POSTGRES_SYSTEM_USER)
        except KeyError:
            skip_or_fail(
                f"running as root, PostgreSQL needs the system user {POSTGRES_SYSTEM_USER!r}; "
                "install Debian's postgresql package, which creates it"
            )
        os.chown(self.folder, account.pw_uid, account.pw_gid)
        return {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": [], "env": {**os.environ, "HOME": str(self.folder)}}

    def _initdb(self) -> None:
        password_file = self.folder / "password"
        password_file.write_text(POSTGRES_PASSWORD + "\n")
        if self._user_options:
            os.chown(password_file, self._user_options["user"], self._user_options["group"])

        command = [
            str(self.bin_dir / "initdb"),
            "-D", str(self.data_dir),
            "-U", POSTGRES_USER,
            "--pwfile", str(password_file),
            "--auth", "scram-sha-256",
            "--encoding", "UTF8",
            "--locale", "C",
            "--no-sync",
        ]  # fmt: skip
        completed = subprocess.run(command, cwd=self.folder, capture_output=True, text=True, timeout=120, **self._user_options)
        password_file.unlink()
        if completed.returncode != 0:
            raise RuntimeError(f"initdb failed with code {completed.returncode}:\n{completed.stdout}\n{completed.stderr}")

    def _wait_until_ready(self) -> None:
        import psycopg2

        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if self.server.process.poll() is not None:
                raise RuntimeError(f"PostgreSQL exited with code {self.server.process.returncode}:\n{self.server.log_tail()}")
            try:
                psycopg2.connect(self._admin_dsn(), connect_timeout=2).close()
                return
            except psycopg2.OperationalError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"PostgreSQL did not accept connections within {STARTUP_TIMEOUT_S:.0f} s:\n{self.server.log_tail()}")
                time.sleep(0.2)

    def _create_database(self) -> None:
        import psycopg2

        connection = psycopg2.connect(self._admin_dsn())
        try:
            connection.autocommit = True
            with connection.cursor() as cursor:
                cursor.execute(f"CREATE DATABASE {POSTGRES_DATABASE}")
        finally:
            connection.close()

    def _admin_dsn(self) -> str:
        return f"host=127.0.0.1 port={self.port} user={POSTGRES_USER} password={POSTGRES_PASSWORD} dbname=postgres"


def start_moto_server(log_dir: Path) -> tuple[ManagedProcess, str]:
    """Start moto's standalone S3-compatible server and return it with its endpoint URL."""
    port = free_port()
    script = Path(sys.executable).parent / "moto_server"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "moto.server"]
    server = ManagedProcess("moto S3 server", [*command, "-H", "127.0.0.1", "-p", str(port)], log_dir / "moto.log")
    endpoint = f"http://127.0.0.1:{port}"
    wait_for_http(f"{endpoint}/moto-api/", server)
    return server, endpoint


def start_mlflow_server(backend_uri: str, artifacts_destination: str, s3_endpoint: str, log_dir: Path) -> tuple[ManagedProcess, str]:
    """Start `mlflow server` with one worker, proxying artifacts to S3, and return it with its URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--serve-artifacts",
        "--artifacts-destination", artifacts_destination,
        "--host", "127.0.0.1",
        "--port", str(port),
        "--workers", "1",
    ]  # fmt: skip
    env = {
        **os.environ,
        **AWS_TEST_CREDENTIALS,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint,
        # The job runner (huey) is for server-side jobs such as trace rollups, which these tests do not use.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    server = ManagedProcess("MLflow server", command, log_dir / "mlflow-server.log", env=env)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/health", server)
    return server, url


def start_model_server(model_uri: str, tracking_uri: str, log_dir: Path) -> tuple[ManagedProcess, str]:
    """Start `mlflow models serve` on a model in the current environment and return it with its URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "models", "serve",
        "-m", model_uri,
        "--env-manager", "local",
        "-h", "127.0.0.1",
        "-p", str(port),
        "--workers", "1",
    ]  # fmt: skip
    # The command runs `uvicorn` from PATH, as in an activated virtual environment.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, "PATH": path, "MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_REGISTRY_URI": tracking_uri}
    server = ManagedProcess("MLflow model server", command, log_dir / "model-server.log", env=env)
    url = f"http://127.0.0.1:{port}"
    wait_for_http(f"{url}/ping", server)
    return server, url
