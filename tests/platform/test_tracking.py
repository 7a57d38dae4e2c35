"""MlflowTrialCallback against a real embedded Ray and a real SQLite MLflow store."""

from __future__ import annotations

import os
import pickle
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray")
from mlflow.tracking import MlflowClient  # noqa: E402
from ray import tune  # noqa: E402

from ray.tune.schedulers import ASHAScheduler  # noqa: E402

from aeplat.platform.env import apply_privacy_defaults  # noqa: E402
from aeplat.platform.runner import TolerantOptunaSearch  # noqa: E402
from aeplat.platform.tracking import FAILURE_TAG, STOPPED_EARLY_TAG, TRIAL_ID_TAG, MlflowTrialCallback  # noqa: E402


def _report_or_fail(config: dict) -> None:
    for epoch in range(1, 4):
        if config["fail"] and epoch == 2:
            raise FloatingPointError("loss is nan at epoch 2")
        tune.report({"epoch": epoch, "val_auc": 0.5 + 0.1 * epoch, "best_val_auc": 0.5 + 0.1 * epoch, "train_loss": 1.0 / epoch})


def _training_values(config: dict) -> dict:
    return {"fail": config["fail"]}


@pytest.fixture(scope="module")
def local_ray():
    # Ray workers import the trainables of this module by name, so they need its folder on their path.
    previous = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parent), previous]))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    if previous is None:
        os.environ.pop("PYTHONPATH")
    else:
        os.environ["PYTHONPATH"] = previous


def test_child_runs_record_success_and_failure(tmp_path: Path, local_ray: None) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("callback-test", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id)
    callback = MlflowTrialCallback(uri, experiment_id, parent.info.run_id, _training_values, max_epochs=3)

    tuner = tune.Tuner(
        _report_or_fail,
        param_space={"fail": tune.grid_search([False, True])},
        run_config=tune.RunConfig(storage_path=str(tmp_path / "runs"), callbacks=[callback], verbose=0),
    )
    results = tuner.fit()

    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    by_param = {run.data.params["fail"]: run for run in runs}
    assert len(results) == 2
    assert len(runs) == 2
    assert by_param["False"].info.status == "FINISHED"
    assert by_param["False"].data.tags[STOPPED_EARLY_TAG] == "false"
    assert by_param["False"].data.metrics["val_auc"] == pytest.approx(0.8)
    assert by_param["True"].info.status == "FAILED"
    assert "loss is nan at epoch 2" in by_param["True"].data.tags[FAILURE_TAG]
    assert all(TRIAL_ID_TAG in run.data.tags for run in runs)


def test_metric_history_has_one_step_per_epoch(tmp_path: Path, local_ray: None) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("history-test", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id)
    callback = MlflowTrialCallback(uri, experiment_id, parent.info.run_id, _training_values, max_epochs=3)

    tune.Tuner(
        _report_or_fail,
        param_space={"fail": False},
        run_config=tune.RunConfig(storage_path=str(tmp_path / "runs"), callbacks=[callback], verbose=0),
    ).fit()

    run = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")[0]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [point.step for point in history] == [1, 2, 3]


def _report_without_metric(config: dict) -> None:
    for epoch in range(1, 4):
        metrics = {"epoch": epoch, "train_loss": config["x"]}
        if epoch != 2:
            metrics.update(val_auc=config["x"], best_val_auc=config["x"])
        tune.report(metrics)


