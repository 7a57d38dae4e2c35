"""`aeplat search` end to end: real BraTS scans, real Ray, real MLflow, run as a user runs it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from aeplat.deploy import load_error_map_model, load_scoring_model, score_images
from search_support import TRIALS, run_search_command


def _client(uri: str) -> MlflowClient:
    return MlflowClient(uri, registry_uri=uri)


def _search_runs(client: MlflowClient) -> tuple:
    experiment = client.get_experiment_by_name("aeplat-brats-flair")
    runs = client.search_runs([experiment.experiment_id])
    parents = [run for run in runs if run.data.tags.get("aeplat.kind") == "search"]
    children = [run for run in runs if "mlflow.parentRunId" in run.data.tags]
    return parents, children


def test_search_creates_parent_and_child_runs(search_run: dict) -> None:
    client = _client(search_run["tracking_uri"])

    parents, children = _search_runs(client)

    assert len(parents) == 1
    assert parents[0].info.status == "FINISHED"
    assert len(children) == TRIALS
    assert all(child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for child in children)
    assert all(child.info.status == "FINISHED" for child in children)


def test_search_metrics_lie_in_unit_interval(search_run: dict) -> None:
    client = _client(search_run["tracking_uri"])

    parents, children = _search_runs(client)

    parent_metrics = parents[0].data.metrics
    for name in ("best_val_auc", "test_auc", "test_ap"):
        assert 0.0 <= parent_metrics[name] <= 1.0, name
    for child in children:
        for name in ("val_auc", "val_ap", "best_val_auc"):
            assert 0.0 <= child.data.metrics[name] <= 1.0, name


def test_parent_run_logs_split_and_space(search_run: dict) -> None:
    client = _client(search_run["tracking_uri"])

    parent = _search_runs(client)[0][0]
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}

    assert {"split.json", "search_space.json", "trials.csv", "val_auc_by_latent_dim.png"} <= artifacts
    assert parent.data.params["split.train.patients"] == "1"
    assert parent.data.params["split.train.abnormal"] == "0"
    assert parent.data.params["search.seed"] == "0"


def test_every_trial_logs_best_model_and_plots(search_run: dict) -> None:
    client = _client(search_run["tracking_uri"])

    _, children = _search_runs(client)

    expected = {"best_model.pt", "training_config.json", "reconstructions.png", "roc_curve.png", "score_histograms.png"}
    for child in children:
        names = {Path(item.path).name for item in client.list_artifacts(child.info.run_id, "best")}
        assert expected <= names, child.data.tags["aeplat.trial_id"]
        assert "aeplat.artifact_failure" not in child.data.tags


def test_parent_run_logs_reproducibility_params(search_run: dict) -> None:
    client = _client(search_run["tracking_uri"])

    params = _search_runs(client)[0][0].data.params

    assert params["search.repeats"] == "1"
    assert params["data.cache_key"]
    assert params["version.torch"]


def test_champion_registered_and_tagged(search_run: dict) -> None:
    client = _client(search_run["tracking_uri"])

    version = client.get_model_version_by_alias("brats-flair", "champion")

    assert version.tags["dataset"] == "brats"
    assert version.tags["modality"] == "flair"
    assert int(version.tags["latent_dim"]) in {1, 2, 4, 8, 16, 32, 64, 128}
    assert 0.0 <= float(version.tags["val_auc"]) <= 1.0
    assert 0.0 <= float(version.tags["test_auc"]) <= 1.0


def test_champion_loads_and_scores_image(search_run: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    images = np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32)
    # mlflow.set_*_uri also export MLFLOW_TRACKING_URI and MLFLOW_REGISTRY_URI, which later
    # searches started from this process would inherit; monkeypatch restores both afterwards.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", search_run["tracking_uri"])
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", search_run["tracking_uri"])

    mlflow.set_tracking_uri(search_run["tracking_uri"])
    mlflow.set_registry_uri(search_run["tracking_uri"])
    try:
        model = load_scoring_model("models:/brats-flair@champion", dst_path=search_run["work"] / "download")
        network = load_error_map_model("models:/brats-flair@champion", dst_path=search_run["work"] / "network")
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    scores, error_maps = score_images(model, images)
    network_scores, _ = score_images(network, images)

    assert scores.shape == (3,)
    assert error_maps.shape == (3, 1, 32, 32)
    assert np.all(np.isfinite(scores))
    assert np.all(scores >= 0)
    np.testing.assert_allclose(network_scores, scores, rtol=0, atol=1e-6)


def test_terminal_output_reports_result(search_run: dict) -> None:
    output = search_run["output"]

    assert "Search finished" in output
    assert "brats-flair" in output
    assert "Best trials" in output


DIVERGING_SPACE = """
dataset: brats
parameters:
  latent_dim: {type: power_of_two, low: 4, high: 16}
  lr: {type: categorical, choices: [1.0e-3, 1.0e+12]}
constants:
  model: ae
  hidden_dim: 256
  entropy_weight: 0.0
