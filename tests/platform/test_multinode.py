"""A search on a two-node Ray cluster started with `ray start`, on real BraTS scans.

The cluster runs in a private network, PID and mount namespace: Ray stays on 127.0.0.1 there,
and every process of the namespace ends when the scenario script ends.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from search_support import search_command

SCENARIO = Path(__file__).with_name("node_loss_scenario.py")
NAMESPACE = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--map-root-user", "--kill-child"]


def _namespaces_available() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    probe = subprocess.run([*NAMESPACE, "ip", "link", "set", "lo", "up"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
def test_search_finishes_after_losing_a_worker_node(brats_subset: dict, tmp_path: Path) -> None:
    if not _namespaces_available():
        pytest.skip("unshare --net --pid --map-root-user is unavailable, so a private two-node cluster cannot start")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    search = search_command(
        brats_subset, tmp_path, "--trials", "3", "--epochs", "30", "--grace-period", "30", "--max-failures", "2", "--checkpoint-interval", "0", "--tracking-uri", uri
    )

    completed = subprocess.run(
        [*NAMESPACE, sys.executable, str(SCENARIO), "--work", str(tmp_path), "--", *search],
        capture_output=True,
        text=True,
        timeout=900,
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    assert outcome["killed"], outcome["log_tail"]
    assert outcome["returncode"] == 0, outcome["log_tail"]
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("aeplat-brats-flair")
    runs = client.search_runs([experiment.experiment_id])
    children = {run.data.tags["aeplat.trial_id"]: run for run in runs if "mlflow.parentRunId" in run.data.tags}
    assert len(children) == 3
    assert all(child.info.status == "FINISHED" for child in children.values()), [child.info.status for child in children.values()]
    histories = {trial_id: [m.step for m in client.get_metric_history(run.info.run_id, "val_auc")] for trial_id, run in children.items()}
    assert all(max(steps) == 30 for steps in histories.values()), histories

    lost = _trials_that_failed(tmp_path / "runs")
    assert lost, outcome["log_tail"]
    for trial_id in lost:
        # Rerun from its checkpoint, not from scratch: the first epoch was reported once.
        assert histories[trial_id].count(1) == 1, histories[trial_id]
    assert len(client.search_model_versions("name = 'brats-flair'")) == 1


def _trials_that_failed(storage: Path) -> list[str]:
    """Return the trials that Ray Tune's final experiment state records with at least one failure."""
    state_file = sorted(storage.glob("*/experiment_state-*.json"))[-1]
    trials = json.loads(state_file.read_text())["trial_data"]
    lost = []
    for trial_state, runtime in trials:
        state = json.loads(trial_state) if isinstance(trial_state, str) else trial_state
        metadata = json.loads(runtime) if isinstance(runtime, str) else runtime
        if metadata.get("num_failures", 0) > 0:
            lost.append(state["trial_id"])
    return lost