def test_result_without_metric_does_not_end_search(tmp_path: Path, local_ray: None) -> None:
    apply_privacy_defaults()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment("missing-metric", artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id)
    callback = MlflowTrialCallback(uri, experiment_id, parent.info.run_id, lambda config: dict(config), max_epochs=3)

    tuner = tune.Tuner(
        _report_without_metric,
        param_space={"x": tune.uniform(0.0, 1.0)},
        tune_config=tune.TuneConfig(
            search_alg=TolerantOptunaSearch(metric="best_val_auc", mode="max", seed=0),
            scheduler=ASHAScheduler(metric="val_auc", mode="max", max_t=3, grace_period=1),
            num_samples=4,
        ),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "runs"), callbacks=[callback], verbose=0),
    )
    results = tuner.fit()

    runs = client.search_runs([experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(results) == 4
    assert results.num_errors == 0
    assert len(runs) == 4
    assert all(run.info.status == "FINISHED" for run in runs)


def _callback_store(tmp_path: Path, experiment: str) -> tuple[str, MlflowClient, str, str]:
    """Create a SQLite store with an experiment and a parent run; return the URI, client, experiment id and parent run id."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment_id = client.create_experiment(experiment, artifact_location=str(tmp_path / "artifacts"))
    parent = client.create_run(experiment_id)
    return uri, client, experiment_id, parent.info.run_id


def _fake_trial(trial_id: str, last_result: dict) -> SimpleNamespace:
    return SimpleNamespace(trial_id=trial_id, config={"fail": False}, last_result=last_result, checkpoint=object())


def test_trial_completion_does_not_wait_for_artifact_logging(tmp_path: Path) -> None:
    """Tune's loop goes on while the writer thread still logs a finished trial's model and plots."""
    uri, client, experiment_id, parent_id = _callback_store(tmp_path, "writer-thread")
    writer_started, release = threading.Event(), threading.Event()

    def slow_writer(checkpoint: object, folder: Path) -> None:
        writer_started.set()
        assert release.wait(timeout=60), "the test never released the artifact writer"
        (folder / "best_model.pt").write_bytes(b"weights")

    callback = MlflowTrialCallback(uri, experiment_id, parent_id, _training_values, max_epochs=1, artifact_writer=slow_writer)
    trial = _fake_trial("abc_00000", {"epoch": 1, "best_val_auc": 0.7})
    callback.on_trial_start(0, [trial], trial)
    callback.on_trial_result(0, [trial], trial, {"epoch": 1, "val_auc": 0.7, "best_val_auc": 0.7, "timestamp": 1})
    callback.on_trial_complete(0, [trial], trial)

    assert writer_started.wait(timeout=60)
    assert callback.pending >= 1
    state = pickle.loads(pickle.dumps(callback))
    assert [write.kind for write in state._pending][-1] == "complete"

    release.set()
    callback.on_experiment_end([trial])

    assert callback.pending == 0
    run = client.get_run(callback.run_ids["abc_00000"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["val_auc"] == pytest.approx(0.7)
    assert [item.path for item in client.list_artifacts(run.info.run_id, "best")] == ["best/best_model.pt"]


def test_writer_thread_ends_with_the_experiment(tmp_path: Path) -> None:
    uri, client, experiment_id, parent_id = _callback_store(tmp_path, "writer-end")
    callback = MlflowTrialCallback(uri, experiment_id, parent_id, _training_values, max_epochs=1)
    trial = _fake_trial("abc_00001", {"epoch": 1})

    callback.on_trial_start(0, [trial], trial)
    writer = callback._writer
    callback.on_experiment_end([trial])

    writer.join(timeout=60)
    assert not writer.is_alive()
    assert callback.run_ids.keys() == {"abc_00001"}


def test_halted_writer_leaves_later_writes_queued(tmp_path: Path) -> None:
    """An interrupted search halts the writer: the write in progress completes, later ones stay queued."""
    uri, client, experiment_id, parent_id = _callback_store(tmp_path, "writer-halt")
    writer_started, release = threading.Event(), threading.Event()

    def slow_writer(checkpoint: object, folder: Path) -> None:
        writer_started.set()
        assert release.wait(timeout=60), "the test never released the artifact writer"

    callback = MlflowTrialCallback(uri, experiment_id, parent_id, _training_values, max_epochs=1, artifact_writer=slow_writer)
    first, second = _fake_trial("abc_00002", {"epoch": 1}), _fake_trial("abc_00003", {"epoch": 1})
    callback.on_trial_start(0, [first], first)
    callback.on_trial_complete(0, [first], first)
    assert writer_started.wait(timeout=60)
    callback.on_trial_start(0, [first, second], second)

    left: list[int] = []
    halting = threading.Thread(target=lambda: left.append(callback.halt(60)))
    halting.start()
    for _ in range(6000):
        if callback._halted:
            break
        time.sleep(0.01)
    release.set()
    halting.join(timeout=60)

    assert left == [1]
    assert client.get_run(callback.run_ids["abc_00002"]).info.status == "FINISHED"
    assert "abc_00003" not in callback.run_ids
