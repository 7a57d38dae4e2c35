"""`aeplat submit`: option checks without a cluster, and one search submitted to a real Ray head."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, AsyncIterator

import pytest
from mlflow.tracking import MlflowClient

from aeplat.platform import submit
from aeplat.platform.cli import _add_search_options, main
from aeplat.platform.cli_submit import check_search_options, cluster_paths, parse_search_options
from aeplat.platform.submit import SubmitError, job_server_address, parse_runtime_env

VENV_BIN = Path(sys.executable).parent
SEARCH = ["--dataset", "brats", "--data-dir", "/data/brats"]


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _flat(text: str) -> str:
    """Join the lines that rich wraps at the terminal width."""
    return " ".join(text.split())


def test_entrypoint_quotes_every_value() -> None:
    arguments = ["--data-dir", "/data/my scans", "--experiment", "a;rm -rf /", "--trials", "3"]

    entrypoint = submit.search_entrypoint(arguments)

    assert entrypoint.startswith("aeplat search ")
    assert shlex.split(entrypoint) == ["aeplat", "search", *arguments]


def test_address_option_wins_over_environment() -> None:
    environ = {"RAY_API_SERVER_ADDRESS": "http://10.0.0.1:8265", "RAY_ADDRESS": "http://10.0.0.2:8265"}

    assert job_server_address("http://127.0.0.1:8265/", environ) == "http://127.0.0.1:8265"


def test_address_from_environment() -> None:
    both = {"RAY_API_SERVER_ADDRESS": "http://10.0.0.1:8265", "RAY_ADDRESS": "http://10.0.0.2:8265"}

    assert job_server_address(None, both) == "http://10.0.0.1:8265"
    assert job_server_address(None, {"RAY_ADDRESS": "https://head.example:443"}) == "https://head.example:443"


def test_cluster_ray_address_is_not_job_server() -> None:
    with pytest.raises(SubmitError, match=r"RAY_ADDRESS='10.0.0.2:6379' is a cluster address"):
        job_server_address(None, {"RAY_ADDRESS": "10.0.0.2:6379"})


def test_missing_address_names_option() -> None:
    with pytest.raises(SubmitError, match="--address http://HEAD:8265"):
        job_server_address(None, {})


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("127.0.0.1:8265", "not an http:// or https:// URL"),
        ("ray://127.0.0.1:10001", "not an http:// or https:// URL"),
        ("http://127.0.0.1:99999", "invalid port"),
        ("http://user:secret@127.0.0.1:8265", "contains credentials"),
    ],
)
def test_invalid_address_rejected(address: str, message: str) -> None:
    with pytest.raises(SubmitError, match=message):
        job_server_address(address, {})


def test_search_option_typo_rejected() -> None:
    with pytest.raises(SubmitError, match="unrecognized arguments: --trails"):
        parse_search_options([*SEARCH, "--trails", "3"], _add_search_options)


def test_missing_search_option_rejected() -> None:
    with pytest.raises(SubmitError, match="required: --data-dir"):
        parse_search_options(["--dataset", "brats"], _add_search_options)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ray-address", "127.0.0.1:6379"], "does not apply to a submitted search"),
        (["--tracking-uri", "postgresql://mlflow:secret@db/mlflow"], "--tracking-uri contains a password"),
        (["--s3-endpoint-url", "http://key:secret@127.0.0.1:9000"], "--s3-endpoint-url contains a password"),
        (["--trials", "0"], "--trials must be at least 1"),
        (["--epochs", "2", "--grace-period", "3"], "--grace-period must lie in"),
    ],
)
def test_unusable_search_options_rejected(extra: list[str], message: str) -> None:
    search = parse_search_options([*SEARCH, *extra], _add_search_options)

    with pytest.raises(SubmitError, match=message):
        check_search_options(search)


def test_cluster_paths_list_local_locations() -> None:
    search = parse_search_options(
        [*SEARCH, "--storage", "runs", "--cache-dir", "/cache", "--tracking-uri", "sqlite:////srv/mlflow.db"],
        _add_search_options,
    )

    paths = cluster_paths(search)

    assert paths == ["--data-dir /data/brats", "--storage runs (relative)", "--cache-dir /cache", "--tracking-uri sqlite:////srv/mlflow.db"]


def test_cluster_paths_skip_remote_locations() -> None:
    search = parse_search_options(
        ["--dataset", "brats", "--data-dir", "s3://scans/brats", "--storage", "s3://runs/aeplat", "--tracking-uri", "http://mlflow:5000"],
        _add_search_options,
    )

    assert cluster_paths(search) == []


def test_runtime_env_parsed() -> None:
    runtime_env = parse_runtime_env('{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "OMP_NUM_THREADS": "4"}}')

    assert runtime_env == {"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000", "OMP_NUM_THREADS": "4"}}
    assert parse_runtime_env(None) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{env_vars: 1}", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"env_vars": ["A=1"]}', "env_vars in --runtime-env-json must be an object"),
        ('{"env_vars": {"AWS_SECRET_ACCESS_KEY": "x"}}', r"sets credentials \['AWS_SECRET_ACCESS_KEY'\]"),
        ('{"env_vars": {"MLFLOW_TRACKING_PASSWORD": "x"}}', "sets credentials"),
        ('{"env_vars": {"RAY_AUTH_TOKEN": "x"}}', "sets credentials"),
        ('{"env_vars": {"AWS_ACCESS_KEY_ID": "x"}}', "sets credentials"),
        ('{"env_vars": {"AEPLAT_PATIENT_SALT": "x"}}', "sets credentials"),
    ],
)
def test_invalid_runtime_env_rejected(text: str, message: str) -> None:
    with pytest.raises(SubmitError, match=message):
        parse_runtime_env(text)


def test_unreachable_job_server_fails_within_seconds(capsys: pytest.CaptureFixture) -> None:
    address = f"http://127.0.0.1:{_closed_port()}"

    started = time.monotonic()
    code = main(["submit", "--address", address, "--", *SEARCH])

    assert code == 2
    assert time.monotonic() - started < 10
    assert f"The job server at {address} does not accept connections" in _flat(capsys.readouterr().err)


def test_missing_search_options_exit_2(capsys: pytest.CaptureFixture) -> None:
    code = main(["submit", "--address", "http://127.0.0.1:8265"])

    assert code == 2
    assert "No search options" in capsys.readouterr().err


def test_client_ignores_address_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)

    with submit._address_variables_removed():
        assert "RAY_ADDRESS" not in os.environ

    assert os.environ["RAY_ADDRESS"] == "10.0.0.2:6379"


class FakeJobClient:
    """The part of JobSubmissionClient that aeplat uses, with scripted logs and statuses."""

    def __init__(self, chunks: list[str], statuses: list[str], message: str = "", tail_error: BaseException | None = None) -> None:
        self.chunks = chunks
        self.statuses = statuses
        self.message = message
        self.tail_error = tail_error
        self.submitted: dict[str, Any] = {}

    def submit_job(self, **request: Any) -> str:
        self.submitted = request
        return request["submission_id"] or "raysubmit_fake"

    async def tail_job_logs(self, job_id: str) -> AsyncIterator[str]:
        for chunk in self.chunks:
            yield chunk
        if self.tail_error is not None:
            raise self.tail_error

    def get_job_info(self, job_id: str) -> SimpleNamespace:
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        return SimpleNamespace(status=status, message=self.message, driver_exit_code=None)


def _submit_with(client: FakeJobClient, monkeypatch: pytest.MonkeyPatch, *options: str) -> int:
    monkeypatch.setattr(submit, "connect", lambda address, timeout_s=5.0: client)
    return main(["submit", "--address", "http://127.0.0.1:8265", *options, "--", *SEARCH, "--trials", "2"])


def test_succeeded_job_exits_0(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    client = FakeJobClient(["Search finished in 3 s\n"], ["SUCCEEDED"])

    code = _submit_with(client, monkeypatch, "--job-id", "search-1")

    output = capsys.readouterr()
    assert code == 0
    assert output.out == "Search finished in 3 s\n"
    assert "Job search-1 SUCCEEDED." in output.err
    assert client.submitted["entrypoint"] == "aeplat search --dataset brats --data-dir /data/brats --trials 2"
    assert client.submitted["submission_id"] == "search-1"
    assert client.submitted["runtime_env"] is None


def test_failed_job_exits_1_with_message(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    message = "Job entrypoint command failed with exit code 2, last available logs (truncated to 20,000 chars):\nerror: no cases\n"
    client = FakeJobClient(["error: no cases\n"], ["FAILED"], message=message)

    code = _submit_with(client, monkeypatch)

    err = _flat(capsys.readouterr().err)
    assert code == 1
    assert "Job raysubmit_fake FAILED: Job entrypoint command failed with exit code 2" in err
    assert "last available logs" not in err


def test_stopped_job_exits_1(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    client = FakeJobClient([], ["STOPPED"], message="Job was intentionally stopped.")

    code = _submit_with(client, monkeypatch)

    assert code == 1
    assert "STOPPED: Job was intentionally stopped." in _flat(capsys.readouterr().err)


def test_broken_log_stream_falls_back_to_status(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    client = FakeJobClient(["first line\n"], ["RUNNING", "RUNNING", "SUCCEEDED"], tail_error=RuntimeError("WebSocket closed"))
    monkeypatch.setattr(submit.time, "sleep", lambda seconds: None)

    outcome = submit.follow_job(client, "raysubmit_fake", lambda text: None)

    assert outcome.succeeded
    assert not outcome.logs_streamed


def test_no_wait_prints_job_id(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    client = FakeJobClient(["never read\n"], ["RUNNING"])

    code = _submit_with(client, monkeypatch, "--no-wait")

    output = capsys.readouterr()
    assert code == 0
    assert output.out == "raysubmit_fake\n"
    assert "ray job logs raysubmit_fake --address http://127.0.0.1:8265 --follow" in _flat(output.err)


def test_interrupt_detaches_from_job(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    client = FakeJobClient(["epoch 1\n"], ["RUNNING"], tail_error=KeyboardInterrupt())

    code = _submit_with(client, monkeypatch)

    err = _flat(capsys.readouterr().err)
    assert code == 130
    assert "It keeps running on the cluster" in err
    assert "ray job stop raysubmit_fake --address http://127.0.0.1:8265" in err


def test_interrupt_before_submission_exits_130(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    def interrupted_connect(address: str, timeout_s: float = 5.0) -> FakeJobClient:
        raise KeyboardInterrupt

    monkeypatch.setattr(submit, "connect", interrupted_connect)

    code = main(["submit", "--address", "http://127.0.0.1:8265", "--", *SEARCH])

    assert code == 130
    assert "ray job list --address http://127.0.0.1:8265" in _flat(capsys.readouterr().err)


def test_runtime_env_reaches_job(monkeypatch: pytest.MonkeyPatch) -> None:
    client = FakeJobClient([], ["SUCCEEDED"])

    _submit_with(client, monkeypatch, "--runtime-env-json", '{"env_vars": {"OMP_NUM_THREADS": "4"}}')

    assert client.submitted["runtime_env"] == {"env_vars": {"OMP_NUM_THREADS": "4"}}


# The Ray head runs in its own network, PID and mount namespaces. Ray listens on 127.0.0.1 there,
# and every process of the namespace ends when its first process (the script's shell) exits.
# `unshare --kill-child` ends that shell when unshare itself is killed by the timeout.
# /tmp/ray gets a private tmpfs, so the cluster never writes /tmp/ray/ray_current_cluster, which
# an embedded Ray of another process would read to find a cluster to join.
CLUSTER_SCRIPT = """\
set -u
ip link set lo up
mkdir -p /tmp/ray
mount -t tmpfs tmpfs /tmp/ray
cd {work}
if ! ray start --head --port 6379 --dashboard-host 127.0.0.1 --dashboard-port 8265 --num-cpus 2 \\
        --include-dashboard=true --disable-usage-stats > ray-start.log 2>&1; then
    exit 90
