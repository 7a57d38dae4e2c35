"""MLflow tracking: one parent run per search, one nested child run per trial.

Only the driver writes to MLflow, so every trial's run lives in the tracking store the user
chose even when trials run on other nodes.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
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


# Seconds between two attempts to reach an unreachable tracking store.
RETRY_INTERVAL_S = 10.0

# Parts of the message of an MLflow error that mean the tracking store was unreachable, as
# opposed to a request that it rejected.
_UNREACHABLE_MARKERS = (
    "Max retries exceeded",
    "Connection refused",
    "Connection aborted",
    "Failed to establish",
    "Read timed out",
    "RemoteDisconnected",
    "database is locked",
)

# The artifact writer of each search, by parent run id. A writer may hold the validation
# images, so it is not saved with Tune's experiment state; a restored callback finds it here.
_ARTIFACT_WRITERS: dict[str, Callable[[Any, Path], Any]] = {}

# The callback that Tune uses in each search, by parent run id. A restored search runs a copy of
# the callback that Tune saved, and the driver drains the queue of that copy.
_ACTIVE_CALLBACKS: dict[str, MlflowTrialCallback] = {}


def set_artifact_writer(parent_run_id: str, writer: Callable[[Any, Path], Any]) -> None:
    """Make ``writer`` the artifact writer of every MlflowTrialCallback of this search, restored ones too."""
    _ARTIFACT_WRITERS[parent_run_id] = writer


def active_callback(parent_run_id: str) -> MlflowTrialCallback | None:
    """Return the MlflowTrialCallback that Tune set up for this search, or None before the search starts."""
    return _ACTIVE_CALLBACKS.get(parent_run_id)


def is_unreachable(error: BaseException) -> bool:
    """Return True if an MLflow call failed because the tracking store was unreachable."""
    if isinstance(error, (ConnectionError, TimeoutError)):
        return True
    return any(marker in str(error) for marker in _UNREACHABLE_MARKERS)


@dataclass
class _Write:
    """One write of a trial's run, kept until the tracking store accepts it."""

    kind: str
    trial_id: str
    payload: dict[str, Any] = field(default_factory=dict)