"""


def test_diverged_trials_fail_and_search_goes_on(brats_subset: dict, tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(DIVERGING_SPACE)

    completed = run_search_command(tmp_path, brats_subset, "--trials", "6", "--search-space", str(space))

    assert completed.returncode == 0, completed.stderr[-4000:]
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents, children = _search_runs(client)
    failed = [child for child in children if child.info.status == "FAILED"]
    finished = [child for child in children if child.info.status == "FINISHED"]
    assert len(children) == 6
    assert failed, "the lr=1e12 trials should have diverged"
    assert finished, "the lr=1e-3 trials should have finished"
    assert all(child.data.params["lr"] == "1000000000000.0" for child in failed)
    assert all("TrainingDivergedError" in child.data.tags["aeplat.failure_reason"] for child in failed)
    champion = client.get_model_version_by_alias("brats-flair", "champion")
    assert champion.run_id in {child.info.run_id for child in finished}
    assert parents[0].data.metrics["trials_failed"] == len(failed)


TWO_CONFIGURATION_SPACE = """
dataset: brats
parameters:
  latent_dim: {type: power_of_two, low: 4, high: 8}
constants:
  model: ae
  hidden_dim: 256
  entropy_weight: 0.0
  lr: 1.0e-3
"""


def test_exhausted_space_ends_search_early(brats_subset: dict, tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(TWO_CONFIGURATION_SPACE)

    completed = run_search_command(tmp_path, brats_subset, "--trials", "5", "--max-concurrent", "1", "--search-space", str(space))

    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Every configuration of the search space (2 in all)" in " ".join(completed.stderr.split())
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents, children = _search_runs(client)
    assert sorted(child.data.params["latent_dim"] for child in children) == ["4", "8"]
    assert all(child.info.status == "FINISHED" for child in children)
    assert parents[0].info.status == "FINISHED"
    assert len(client.search_model_versions("name = 'brats-flair'")) == 1


def test_all_trials_failing_registers_nothing(brats_subset: dict, tmp_path: Path) -> None:
    space = tmp_path / "space.yaml"
    space.write_text(DIVERGING_SPACE.replace("[1.0e-3, 1.0e+12]", "[1.0e+12]"))

    completed = run_search_command(tmp_path, brats_subset, "--trials", "2", "--search-space", str(space))

    assert completed.returncode == 2
    assert "All 2 trials failed" in completed.stderr
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents, _ = _search_runs(client)
    assert parents[0].info.status == "FAILED"
    assert client.search_registered_models() == []


def test_second_search_reuses_cache(brats_subset: dict, search_run: dict, tmp_path: Path) -> None:
    completed = run_search_command(tmp_path, brats_subset, "--trials", "1")

    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "cache hit" in completed.stderr


def test_impossible_gpu_request_fails_fast(brats_subset: dict, tmp_path: Path) -> None:
    completed = run_search_command(tmp_path, brats_subset, "--trials", "1", "--gpus-per-trial", "4")

    assert completed.returncode == 2
    assert "--gpus-per-trial 4 exceeds every Ray node" in " ".join(completed.stderr.split())


def test_cuda_device_without_cuda_fails_fast(brats_subset: dict, tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")

    completed = run_search_command(tmp_path, brats_subset, "--trials", "1", "--device", "cuda")

    assert completed.returncode == 2
    assert "--device cuda, but torch finds no CUDA device on this machine" in " ".join(completed.stderr.split())
    experiment = _client(f"sqlite:///{tmp_path / 'mlflow.db'}").get_experiment_by_name("aeplat-brats-flair")
    assert experiment is None, "the search created MLflow runs before it checked the device"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_search_registers_nothing(brats_subset: dict, tmp_path: Path, signum: int) -> None:
    command = [
        sys.executable, "-m", "aeplat.platform.cli", "search",
        "--dataset", "brats", "--data-dir", str(brats_subset["data_dir"]), "--modality", "flair",
        "--image-size", "32", "--epochs", "200", "--trials", "2", "--max-concurrent", "2",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--cache-dir", str(brats_subset["cache_dir"]), "--storage", str(tmp_path / "runs"),
    ]  # fmt: skip
    process = subprocess.Popen(command, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
    output = []
    for line in process.stderr:
        output.append(line)
        if "started:" in line:
            break
    time.sleep(3)

    process.send_signal(signum)
    output.extend(process.stderr)
    code = process.wait(timeout=120)

    assert code == 128 + signum, "".join(output)[-3000:]
    client = _client(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parents, children = _search_runs(client)
    assert parents[0].info.status == "KILLED"
    assert children
    assert all(child.info.status != "RUNNING" for child in children)
    assert client.search_registered_models() == []


def test_trials_reuse_worker_processes(search_run: dict) -> None:
    """Tune hands a finished trial's process to the next trial, so a search starts at most max_concurrent processes."""
    pids = set()
    for result_file in (search_run["work"] / "runs").glob("*/trial_*/result.json"):
        lines = [line for line in result_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        pids.update(json.loads(line)["pid"] for line in lines)

    assert 1 <= len(pids) <= 2, pids


def test_checkpoints_keep_validation_scores_of_best_epoch(search_run: dict) -> None:
    score_files = list((search_run["work"] / "runs").glob("*/trial_*/checkpoint_*/validation_scores.npy"))

    assert score_files
    for path in score_files:
        scores = np.load(path)
        assert scores.ndim == 1
        assert len(scores) > 0
        assert np.all(np.isfinite(scores))
        assert np.all(scores >= 0)