fi
# The failing search needs no CPU of the cluster, so it runs while the search trains.
aeplat submit --address http://127.0.0.1:8265 -- {search_args} > search.out 2> search.err &
search_pid=$!
aeplat submit --address http://127.0.0.1:8265 --job-id failing-search -- {failing_args} > failing.out 2> failing.err
echo $? > failing.rc
wait $search_pid
echo $? > search.rc
aeplat submit --address http://127.0.0.1:8265 --job-id stopped-search --no-wait -- {stopped_args} > stopped.out 2> stopped.err
echo $? > stopped.rc
python - <<'PY'
import time
import urllib.request

# Stop the job once a trial runs, so that its MLflow runs exist.
deadline = time.monotonic() + 300
while time.monotonic() < deadline:
    with urllib.request.urlopen("http://127.0.0.1:8265/api/jobs/stopped-search/logs", timeout=10) as response:
        if b"started:" in response.read():
            break
    time.sleep(1)
PY
ray job stop stopped-search --address http://127.0.0.1:8265 > stop.log 2>&1
echo $? > stop.rc
"""


def _namespaces_available() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "--net", "--map-root-user", "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return probe.returncode == 0


@pytest.fixture(scope="module")
def cluster_run(brats_subset: dict, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Start a Ray head with its job server in a namespace, submit three searches to it, and return the folder of their outputs."""
    if not _namespaces_available():
        pytest.skip("`unshare --net --map-root-user` is unavailable, so no private Ray cluster can be started")

    work = tmp_path_factory.mktemp("submit")
    data_dir = brats_subset["data_dir"]
    cache_dir = brats_subset["cache_dir"]

    search_args = [
        "--dataset", "brats", "--data-dir", str(data_dir), "--modality", "flair",
        "--image-size", "32", "--trials", "2", "--epochs", "2", "--grace-period", "1", "--max-concurrent", "2",
        "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
        "--cache-dir", str(cache_dir), "--storage", str(work / "runs"),
    ]  # fmt: skip
    failing_args = ["--dataset", "brats", "--data-dir", str(work / "missing"), "--tracking-uri", f"sqlite:///{work / 'failing.db'}"]
    stopped_args = [
        *search_args[:search_args.index("--trials")], "--trials", "1", "--epochs", "500", "--max-concurrent", "1",
        "--tracking-uri", f"sqlite:///{work / 'stopped.db'}",
        "--cache-dir", str(cache_dir), "--storage", str(work / "stopped-runs"),
    ]  # fmt: skip
    environment = {
        **{name: value for name, value in os.environ.items() if name not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI")},
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "RAY_AUTH_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",
        # Seconds the job server waits after SIGTERM before it kills a stopped job (3 by default).
        "RAY_JOB_STOP_WAIT_TIME_S": "60",
    }
    script = CLUSTER_SCRIPT.format(
        work=shlex.quote(str(work)),
        search_args=shlex.join(search_args),
        failing_args=shlex.join(failing_args),
        stopped_args=shlex.join(stopped_args),
    )
    (work / "cluster.sh").write_text(script)
    command = ["unshare", "--net", "--pid", "--fork", "--kill-child", "--mount-proc", "--map-root-user", "bash", str(work / "cluster.sh")]

    completed = subprocess.run(command, cwd=work, env=environment, capture_output=True, text=True, timeout=600)

    start_log = work / "ray-start.log"
    assert completed.returncode == 0, (completed.stderr, start_log.read_text() if start_log.exists() else "")
    return work


def test_submitted_search_succeeds(cluster_run: Path) -> None:
    code = int((cluster_run / "search.rc").read_text())

    err = (cluster_run / "search.err").read_text()
    assert code == 0, err[-4000:]
    assert "SUCCEEDED" in err
    assert "WebSocket closed" not in err


def test_submitted_search_streams_logs(cluster_run: Path) -> None:
    logs = _flat((cluster_run / "search.out").read_text())

    assert "Connecting to the Ray cluster at 127.0.0.1:6379" in logs
    assert "Search finished" in logs


def test_submitted_search_warns_about_paths(cluster_run: Path, brats_subset: dict) -> None:
    err = (cluster_run / "search.err").read_text()

    assert "paths on the Ray cluster, not on this machine" in _flat(err)
    # Rich may break a long path across lines, so the path is compared without whitespace.
    assert f"--data-dir{brats_subset['data_dir']}" in "".join(err.split())


def test_submitted_search_registers_model(cluster_run: Path) -> None:
    uri = f"sqlite:///{cluster_run / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)

    version = client.get_model_version_by_alias("brats-flair", "champion")

    assert version.tags["dataset"] == "brats"


def test_failing_search_exits_1(cluster_run: Path) -> None:
    code = int((cluster_run / "failing.rc").read_text())
    err = _flat((cluster_run / "failing.err").read_text())

    assert code == 1, err[-4000:]
    assert "Job failing-search FAILED: Job entrypoint command failed with exit code 2" in err


def test_no_wait_prints_only_job_id(cluster_run: Path) -> None:
    assert int((cluster_run / "stopped.rc").read_text()) == 0, (cluster_run / "stopped.err").read_text()[-4000:]
    assert (cluster_run / "stopped.out").read_text() == "stopped-search\n"
    assert "ray job stop stopped-search --address http://127.0.0.1:8265" in _flat((cluster_run / "stopped.err").read_text())


def test_stopped_job_ends_runs_as_killed(cluster_run: Path) -> None:
    uri = f"sqlite:///{cluster_run / 'stopped.db'}"
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("aeplat-brats-flair")

    runs = client.search_runs([experiment.experiment_id])

    assert int((cluster_run / "stop.rc").read_text()) == 0, (cluster_run / "stop.log").read_text()
    assert runs
    assert all(run.info.status == "KILLED" for run in runs), [(run.info.run_name, run.info.status) for run in runs]
