"""MLflow tracking: one parent run per search, one nested child run per trial.

Only the driver writes to MLflow, so every trial's run lives in the tracking store the user
chose even when trials run on other nodes.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Mapping

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from ray.tune import Callback
from ray.tune.experiment import Trial

logger = logging.getLogger(__name__)

TRIAL_ID_TAG = "aeplat.trial_id"
SEARCH_RUN_TAG = "aeplat.search_run_id"
FAILURE_TAG = "aeplat.failure_reason"
STOPPED_EARLY_TAG = "aeplat.stopped_early"
ARTIFACT_FAILURE_TAG = "aeplat.artifact_failure"

# Folder of a child run's artifacts that contains the trial's best model and validation plots.
TRIAL_ARTIFACT_PATH = "best"

# Prefixes of further trial result keys logged every epoch: the models' extra losses
# (train_kl_loss), the spread over seeds (val_auc_std) and per-seed values (seed_3/val_auc).
TRIAL_METRIC_PREFIXES = ("train_", "val_", "seed_")

# Keys of a trial result that are logged as MLflow metrics every epoch.
TRIAL_METRICS = (
    "train_loss",
    "train_reconstruction_loss",
    "train_rate_bits",
    "val_auc",
    "val_ap",
    "val_score_normal",
    "val_score_abnormal",
    "best_val_auc",
)

_MAX_TAG_LENGTH = 5000


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    return client.create_experiment(name)


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    batch = [Param(key, _param_value(value)) for key, value in sorted(params.items())]
    for start in range(0, len(batch), 100):
        client.log_batch(run_id, params=batch[start : start + 100])


def _param_value(value: Any) -> str:
    text = "" if value is None else str(value)
    return text[:6000]


def _truncate(text: str) -> str:
    return text if len(text) <= _MAX_TAG_LENGTH else text[: _MAX_TAG_LENGTH - 3] + "..."


class MlflowTrialCallback(Callback):
    """Tune callback that mirrors every trial into a child run of the search's parent run.

    Parameters are the trial's training values. Metrics are logged per epoch, with the epoch as
    step. A trial that raises ends as FAILED, with the reason in the `aeplat.failure_reason` tag.

    When a trial completes, finished or stopped early by the scheduler, ``artifact_writer``
    (if given) receives the trial's latest checkpoint and an empty folder, and everything it
    writes there is logged under the child run's ``best/`` artifact folder. A writer that
    raises is logged as a WARNING and tagged ``aeplat.artifact_failure``, and the search
    goes on.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment_id: str,
        parent_run_id: str,
        training_values: Any,
        max_epochs: int,
        artifact_writer: Callable[[Any, Path], Any] | None = None,
    ) -> None:
        self._tracking_uri = tracking_uri
        self._experiment_id = experiment_id
        self._parent_run_id = parent_run_id
        self._training_values = training_values
        self._max_epochs = max_epochs
        self._artifact_writer = artifact_writer
        self._run_ids: dict[str, str] = {}
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves its callbacks with the experiment state. The writer may hold the
        # validation images, so it is left out, and a restored search passes a new one.
        state = self.__dict__.copy()
        state["_client"] = None
        state["_artifact_writer"] = None
        return state

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self._tracking_uri)
        return self._client

    @property
    def run_ids(self) -> dict[str, str]:
        """Child run id of every trial seen so far, by Tune trial id."""
        return dict(self._run_ids)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_id = self._run_ids.get(trial.trial_id) or self._find_trial_run(trial.trial_id)
        if run_id is not None:
            # A resumed search continues the trial's run instead of starting a second one.
            self._run_ids[trial.trial_id] = run_id
            self.client.update_run(run_id, status="RUNNING")
            logger.info("Trial %s resumed in MLflow run %s.", trial.trial_id, run_id)
            return

        tags = {
            MLFLOW_PARENT_RUN_ID: self._parent_run_id,
            MLFLOW_RUN_NAME: f"trial-{trial.trial_id}",
            TRIAL_ID_TAG: trial.trial_id,
            SEARCH_RUN_TAG: self._parent_run_id,
        }
        run = self.client.create_run(self._experiment_id, tags=tags)
        self._run_ids[trial.trial_id] = run.info.run_id
        values = self._training_values(trial.config)
        log_params(self.client, run.info.run_id, values)
        logger.info("Trial %s started: %s", trial.trial_id, _format_values(values))

    def _find_trial_run(self, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self._experiment_id],
            filter_string=f"tags.`{SEARCH_RUN_TAG}` = '{self._parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        run_id = self._run_ids.get(trial.trial_id)
        if run_id is None:
            return

        step = int(result.get("epoch", result.get("training_iteration", 0)))
        timestamp = int(result.get("timestamp", 0) * 1000)
        metrics = [
            Metric(key, float(value), timestamp, step)
            for key, value in result.items()
            if _is_trial_metric(key) and isinstance(value, (int, float)) and math.isfinite(value)
        ]
        if metrics:
            self.client.log_batch(run_id, metrics=metrics)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_id = self._run_ids.get(trial.trial_id)
        if run_id is None:
            return

        epochs = int(trial.last_result.get("epoch", 0))
        self.client.set_tag(run_id, STOPPED_EARLY_TAG, str(epochs < self._max_epochs).lower())
        self._log_trial_artifacts(trial, run_id)
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        logger.info(
            "Trial %s finished after %d epochs, best validation AUC %.4f.",
            trial.trial_id,
            epochs,
            trial.last_result.get("best_val_auc", float("nan")),
        )

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        run_id = self._run_ids.get(trial.trial_id)
        reason = _failure_reason(trial)
        logger.warning("Trial %s failed: %s", trial.trial_id, reason)
        if run_id is None:
            return

        self.client.set_tag(run_id, FAILURE_TAG, _truncate(reason))
        self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))


    def _log_trial_artifacts(self, trial: Trial, run_id: str) -> None:
        if self._artifact_writer is None:
            return

        checkpoint = trial.checkpoint
        if checkpoint is None:
            logger.warning("Trial %s completed without a checkpoint, so it has no model or plots.", trial.trial_id)
            return

        started = time.monotonic()
        try:
            with tempfile.TemporaryDirectory(prefix="aeplat-trial-artifacts-") as folder:
                self._artifact_writer(checkpoint, Path(folder))
                self.client.log_artifacts(run_id, folder, artifact_path=TRIAL_ARTIFACT_PATH)
        except Exception as error:  # noqa: BLE001 - one trial's plots must not end the search
            reason = f"{type(error).__name__}: {error}"
            logger.warning("Failed to log the model and plots of trial %s: %s", trial.trial_id, reason)
            self.client.set_tag(run_id, ARTIFACT_FAILURE_TAG, _truncate(reason))
            return

        logger.debug("Logged the artifacts of trial %s in %.2f s.", trial.trial_id, time.monotonic() - started)


def _is_trial_metric(key: str) -> bool:
    return key in TRIAL_METRICS or key.startswith(TRIAL_METRIC_PREFIXES)


def _format_values(values: Mapping[str, Any]) -> str:
    parts = []
    for key, value in sorted(values.items()):
        parts.append(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)


def _failure_reason(trial: Trial) -> str:
    """Return the last line of the trial's traceback, which names the exception and its message.

    Tune writes the traceback to the trial's local folder before it calls on_trial_error and
    copies it to the experiment storage only later, so the local file is read first.
    """
    text = None
    try:
        if trial.error_file and Path(trial.error_file).is_file():
            text = Path(trial.error_file).read_text(encoding="utf-8", errors="replace")
        else:
            text = trial.get_error()
    except OSError as error:
        return f"error file unreadable: {error}"

    if not text:
        return "unknown error (Ray stored no traceback)"
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1] if lines else "unknown error"
