"""Delete old trial checkpoints only once no saved experiment state can refer to them.

Ray Tune's own ``CheckpointConfig(num_to_keep=...)`` deletes a trial's previous checkpoint as
soon as a new one is registered, before the next experiment snapshot is saved. A driver
killed between the two leaves a snapshot that names a deleted checkpoint, and the restored
trial then fails with "Could not recover from checkpoint as it does not exist on storage
anymore". The pruner keeps every checkpoint until two snapshots later instead.
"""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback, Checkpoint
from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

# The pruner of each search, by its Ray Tune experiment name, for the final pruning after fit().
_ACTIVE_PRUNERS: dict[str, CheckpointPruner] = {}


def active_pruner(experiment_name: str) -> CheckpointPruner | None:
    """Return the CheckpointPruner that Tune set up for this experiment, or None."""
    return _ACTIVE_PRUNERS.get(experiment_name)


class CheckpointPruner(Callback):
    """Tune callback that deletes a trial's checkpoints once no saved experiment state refers to them.

    Tune calls ``get_state`` of every callback while it saves an experiment snapshot, so each
    call marks a snapshot. A checkpoint older than the one the previous snapshot refers to is
    named by neither the previous snapshot (complete on storage) nor the one being written,
    and is deleted. Each trial keeps at most three checkpoints while it runs, and one after
    ``prune_to_latest`` at the end of the search.
    """

    def __init__(self, experiment_name: str) -> None:
        self._experiment_name = experiment_name
        self._checkpoints: dict[str, list[Checkpoint]] = {}
        self._snapshot: dict[str, str] = {}

    def setup(self, **info: Any) -> None:
        _ACTIVE_PRUNERS[self._experiment_name] = self

    def on_checkpoint(self, iteration: int, trials: list[Trial], trial: Trial, checkpoint: Checkpoint, **info: Any) -> None:
        self._checkpoints.setdefault(trial.trial_id, []).append(checkpoint)

    def get_state(self) -> dict[str, Any]:
        previous = self._snapshot
        self._snapshot = {trial_id: saved[-1].path for trial_id, saved in self._checkpoints.items() if saved}
        for trial_id, path in previous.items():
            self._delete_older_than(trial_id, path)
        return {"checkpoints": self._checkpoints, "snapshot": self._snapshot}

    def set_state(self, state: dict[str, Any]) -> None:
        self._checkpoints = state.get("checkpoints", {})
        self._snapshot = state.get("snapshot", {})

    def prune_to_latest(self) -> None:
        """Delete every checkpoint but the newest of each trial; call it after the final snapshot."""
        for trial_id, saved in self._checkpoints.items():
            if saved:
                self._delete_older_than(trial_id, saved[-1].path)

    def _delete_older_than(self, trial_id: str, path: str) -> None:
        saved = self._checkpoints.get(trial_id, [])
        paths = [checkpoint.path for checkpoint in saved]
        if path not in paths:
            return

        keep_from = paths.index(path)
        for checkpoint in saved[:keep_from]:
            _delete(checkpoint)
        self._checkpoints[trial_id] = saved[keep_from:]


def _delete(checkpoint: Checkpoint) -> None:
    try:
        checkpoint.filesystem.delete_dir(checkpoint.path)
    except FileNotFoundError:
        return
    except OSError as error:
        logger.warning("Could not delete the old checkpoint %s: %s", checkpoint.path, error)
        return
    logger.debug("Deleted the old checkpoint %s.", checkpoint.path)
