"""Searches that outlive a killed driver and a tracking server that goes away, on real BraTS scans.

Each search runs as a user runs it, as `aeplat search` in a subprocess. A driver to be killed
runs as the first process of its own PID namespace (`unshare --pid`), so SIGKILL takes the
embedded Ray with it, as when a pod is evicted, and leaves no process behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from local_services import ManagedProcess, free_port, wait_for_http
from search_support import search_command

MODEL_NAME = "brats-flair"
RUN_TIMEOUT_S = 600


def _search_command(subset: dict, work: Path, tracking_uri: str, *extra: str) -> list[str]:
    options = ("--trials", "4", "--epochs", "3", "--grace-period", "3", "--tracking-uri", tracking_uri)
    return search_command(subset, work, *options, *extra)


def _pid_namespace_available() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "--map-root-user", "true"], capture_output=True)
    return probe.returncode == 0


def _driver_pid(unshare_pid: int, timeout_s: float = 10.0) -> int:
    """Return the PID, seen from here, of the process that `unshare --fork` started."""
    deadline = time.monotonic() + timeout_s
    children_file = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children")
    while time.monotonic() < deadline:
        children = children_file.read_text().split() if children_file.exists() else []
        if children:
            return int(children[0])
        time.sleep(0.05)
    raise RuntimeError(f"unshare (PID {unshare_pid}) started no process within {timeout_s} s")


def _run_and_kill_at(command: list[str], cwd: Path, marker: str | None, delay_s: float = 0.0) -> tuple[bool, str]:
    """Run command; when an output line contains marker, wait delay_s and SIGKILL the driver.

    Returns whether the driver was killed, and its output. With marker None the run ends by itself.
    """
    namespace = ["unshare", "--pid", "--fork", "--mount-proc", "--map-root-user", "--kill-child"]
    # A wide terminal keeps each log message on one line, so the marker is found.
    env = {**os.environ, "COLUMNS": "400"}
    process = subprocess.Popen([*namespace, *command], cwd=cwd, stderr=subprocess.PIPE, text=True, env=env)
    output: list[str] = []
    killed = False
    timer = threading.Timer(RUN_TIMEOUT_S, process.kill)
    timer.start()
    try:
        driver = _driver_pid(process.pid)
        for line in process.stderr:
            output.append(line)
            if marker is not None and not killed and marker in line:
                time.sleep(delay_s)
                os.kill(driver, signal.SIGKILL)
                killed = True
        process.wait(timeout=60)
    finally:
        timer.cancel()
        if process.poll() is None:
            process.kill()
            process.wait()
    text = "".join(output)
    if not killed:
        assert process.returncode == 0, text[-4000:]
    return killed, text


def _client(uri: str) -> MlflowClient:
    return MlflowClient(uri, registry_uri=uri)


def _runs(client: MlflowClient) -> tuple[list, list]:
    experiment = client.get_experiment_by_name("aeplat-brats-flair")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get("aeplat.kind") == "search"]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    return parents, children


@pytest.mark.slow
def test_driver_killed_at_several_points_continues_one_search(brats_subset: dict, tmp_path: Path) -> None:
    """SIGKILL the driver at four points and check that the same command continues the search each time.

    The points: while trials train, after a trial finished, while the best model is logged,
    and right after it was registered.
    """
    if not _pid_namespace_available():
        pytest.skip("unshare --pid --map-root-user is unavailable, so a killed driver could leave Ray processes behind")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Trials of 10 epochs are still training 1 s after the first one started, so the first
    # kill lands while trials train.
    command = _search_command(brats_subset, tmp_path, uri, "--epochs", "10", "--grace-period", "10")
    kill_points = [
        ("started:", 1.0, command),
        ("finished after", 0.0, command),
        ("Best trial", 0.0, [*command, "--resume"]),
        (f"Registered {MODEL_NAME} v1", 0.0, command),
    ]

    for number, (marker, delay_s, attempt) in enumerate(kill_points, start=1):
        killed, output = _run_and_kill_at(attempt, tmp_path, marker, delay_s)
        # Each attempt's output stays in the test's folder for a failure's post-mortem.
        (tmp_path / f"attempt-{number}.log").write_text(output)
        assert killed, f"the search ended before {marker!r}:\n{output[-3000:]}"

    client = _client(uri)
    # The last kill lands a few milliseconds after registration. When the search had already
    # ended its parent run as FINISHED by then, running the command again would start a new
    # search, so there is nothing left to continue.
    if _runs(client)[0][0].info.status != "FINISHED":
        _, final_output = _run_and_kill_at(command, tmp_path, None)
        assert "Resuming search run" in final_output, final_output[-3000:]

    parents, children = _runs(client)
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    trial_ids = [child.data.tags["aeplat.trial_id"] for child in children]
    assert sorted(set(trial_ids)) == sorted(trial_ids)
    assert len(trial_ids) == 4
    assert all(child.info.status == "FINISHED" for child in children)
    versions = client.search_model_versions(f"name = '{MODEL_NAME}'")
    assert [str(version.version) for version in versions] == ["1"]
    assert str(client.get_model_version_by_alias(MODEL_NAME, "champion").version) == "1"
    assert parents[0].data.tags["registered_model"] == f"{MODEL_NAME}/1"


def _start_tracking_server(backend_uri: str, artifacts: Path, port: int, log_path: Path) -> ManagedProcess:
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", backend_uri,
        "--artifacts-destination", str(artifacts),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    server = ManagedProcess("MLflow server", command, log_path, env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"})
    wait_for_http(f"http://127.0.0.1:{port}/health", server)
    return server


@pytest.mark.slow
def test_trials_reach_mlflow_after_a_tracking_server_outage(brats_subset: dict, tmp_path: Path) -> None:
    """Stop the MLflow server while trials train and start it again: every epoch of every trial is logged."""
    backend = f"sqlite:///{tmp_path / 'server.db'}"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = _start_tracking_server(backend, tmp_path / "artifacts", port, tmp_path / "server-1.log")
    # 10-epoch trials are still training when the server stops.
    command = _search_command(brats_subset, tmp_path, url, "--epochs", "10", "--grace-period", "10")
    # A wide terminal keeps each log message on one line, so the markers below are found.
    env = {**os.environ, "COLUMNS": "400"}
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)
    output: list[str] = []
    try:
        for line in process.stderr:
            output.append(line)
            if "started:" in line:
                break
        server.stop()
        for line in process.stderr:
            output.append(line)
            if "unreachable" in line:
                break
        time.sleep(10)
        server = _start_tracking_server(backend, tmp_path / "artifacts", port, tmp_path / "server-2.log")
        output.extend(process.stderr)
        code = process.wait(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=120)
        server.stop()

    text = "".join(output)
    assert code == 0, text[-4000:]
    assert "reachable again" in " ".join(text.split())
    server = _start_tracking_server(backend, tmp_path / "artifacts", port, tmp_path / "server-3.log")
    try:
        client = _client(url)
        parents, children = _runs(client)
        assert parents[0].info.status == "FINISHED"
        assert len(children) == 4
        for child in children:
            assert child.info.status == "FINISHED"
            steps = {metric.step for metric in client.get_metric_history(child.info.run_id, "val_auc")}
            assert steps == set(range(1, 11)), (child.data.tags["aeplat.trial_id"], steps)
            assert child.data.params["latent_dim"]
        assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == 1
    finally:
        server.stop()


@pytest.mark.slow
def test_resume_after_ctrl_c_one_run_per_trial(brats_subset: dict, tmp_path: Path) -> None:
    """Ctrl-C while trials start and finish, then the same command: one FINISHED run per requested trial."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    command = search_command(brats_subset, tmp_path, "--trials", "6", "--epochs", "6", "--grace-period", "2", "--tracking-uri", uri)
    env = {**os.environ, "COLUMNS": "400"}
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True, env=env)
    output: list[str] = []
    finished = 0
    for line in process.stderr:
        output.append(line)
        finished += "finished after" in line
        if finished == 2:
            process.send_signal(signal.SIGINT)
            break
    output.extend(process.stderr)
    code = process.wait(timeout=RUN_TIMEOUT_S)
    (tmp_path / "interrupted.log").write_text("".join(output))

    assert code == 130, "".join(output)[-3000:]
    client = _client(uri)
    parents, children = _runs(client)
    assert parents[0].info.status == "KILLED"
    assert [child.info.run_id for child in children if child.info.status == "RUNNING"] == []

    _, final_output = _run_and_kill_at(command, tmp_path, None)

    assert "Resuming search run" in final_output, final_output[-3000:]
    parents, children = _runs(client)
    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    trial_ids = [child.data.tags["aeplat.trial_id"] for child in children]
    assert len(trial_ids) == 6
    assert len(set(trial_ids)) == 6
    assert all(child.info.status == "FINISHED" for child in children)
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == 1
