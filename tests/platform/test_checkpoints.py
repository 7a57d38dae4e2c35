"""CheckpointPruner: a checkpoint is deleted only when no saved experiment snapshot can name it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from aeplat.platform.env import apply_privacy_defaults

apply_privacy_defaults()

from ray.tune import Checkpoint  # noqa: E402

from aeplat.platform.checkpoints import CheckpointPruner  # noqa: E402


def _checkpoint(folder: Path, index: int) -> Checkpoint:
    path = folder / f"checkpoint_{index:06d}"
    path.mkdir(parents=True)
    (path / "trainer.pt").write_bytes(b"state")
    return Checkpoint.from_directory(str(path))


def _save(pruner: CheckpointPruner, trial_id: str, checkpoint: Checkpoint) -> None:
    pruner.on_checkpoint(iteration=0, trials=[], trial=SimpleNamespace(trial_id=trial_id), checkpoint=checkpoint)


def _existing(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


def test_pruner_keeps_what_snapshots_name(tmp_path: Path) -> None:
    pruner = CheckpointPruner("search")
    checkpoints = [_checkpoint(tmp_path, index) for index in range(4)]

    _save(pruner, "a", checkpoints[0])
    _save(pruner, "a", checkpoints[1])
    pruner.get_state()  # first snapshot names checkpoint 1
    _save(pruner, "a", checkpoints[2])
    _save(pruner, "a", checkpoints[3])

    assert _existing(tmp_path) == ["checkpoint_000000", "checkpoint_000001", "checkpoint_000002", "checkpoint_000003"]

    pruner.get_state()  # the first snapshot is complete, so only what precedes checkpoint 1 goes

    assert _existing(tmp_path) == ["checkpoint_000001", "checkpoint_000002", "checkpoint_000003"]

    pruner.prune_to_latest()

    assert _existing(tmp_path) == ["checkpoint_000003"]


def test_pruner_state_round_trip(tmp_path: Path) -> None:
    pruner = CheckpointPruner("search")
    first, second = _checkpoint(tmp_path / "a", 0), _checkpoint(tmp_path / "a", 1)
    _save(pruner, "a", first)
    state = pruner.get_state()

    restored = CheckpointPruner("search")
    restored.set_state(state)
    _save(restored, "a", second)
    restored.get_state()

    assert _existing(tmp_path / "a") == ["checkpoint_000000", "checkpoint_000001"]

    restored.get_state()

    assert _existing(tmp_path / "a") == ["checkpoint_000001"]


def test_pruner_ignores_missing_folders(tmp_path: Path) -> None:
    pruner = CheckpointPruner("search")
    first, second = _checkpoint(tmp_path, 0), _checkpoint(tmp_path, 1)
    _save(pruner, "a", first)
    _save(pruner, "a", second)
    (Path(first.path) / "trainer.pt").unlink()
    Path(first.path).rmdir()

    pruner.prune_to_latest()

    assert _existing(tmp_path) == ["checkpoint_000001"]