class MlflowTrialCallback(Callback):
    """Tune callback that mirrors every trial into a child run of the search's parent run.

    Parameters are the trial's training values. Metrics are logged per epoch, with the epoch as
    step. A trial that raises ends as FAILED, with the reason in the `aeplat.failure_reason` tag.

    When a trial completes, finished or stopped early by the scheduler, ``artifact_writer``
    (if given, else the one of ``set_artifact_writer``) receives the trial's latest
    checkpoint and an empty folder, and everything it writes there is logged under the child
    run's ``best/`` artifact folder. A writer that raises is logged as a WARNING and tagged
    ``aeplat.artifact_failure``, and the search goes on.

    Writes wait in a queue in the order they were made, and a background thread of the driver
    applies them, so Ray Tune's control loop does not wait for MLflow: the next trial starts
    while the previous one's model and plots are still being logged. When the tracking store
    does not respond, the queue keeps the writes, trials go on training, and the thread retries
    every ``RETRY_INTERVAL_S`` seconds. At the end of the experiment the callback waits until
    the queue is empty or the store is unreachable, and ``drain`` waits longer. The queue is part
    of the state that Tune saves with the experiment, so a resumed search logs what an
    interrupted one could not. A write that the store rejects (an invalid value) is
    logged as a WARNING and dropped, so one bad value cannot stop the search.
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
        self._pending: list[_Write] = []
        self._client: MlflowClient | None = None
        self._unreachable_since: float | None = None
        self._retry_after = 0.0
        self._init_threading()

    def _init_threading(self) -> None:
        # _changed guards _pending and wakes the threads that wait for it; _flushing lets one flush run at a time.
        self._changed = threading.Condition()
        self._flushing = threading.Lock()
        self._writer: threading.Thread | None = None
        self._stopping = False
        self._halted = False

    def __getstate__(self) -> dict[str, Any]:
        # Tune saves its callbacks with the experiment. The writer may hold the validation
        # images, so it is left out, and a restored search finds it by set_artifact_writer.
        # Locks and the thread cannot be saved; __setstate__ makes new ones.
        with self._changed:
            state = self.__dict__.copy()
            state["_pending"] = list(self._pending)
        state.update(_client=None, _artifact_writer=None, _unreachable_since=None, _retry_after=0.0)
        for key in ("_changed", "_flushing", "_writer", "_stopping", "_halted"):
            state.pop(key)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_threading()

    def get_state(self) -> dict[str, Any]:
        """Return the child runs and the queued writes, which Tune saves with the experiment state.

        A write that the thread is applying stays in the queue until the store accepts it, so
        a driver killed meanwhile applies it again after a restart. Every write can be applied
        twice.
        """
        with self._changed:
            pending = [{"kind": write.kind, "trial_id": write.trial_id, "payload": write.payload} for write in self._pending]
            return {"run_ids": dict(self._run_ids), "pending": pending}

    def set_state(self, state: dict[str, Any]) -> None:
        with self._changed:
            self._run_ids = dict(state.get("run_ids", {}))
            self._pending = [_Write(**write) for write in state.get("pending", [])]
        if self._pending:
            logger.info("%d MLflow writes of the interrupted search are queued; logging them now.", len(self._pending))
            self._start_writer()

    def setup(self, **info: Any) -> None:
        _ACTIVE_CALLBACKS[self._parent_run_id] = self

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self._tracking_uri)
        return self._client

    @property
    def run_ids(self) -> dict[str, str]:
        """Child run id of every trial logged so far, by Tune trial id."""
        return dict(self._run_ids)

    @property
    def pending(self) -> int:
        """Number of writes that the tracking store has not accepted yet."""
        with self._changed:
            return len(self._pending)

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        values = self._training_values(trial.config)
        logger.info("Trial %s started: %s", trial.trial_id, _format_values(values))
        self._queue(_Write("start", trial.trial_id, {"values": values}))

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info: Any) -> None:
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        timestamp = int(result.get("timestamp", 0) * 1000)
        metrics = {
            key: float(value)
            for key, value in result.items()
            if _is_trial_metric(key) and isinstance(value, (int, float)) and math.isfinite(value)
        }
        if not metrics:
            logger.warning("Trial %s reported no validation metric at step %d: %s", trial.trial_id, step, sorted(result))
            return
        self._queue(_Write("metrics", trial.trial_id, {"metrics": metrics, "step": step, "timestamp": timestamp}))

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        result = trial.last_result or {}
        epochs = int(result.get("epoch", 0))
        logger.info(
            "Trial %s finished after %d epochs, best validation AUC %.4f.",
            trial.trial_id,
            epochs,
            result.get("best_val_auc", float("nan")),
        )
        payload = {"stopped_early": epochs < self._max_epochs, "checkpoint": trial.checkpoint}
        self._queue(_Write("complete", trial.trial_id, payload))

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        reason = _failure_reason(trial)
        logger.warning("Trial %s failed: %s", trial.trial_id, reason)
        self._queue(_Write("error", trial.trial_id, {"reason": _truncate(reason)}))

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
        # Writes that an unreachable store still refuses are left to drain, on the calling thread.
        self.wait_until_written()
        with self._changed:
            self._stopping = True
            self._changed.notify_all()

    def halt(self, timeout_s: float) -> int:
        """Stop applying writes once the one in progress is done, within timeout_s; return how many are left.

        An interrupted search calls this before it ends its runs, so that no queued write
        reopens or finishes a run afterwards. The writes left stay in the queue, which a
        resumed search restores only as far as Tune's last saved experiment state goes.
        """
        with self._changed:
            self._halted = True
            self._stopping = True
            self._changed.notify_all()
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join(timeout=timeout_s)
        return self.pending

    def wait_until_written(self, timeout_s: float | None = None) -> bool:
        """Wait until the queue is empty or the store is unreachable; return True if the queue is empty."""
        with self._changed:
            self._changed.wait_for(lambda: not self._pending or self._unreachable_since is not None, timeout_s)
            return not self._pending

    def drain(self, timeout_s: float) -> bool:
        """Retry the queued writes until the store accepts them all or timeout_s passes; return True if none is left."""
        deadline = time.monotonic() + timeout_s
        while not self._flush(force=True):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            logger.info(
                "Waiting for the MLflow tracking store to accept %d queued writes (%.0f s left before the search stops).",
                self.pending,
                remaining,
            )
            time.sleep(min(RETRY_INTERVAL_S * 3, remaining))
        return True

    def _queue(self, write: _Write) -> None:
        with self._changed:
            self._pending.append(write)
            self._stopping = False
            self._changed.notify_all()
        self._start_writer()

    def _start_writer(self) -> None:
        if self._halted or (self._writer is not None and self._writer.is_alive()):
            return
        self._writer = threading.Thread(target=self._write_loop, name="aeplat-mlflow-writer", daemon=True)
        self._writer.start()

    def _write_loop(self) -> None:
        """Apply queued writes as they come, and retry after RETRY_INTERVAL_S while the store is unreachable."""
        while True:
            with self._changed:
                self._changed.wait_for(lambda: bool(self._pending) or self._stopping)
                if self._stopping:
                    return
            try:
                if self._flush():
                    continue
            except Exception:  # noqa: BLE001 - a dead writer would silently stop all tracking
                logger.exception("The MLflow writer failed; it retries in %.0f s.", RETRY_INTERVAL_S)
                self._retry_after = time.monotonic() + RETRY_INTERVAL_S
            # Wait for the next retry, or until halt or the end of the experiment wakes the writer.
            with self._changed:
                self._changed.wait_for(lambda: self._stopping, timeout=max(0.1, self._retry_after - time.monotonic()))

    def _flush(self, force: bool = False) -> bool:
        """Apply the queued writes in order; return True if the queue is empty afterwards."""
        with self._flushing:
            if not force and time.monotonic() < self._retry_after:
                return False

            while not self._halted and (write := self._next_write()) is not None:
                try:
                    self._apply(write)
                except Exception as error:  # noqa: BLE001 - the search must outlive any tracking error
                    if is_unreachable(error):
                        self._note_unreachable(error)
                        return False
                    logger.warning("MLflow rejected the %s write of trial %s, so it is skipped: %s", write.kind, write.trial_id, error)
                self._remove_write(write)

            if self._halted:
                return False
            self._note_reachable()
            return True

    def _next_write(self) -> _Write | None:
        with self._changed:
            return self._pending[0] if self._pending else None

    def _remove_write(self, write: _Write) -> None:
        with self._changed:
            if self._pending and self._pending[0] is write:
                self._pending.pop(0)
            self._changed.notify_all()

    def _note_reachable(self) -> None:
        if self._unreachable_since is None:
            return
        logger.warning("The MLflow tracking store is reachable again after %.0f s, and the queued writes are logged.", time.monotonic() - self._unreachable_since)
        with self._changed:
            self._unreachable_since = None
            self._changed.notify_all()

    def _note_unreachable(self, error: BaseException) -> None:
        self._retry_after = time.monotonic() + RETRY_INTERVAL_S
        if self._unreachable_since is not None:
            return
        logger.warning(
            "The MLflow tracking store %s is unreachable (%s). Trials go on, and their writes (%d so far) are queued and retried every %.0f s.",
            self._tracking_uri,
            _unreachable_reason(error),
            self.pending,
            RETRY_INTERVAL_S,
        )
        with self._changed:
            self._unreachable_since = time.monotonic()
            self._changed.notify_all()

    def _apply(self, write: _Write) -> None:
        if write.kind == "start":
            self._start_run(write.trial_id, write.payload["values"])
            return

        run_id = self._run_ids.get(write.trial_id) or self._find_trial_run(write.trial_id)
        if run_id is None:
            logger.warning("Trial %s has no MLflow run, so its %s write is skipped.", write.trial_id, write.kind)
            return
        if write.kind == "metrics":
            payload = write.payload
            metrics = [Metric(key, value, payload["timestamp"], payload["step"]) for key, value in payload["metrics"].items()]
            self.client.log_batch(run_id, metrics=metrics)
        elif write.kind == "complete":
            self.client.set_tag(run_id, STOPPED_EARLY_TAG, str(write.payload["stopped_early"]).lower())
            self._log_trial_artifacts(write.trial_id, write.payload["checkpoint"], run_id)
            self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FINISHED))
        elif write.kind == "error":
            self.client.set_tag(run_id, FAILURE_TAG, write.payload["reason"])
            self.client.set_terminated(run_id, RunStatus.to_string(RunStatus.FAILED))

    def _start_run(self, trial_id: str, values: Mapping[str, Any]) -> None:
        run_id = self._run_ids.get(trial_id) or self._find_trial_run(trial_id)
        if run_id is not None:
            # A resumed search, or a retried write, continues the trial's run instead of starting a second one.
            self.client.update_run(run_id, status="RUNNING")
            logger.debug("Trial %s continues in MLflow run %s.", trial_id, run_id)
        else:
            tags = {
                MLFLOW_PARENT_RUN_ID: self._parent_run_id,
                MLFLOW_RUN_NAME: f"trial-{trial_id}",
                TRIAL_ID_TAG: trial_id,
                SEARCH_RUN_TAG: self._parent_run_id,
            }
            run_id = self.client.create_run(self._experiment_id, tags=tags).info.run_id
        self._run_ids[trial_id] = run_id
        # Logging the same parameter values again is accepted, so a retry after an outage is safe.
        log_params(self.client, run_id, values)

    def _find_trial_run(self, trial_id: str) -> str | None:
        runs = self.client.search_runs(
            [self._experiment_id],
            filter_string=f"tags.`{SEARCH_RUN_TAG}` = '{self._parent_run_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _log_trial_artifacts(self, trial_id: str, checkpoint: Any, run_id: str) -> None:
        writer = self._artifact_writer or _ARTIFACT_WRITERS.get(self._parent_run_id)
        if writer is None:
            return
        if checkpoint is None:
            logger.warning("Trial %s completed without a checkpoint, so it has no model or plots.", trial_id)
            return

        started = time.monotonic()
        with tempfile.TemporaryDirectory(prefix="aeplat-trial-artifacts-") as folder:
            try:
                writer(checkpoint, Path(folder))
            except Exception as error:  # noqa: BLE001 - one trial's plots must not end the search
                reason = f"{type(error).__name__}: {error}"
                logger.warning("Failed to write the model and plots of trial %s: %s", trial_id, reason)
                self.client.set_tag(run_id, ARTIFACT_FAILURE_TAG, _truncate(reason))
                return
            self.client.log_artifacts(run_id, folder, artifact_path=TRIAL_ARTIFACT_PATH)

        logger.debug("Logged the artifacts of trial %s in %.2f s.", trial_id, time.monotonic() - started)


def _unreachable_reason(error: BaseException) -> str:
    """Return the part of an MLflow connection error that names the cause, such as 'Connection refused'."""
    text = str(error)
    for marker in reversed(_UNREACHABLE_MARKERS):
        if marker in text and marker != "Max retries exceeded":
            return marker
    return type(error).__name__


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
