"""Trial checkpoints: when a trial saves them, what they contain, and cleanup of their staging folders."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

pytest.importorskip("ray")

from aeplat.platform.trainable import CHECKPOINT_STAGING_PREFIX, remove_orphaned_staging_folders  # noqa: E402


def _ended_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_folders_of_ended_processes_are_removed(tmp_path: Path) -> None:
    ended = tmp_path / f"{CHECKPOINT_STAGING_PREFIX}{_ended_pid()}-abc123"
    running = tmp_path / f"{CHECKPOINT_STAGING_PREFIX}{os.getpid()}-def456"
    unrelated = tmp_path / "other-folder"
    for folder in (ended, running, unrelated):
        folder.mkdir()
        (folder / "trainer.pt").write_bytes(b"state")

    removed = remove_orphaned_staging_folders(tmp_path)

    assert removed == 1
    assert not ended.exists()
    assert running.exists()
    assert unrelated.exists()


def test_stop_epochs_match_asha_rungs() -> None:
    from ray.tune.schedulers import ASHAScheduler

    from aeplat.platform.trainable import scheduler_stop_epochs

    for epochs, grace_period, reduction_factor in [(15, 3, 3), (30, 5, 3), (27, 3, 3), (10, 10, 3), (100, 1, 4), (3, 1, 3), (30, 5, 2), (7, 2, 3)]:
        scheduler = ASHAScheduler(
            metric="val_auc", mode="max", time_attr="training_iteration", max_t=epochs, grace_period=grace_period, reduction_factor=reduction_factor
        )
        # Private in Ray 2.60: the (rung, recorded results) pairs of the only bracket.
        rungs = {math.ceil(rung) for rung, _ in scheduler._brackets[0]._rungs}

        assert scheduler_stop_epochs(epochs, grace_period, reduction_factor) == tuple(sorted(rungs | {epochs}))


def test_checkpoint_schedule() -> None:
    from aeplat.platform.trainable import CheckpointSchedule

    schedule = CheckpointSchedule(last_epoch=10, stop_epochs=(2, 6, 10), interval_s=30.0)

    assert schedule.due(10, best_changed=False, seconds_since_previous=0.0)
    assert schedule.due(6, best_changed=True, seconds_since_previous=0.0)
    assert not schedule.due(6, best_changed=False, seconds_since_previous=0.0)
    assert not schedule.due(5, best_changed=True, seconds_since_previous=29.0)
    assert schedule.due(5, best_changed=False, seconds_since_previous=30.0)
    assert CheckpointSchedule(last_epoch=10, interval_s=0.0).due(3, best_changed=False, seconds_since_previous=0.0)


def _tiny_trial_data(epochs: int, schedule: Any, repeats: int = 1) -> Any:
    from aeplat.platform.trainable import TrialData
    from aeplat.search_spaces import load_search_space

    generator = np.random.default_rng(0)
    return TrialData(
        train_images=generator.random((16, 1, 32, 32), dtype=np.float32),
        validation_images=generator.random((12, 1, 32, 32), dtype=np.float32),
        validation_labels=np.array([0, 1] * 6),
        image_size=32,
        epochs=epochs,
        seed=0,
        cpus_per_trial=1,
        gpus_per_trial=0,
        device="cpu",
        space=load_search_space("brats"),
        repeats=repeats,
        checkpoints=schedule,
    )


class _RecordingTune:
    """Stand-in for ray.tune in aeplat.platform.trainable that keeps every report and a copy of every checkpoint."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.reports: list[dict[str, Any]] = []
        self.checkpoints: dict[int, Path] = {}
        self.Checkpoint = __import__("ray").tune.Checkpoint

    def get_checkpoint(self) -> None:
        return None

    def report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint is not None:
            copy = self.folder / f"epoch-{metrics['epoch']}"
            shutil.copytree(checkpoint.path, copy)
            self.checkpoints[metrics["epoch"]] = copy


@pytest.mark.parametrize("repeats", [1, 2])
def test_trial_checkpoint_schedule_and_weights(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, repeats: int) -> None:
    from ray import tune

    from aeplat.platform import trainable
    from aeplat.platform.trainable import BEST_MODEL_FILE, CheckpointSchedule, load_best_weights, run_trial

    recording = _RecordingTune(tmp_path)
    monkeypatch.setattr(trainable, "tune", recording)
    schedule = CheckpointSchedule(last_epoch=6, stop_epochs=(2, 6), interval_s=3600.0)
    config = {"model": "ae", "latent_dim": 4, "entropy_weight": 0.0, "lr": 1e-3}

    run_trial(config, _tiny_trial_data(6, schedule, repeats=repeats))

    assert [report["epoch"] for report in recording.reports] == [1, 2, 3, 4, 5, 6]
    # Epoch 1 always improves on no result, and stop epoch 2 saves it because the interval never passes.
    assert sorted(recording.checkpoints) == [2, 6]
    final = recording.reports[-1]
    weights, summary = load_best_weights(tune.Checkpoint.from_directory(recording.checkpoints[6]))
    assert summary["best_epoch"] == final["best_epoch"]
    assert summary["best_val_auc"] == pytest.approx(final["best_val_auc"])
    # Best weights are stored once: as best_model.pt only when they differ from a trainer state.
    assert (recording.checkpoints[6] / BEST_MODEL_FILE).exists() == (final["best_epoch"] != 6)
    if final["best_epoch"] == 6:
        # The seeds are 0, 1, ..., so the state index of the best seed is the seed itself.
        assert summary[trainable.BEST_WEIGHTS_STATE_KEY] == final["best_seed"]
    assert all(isinstance(value, torch.Tensor) for value in weights.values())


def test_best_weights_from_trainer_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ray import tune

    from aeplat.platform import trainable
    from aeplat.platform.trainable import BEST_MODEL_FILE, CheckpointSchedule, load_best_weights, run_trial

    recording = _RecordingTune(tmp_path)
    monkeypatch.setattr(trainable, "tune", recording)

    run_trial({"model": "ae", "latent_dim": 4, "entropy_weight": 0.0, "lr": 1e-3}, _tiny_trial_data(1, CheckpointSchedule(last_epoch=1)))

    folder = recording.checkpoints[1]
    assert not (folder / BEST_MODEL_FILE).exists()
    weights, summary = load_best_weights(tune.Checkpoint.from_directory(folder))
    states = torch.load(folder / trainable.TRAINER_STATE_FILE, weights_only=True)
    assert summary["best_epoch"] == 1
    assert all(torch.equal(weights[key], states[0]["model"][key]) for key in states[0]["model"])


@pytest.mark.parametrize(("device", "fraction", "expected"), [("cuda", 0.25, [(0.25, 3)]), ("cuda:1", 0.5, [(0.5, 1)]), ("cuda", 1.0, []), ("cpu", 0.25, [])])
def test_shared_gpu_memory_cap(
    monkeypatch: pytest.MonkeyPatch, device: str, fraction: float, expected: list[tuple[float, int]]
) -> None:
    from aeplat.platform.trainable import limit_gpu_memory

    calls: list[tuple[float, int]] = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", lambda share, index: calls.append((share, index)))

    limit_gpu_memory(torch.device(device), fraction)

    assert calls == expected


def test_freed_memory_trim_on_glibc() -> None:
    import platform

    from aeplat.platform.trainable import release_freed_memory

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is a glibc function")

    assert release_freed_memory() is True
