"""The part of a search that needs Ray and MLflow. Imported only after the environment is set."""

from __future__ import annotations

import functools
import json
import logging
import math
import socket
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import optuna
import pandas as pd
import ray
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from aeplat.data import DatasetSplits
from aeplat.data.adapters import BadFile
from aeplat.platform import env
from aeplat.platform.checkpoints import CheckpointPruner, active_pruner
from aeplat.platform.progress import SearchProgress, best_trials_table
from aeplat.platform.registry import find_search_version, log_scoring_model, promote_if_better, register_model, serving_config
from aeplat.platform.search import (
    OPTIMIZED_METRIC,
    SCHEDULER_METRIC,
    SearchError,
    SearchOutcome,
    library_versions,
)
from aeplat.platform.settings import SearchSettings
from aeplat.platform.signals import raise_keyboard_interrupt_on_sigterm
from aeplat.platform.storage import is_s3_uri, parse_s3_uri, resolve_endpoint_url
from aeplat.platform.tracking import (
    SEARCH_RUN_TAG,
    TRIAL_ID_TAG,
    MlflowTrialCallback,
    active_callback,
    get_or_create_experiment,
    is_unreachable,
    log_params,
    set_artifact_writer,
)
from aeplat.platform.trainable import (
    CheckpointSchedule,
    TrialData,
    load_best_weights,
    remove_orphaned_staging_folders,
    run_trial,
    scheduler_stop_epochs,
    training_config,
    write_trial_artifacts,
)
from aeplat.search_spaces import SearchSpace
from aeplat.trainers import ErrorMapModel, Trainer, UndefinedMetricError, image_metrics, pixel_metrics, resolve_device
from aeplat.trainers.plots import AUC_BY_LATENT_SIZE_FILE, plot_auc_by_latent_size

logger = logging.getLogger(__name__)

# Ray, MLflow and Optuna configure their own loggers when imported; the search keeps them at
# WARNING unless aeplat itself logs at DEBUG (aeplat -v).
_LIBRARY_LOGGERS = ("ray", "ray.tune", "ray.train", "mlflow", "optuna", "alembic")


def _quiet_library_loggers() -> None:
    if logging.getLogger("aeplat").getEffectiveLevel() <= logging.DEBUG:
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)

SEARCH_KEY_TAG = "aeplat.search_key"

# Seconds the driver waits at the end of a search for an unreachable tracking store to accept
# the trials' queued writes before it stops with a message.
TRACKING_WAIT_S = 600.0

_TRIAL_COLUMNS = (
    "trial_id",
    "status",
    "epoch",
    "best_val_auc",
    "val_auc",
    "val_ap",
    "train_loss",
    "error",
)


# Maximum proposals per trial that repeat an earlier trial's configuration. After that, the search
# ends if every configuration of a finite space has been tried, and otherwise the trial trains the
# repeated configuration.
MAX_REPEATED_PROPOSALS = 25


class TolerantOptunaSearch(OptunaSearch):
    """OptunaSearch that avoids training a configuration twice and skips results without the metric.

    Every trial trains with the same seed, so a configuration trained again gives the same
    result. TPE proposes such repeats often in a small discrete space. When a proposal
    repeats a finished trial, the study receives that trial's value for it at once. When it
    repeats a trial that is still running or that failed, the proposal is marked failed, which
    the sampler ignores. Either way the sampler proposes again, up to MAX_REPEATED_PROPOSALS
    times. A failure that may not happen again, such as a lost node, is for Ray Tune's
    --max-failures retries. When every configuration of a finite space (no float range) is
    finished, failed or running, the searcher reports that it is finished, and the search ends
    with fewer trials than requested.

    Ray Tune 2.60's OptunaSearch raises KeyError on a result without the optimized metric,
    which stops every trial. This searcher skips such a result. At completion a trial whose
    last result lacks the metric is recorded as pruned.
    """

    def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
        config = super().suggest(trial_id)
        for _ in range(MAX_REPEATED_PROPOSALS):
            if config is None or not self._settle_repeat(trial_id):
                return config
            config = super().suggest(trial_id)

        size = self._space.size() if isinstance(self._space, SearchSpace) else None
        if size is not None and _tried_configurations(self._ot_study) >= size:
            self._settle_repeat(trial_id)
            logger.info(
                "Every configuration of the search space (%d in all) has been tried, so the search starts no more trials. "
                "Widen the space in a --search-space file to search further.",
                size,
            )
            return Searcher.FINISHED

        logger.info("The sampler proposed only configurations that earlier trials have, so trial %s repeats one.", trial_id)
        return config

    def _settle_repeat(self, trial_id: str) -> bool:
        """If trial_id's proposal repeats an earlier trial, close that proposal in the study and return True."""
        proposal = self._ot_trials[trial_id]
        earlier = _earlier_trial_with_params(self._ot_study, proposal.number, proposal.params)
        if earlier is None:
            return False

        del self._ot_trials[trial_id]
        # NOTE: a trial that ASHA stopped early is COMPLETE too, so its configuration never gets
        # a second chance to train further, even when its early AUC does not predict its final one.
        if earlier.state == optuna.trial.TrialState.COMPLETE:
            self._ot_study.tell(proposal, earlier.value)
        else:
            self._ot_study.tell(proposal, state=optuna.trial.TrialState.FAIL)
        logger.debug("Proposal %s repeats Optuna trial %d (%s), so the sampler proposes again.", proposal.params, earlier.number, earlier.state.name)
        return True

    def on_trial_result(self, trial_id: str, result: dict[str, Any]) -> None:
        if isinstance(self.metric, str) and self.metric not in result:
            logger.warning("Trial %s reported no %s; the sampler skips this result.", trial_id, self.metric)
            return
        super().on_trial_result(trial_id, result)


# Optuna states of a trial whose configuration counts as tried. COMPLETE comes first, so a
# repeat gets the value of a finished trial whenever one exists.
_TRIED_STATES = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.FAIL)


def _tried_configurations(study: optuna.Study) -> int:
    """Return the number of distinct parameter sets among the study's finished, running and failed trials."""
    return len({tuple(sorted(trial.params.items())) for trial in study.get_trials(deepcopy=False, states=_TRIED_STATES)})


def _earlier_trial_with_params(study: optuna.Study, number: int, params: dict[str, Any]) -> optuna.trial.FrozenTrial | None:
    """Return a finished, running or failed trial of the study, other than number, with exactly these parameters."""
    for state in _TRIED_STATES:
        for trial in study.get_trials(deepcopy=False, states=(state,)):
            if trial.number != number and trial.params == params:
                return trial
    return None


def run(
    settings: SearchSettings,
    space: SearchSpace,
    splits: DatasetSplits,
    cache_key: str,
    tracking_uri: str,
    console: Any = None,
    skipped_files: Sequence[BadFile] = (),
) -> SearchOutcome:
    """Run the trials of a search inside one MLflow parent run and register the best model.

    skipped_files (from --on-bad-file skip) are logged to the parent run as skipped_files.csv.
    """
    started_ray = _start_ray(settings)
    try:
        _check_multi_node(settings, tracking_uri)
        return _run_search_runs(settings, space, splits, cache_key, tracking_uri, console, skipped_files)
    finally:
        if started_ray:
            ray.shutdown()
            # The embedded Ray's trial processes ran here, and the last ones may have ended inside a report.
            remove_orphaned_staging_folders()


def _run_search_runs(
    settings: SearchSettings,
    space: SearchSpace,
    splits: DatasetSplits,
    cache_key: str,
    tracking_uri: str,
    console: Any,
    skipped_files: Sequence[BadFile],
) -> SearchOutcome:
    mlflow.set_tracking_uri(tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment_id = get_or_create_experiment(client, settings.experiment_name)
    search_key = settings.search_key(space.describe())
    parent_id = _resumable_search(client, experiment_id, search_key, settings)
    resuming = parent_id is not None
    if resuming:
        client.update_run(parent_id, status="RUNNING")
        _clear_failure_reason(client, parent_id)
        logger.info("Resuming search run %s in experiment %r (%s).", parent_id, settings.experiment_name, tracking_uri)
    else:
        parent = client.create_run(
            experiment_id,
            run_name=f"search-{time.strftime('%Y%m%d-%H%M%S')}",
            tags={
                "aeplat.kind": "search",
                SEARCH_KEY_TAG: search_key,
                "dataset": settings.dataset,
                "modality": settings.model_modality,
            },
        )
        parent_id = parent.info.run_id
        logger.info("MLflow parent run %s in experiment %r (%s).", parent_id, settings.experiment_name, tracking_uri)
    outcome = SearchOutcome(parent_run_id=parent_id, experiment_id=experiment_id, tracking_uri=tracking_uri, trials=[])

    try:
        if not resuming:
            _log_search_inputs(client, parent_id, settings, space, splits, cache_key, skipped_files)
        results = _run_trials(settings, space, splits, tracking_uri, experiment_id, parent_id, console, resuming)
        _delete_forgotten_child_runs(client, experiment_id, parent_id, results)
        outcome.trials = _trial_rows(results, space, settings.epochs)
        _log_trial_table(client, parent_id, outcome.trials)
        _finish_with_best_trial(client, settings, space, splits, results, outcome)
    except BaseException as error:
        interrupted = isinstance(error, (KeyboardInterrupt, SystemExit, TrackingUnavailableError))
        status = "KILLED" if interrupted else "FAILED"
        _stop_trial_writes(parent_id)
        _record_failure(client, experiment_id, parent_id, status, error)
        raise

    client.set_terminated(parent_id, RunStatus.to_string(RunStatus.FINISHED))
    if console is not None:
        console.print(best_trials_table(outcome.trials))
    return outcome


def _resumable_search(client: MlflowClient, experiment_id: str, search_key: str, settings: SearchSettings) -> str | None:
    """Return the parent run of the search to continue, or None to start a new search.

    The candidate is the newest search run with the same key. It is continued when it was
    interrupted (RUNNING after a killed driver, KILLED after Ctrl-C or SIGTERM) and Ray Tune's
    state of it is found under --storage. --resume also continues a FAILED search and makes
    missing state an error; --no-resume always starts a new search.
    """
    if settings.resume is False:
        return None

    # --resume looks past newer finished searches for the newest unfinished one, so a search
    # that was left behind by a later --no-resume or a different --storage can still continue.
    status_filter = " and attributes.status != 'FINISHED'" if settings.resume else ""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SEARCH_KEY_TAG}` = '{search_key}'{status_filter}",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        if settings.resume:
            logger.info("No unfinished search with these settings to resume; starting a new one.")
        return None

    run = runs[0]
    resumable = {"RUNNING", "KILLED", "FAILED"} if settings.resume else {"RUNNING", "KILLED"}
    if run.info.status not in resumable:
        logger.info(
            "The newest search with these settings (%s) ended %s; starting a new one.%s",
            run.info.run_id,
            run.info.status,
            " Pass --resume to continue it instead." if run.info.status == "FAILED" else "",
        )
        return None

    path, filesystem = _tune_state_location(settings, run.info.run_id)
    if tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        return run.info.run_id
    if settings.resume:
        raise SearchError(
            f"Search run {run.info.run_id} was interrupted, but Ray Tune's state of it is not at {path}. "
            "Pass the --storage of that search, or --no-resume to start a new one."
        )
    logger.warning(
        "Search run %s with these settings was interrupted, but Ray Tune's state of it is not at %s; starting a new search. "
        "Pass its --storage to continue it instead.",
        run.info.run_id,
        path,
    )
    return None


def _experiment_name(settings: SearchSettings, parent_id: str) -> str:
    """Return the name of the search's Ray Tune experiment, its folder under --storage."""
    return f"{settings.registered_model_name}-{parent_id[:8]}"


def _tune_state_location(settings: SearchSettings, parent_id: str) -> tuple[str, Any]:
    """Return where Ray Tune keeps the search's experiment state, and the pyarrow filesystem to read it (or None)."""
    storage = _storage_arguments(settings)
    return f"{storage['storage_path']}/{_experiment_name(settings, parent_id)}", storage.get("storage_filesystem")


def _clear_failure_reason(client: MlflowClient, run_id: str) -> None:
    """Delete the failure reason that an interrupted run recorded, because the run continues."""
    if "aeplat.failure_reason" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "aeplat.failure_reason")


# Seconds an ending search gives the MLflow writer to log what finished trials queued.
STOP_WRITES_WAIT_S = 30.0


def _stop_trial_writes(parent_id: str) -> None:
    """Let the MLflow writer log what is queued, briefly, and then stop it before the runs are ended.

    Otherwise a write still queued could reopen or finish a child run after the search has
    marked it KILLED.
    """
    callback = active_callback(parent_id)
    if callback is None:
        return

    callback.wait_until_written(STOP_WRITES_WAIT_S)
    left = callback.halt(STOP_WRITES_WAIT_S)
    if left:
        logger.info("%d MLflow writes of the trials were not logged before the search stopped.", left)


def _record_failure(client: MlflowClient, experiment_id: str, parent_id: str, status: str, error: BaseException) -> None:
    """End the search's runs as status, with the reason on the parent; never hide the original error.

    The parent run comes first, because it decides whether the same command continues the
    search. Each write is retried a few times, because an interrupted write can leave a
    SQLite store locked for a moment.
    """
    reason = f"{type(error).__name__}: {error}"[:5000]
    steps = (
        lambda: client.set_terminated(parent_id, status),
        lambda: client.set_tag(parent_id, "aeplat.failure_reason", reason),
        lambda: _end_open_child_runs(client, experiment_id, parent_id, status),
    )
    for step in steps:
        if not _write_with_retries(step):
            logger.warning(
                "The MLflow tracking store is unreachable, so search run %s may stay RUNNING. Run the same command again to continue it.",
                parent_id,
            )
            return


def _write_with_retries(write: Any, attempts: int = 3, delay_s: float = 2.0) -> bool:
    """Run an MLflow write; return False if the store stayed unreachable for every attempt. Other errors propagate."""
    for attempt in range(attempts):
        try:
            write()
            return True
        except Exception as error:  # noqa: BLE001 - only an unreachable store is retried
            if not is_unreachable(error):
                raise
            if attempt < attempts - 1:
                time.sleep(delay_s)
    return False


def _delete_forgotten_child_runs(client: MlflowClient, experiment_id: str, parent_id: str, results: tune.ResultGrid) -> None:
    """Delete the child runs of trials that the finished search does not have.

    Ray Tune saves its experiment state every few seconds. A trial that started after the last
    save of an interrupted search is unknown to the resumed one, which runs a new trial in its
    place, so the interrupted trial's run would stay behind as a duplicate. MLflow keeps
    deleted runs until its garbage collection, so they can still be restored.
    """
    trial_ids = {Path(result.path).name.removeprefix("trial_") for result in results}
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{SEARCH_RUN_TAG}` = '{parent_id}'", max_results=10_000)
    forgotten = [run for run in runs if run.data.tags.get(TRIAL_ID_TAG) not in trial_ids]
    for run in forgotten:
        client.delete_run(run.info.run_id)
    if forgotten:
        logger.info(
            "Deleted %d MLflow runs of trials that started after Ray Tune last saved the interrupted search (%s); "
            "the resumed search ran new trials in their place.",
            len(forgotten),
            ", ".join(run.data.tags.get(TRIAL_ID_TAG, "?") for run in forgotten),
        )


def _end_open_child_runs(client: MlflowClient, experiment_id: str, parent_id: str, status: str) -> None:
    """End the child runs that an interrupted or failed search left RUNNING."""
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SEARCH_RUN_TAG}` = '{parent_id}' and attributes.status = 'RUNNING'",
    )
    for run in runs:
        client.set_terminated(run.info.run_id, status)
    if runs:
        logger.warning("Marked %d running trials of search run %s as %s.", len(runs), parent_id, status)


def _log_search_inputs(
    client: MlflowClient,
    parent_id: str,
    settings: SearchSettings,
    space: SearchSpace,
    splits: DatasetSplits,
    cache_key: str,
    skipped_files: Sequence[BadFile] = (),
) -> None:
    summary = splits.summary()
    params: dict[str, Any] = {f"search.{key}": value for key, value in settings.as_params().items()}
    params["data.cache_key"] = cache_key
    for name, part in summary.items():
        params[f"split.{name}.patients"] = len(part["patients"])
        params[f"split.{name}.normal"] = part["normal"]
        params[f"split.{name}.abnormal"] = part["abnormal"]
    for name, described in space.describe()["parameters"].items():
        params[f"space.{name}"] = json.dumps(described)
    for name, value in library_versions().items():
        params[f"version.{name}"] = value
    log_params(client, parent_id, params)

    client.log_dict(parent_id, summary, "split.json")
    client.log_dict(parent_id, space.describe(), "search_space.json")

    # File names relative to the data folder and reasons; neither contains patient identifiers.
    client.log_metric(parent_id, "skipped_files", len(skipped_files))
    if skipped_files:
        with tempfile.TemporaryDirectory(prefix="aeplat-skipped-") as folder:
            path = Path(folder) / "skipped_files.csv"
            pd.DataFrame([asdict(bad_file) for bad_file in skipped_files], columns=["name", "reason"]).to_csv(path, index=False)
            client.log_artifact(parent_id, str(path))


def _start_ray(settings: SearchSettings) -> bool:
    """Connect to --ray-address, or start an embedded local Ray. Return True if Ray was started here."""
    if ray.is_initialized():
        return False

    # A Ray job's driver finds its cluster in RAY_ADDRESS, which the job server sets.
    address = settings.ray_address or env.ray_address_from_env()
    if address:
        _check_reachable(address)
        logger.info("Connecting to the Ray cluster at %s.", address)
        ray.init(address=address, log_to_driver=False)
        raise_keyboard_interrupt_on_sigterm()
        _check_trial_fits(settings, embedded=False)
        return True

    logger.info("Starting an embedded Ray on 127.0.0.1.")
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    raise_keyboard_interrupt_on_sigterm()
    try:
        _check_trial_fits(settings, embedded=True)
    except SearchError:
        ray.shutdown()
        raise
    return True


def _check_multi_node(settings: SearchSettings, tracking_uri: str) -> None:
    """On a cluster of several nodes, require trial storage and a tracking store that outlive the driver's machine.

    Checked only with more than one live node. A trial on another node writes its checkpoints
    to --storage, so that must be s3:// or a folder that node also mounts. The MLflow store
    must not be the default SQLite file in the driver's working directory.
    """
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if len(nodes) < 2:
        return

    if not (settings.tracking_uri or env.tracking_uri_from_env()):
        raise SearchError(
            f"The Ray cluster has {len(nodes)} nodes, and the default MLflow store {tracking_uri} is a file on the "
            "driver's machine that is lost with it. Pass --tracking-uri http://MLFLOW-SERVER:5000 (or a database URI) "
            "that outlives the driver."
        )
    if not tracking_uri.startswith(("http://", "https://")):
        logger.warning("The MLflow store %s is a local file: only this driver writes it, so keep it where it outlives this machine.", tracking_uri)

    if not is_s3_uri(settings.storage):
        _check_storage_on_every_node(Path(settings.storage).resolve(), nodes)


def _check_storage_on_every_node(storage: Path, nodes: list[dict[str, Any]], timeout_s: float = 60.0) -> None:
    """Raise SearchError unless a file that the driver writes into the --storage folder exists on every node."""
    storage.mkdir(parents=True, exist_ok=True)
    marker = storage / f".aeplat-storage-check-{uuid.uuid4().hex}"
    marker.write_text("aeplat", encoding="utf-8")
    try:
        checks = {
            node["NodeManagerAddress"]: _sees_file.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node["NodeID"], soft=False)
            ).remote(str(marker))
            for node in nodes
        }
        ready, _ = ray.wait(list(checks.values()), num_returns=len(checks), timeout=timeout_s)
        missing = [address for address, check in checks.items() if check not in ready or not ray.get(check)]
    finally:
        marker.unlink(missing_ok=True)

    if missing:
        raise SearchError(
            f"--storage {storage} is not shared: the Ray nodes at {', '.join(sorted(missing))} do not see it (or did not "
            f"respond within {timeout_s:.0f} s). Pass --storage s3://BUCKET/PREFIX, or a folder that every node mounts at the same path."
        )
    logger.info("Every one of the %d Ray nodes sees the trial storage %s.", len(nodes), storage)


@ray.remote(num_cpus=0)
def _sees_file(path: str) -> bool:
    return Path(path).is_file()


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Fail within seconds when a `host:port` or `ray://host:port` address does not accept connections.

    Without this check `ray.init` retries an unreachable address for minutes.
    """
    if address == "auto":
        return

    host_port = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise SearchError(f"--ray-address {address!r} is invalid; use auto, host:port or ray://host:port.")

    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as error:
        raise SearchError(
            f"The Ray cluster at {address} does not accept connections ({error}). Check --ray-address or $RAY_ADDRESS, "
            "or omit both to start an embedded Ray."
        ) from error


def _check_trial_fits(settings: SearchSettings, embedded: bool) -> None:
    """Reject a trial that no node can host, instead of letting Tune wait for it forever.

    An external cluster may autoscale, so there a missing resource is only a warning.
    """
    nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
    requests = {"CPU": settings.cpus_per_trial, "GPU": settings.gpus_per_trial}
    for resource, amount in requests.items():
        largest = max((node.get(resource, 0.0) for node in nodes), default=0.0)
        if amount <= largest:
            continue

        option = f"--{resource.lower()}s-per-trial"
        message = f"{option} {amount:g} exceeds every Ray node: the largest node has {largest:g} {resource}."
        if embedded:
            raise SearchError(f"{message} Lower {option}, or pass --ray-address of a cluster with larger nodes.")
        logger.warning("%s Trials wait until the autoscaler adds a node that is large enough.", message)


def _run_trials(
    settings: SearchSettings,
    space: SearchSpace,
    splits: DatasetSplits,
    tracking_uri: str,
    experiment_id: str,
    parent_id: str,
    console: Any,
    resuming: bool = False,
) -> tune.ResultGrid:
    data = TrialData(
        train_images=splits.train.images,
        validation_images=splits.validation.images,
        validation_labels=splits.validation.labels,
        image_size=settings.image_size,
        epochs=settings.epochs,
        seed=settings.seed,
        cpus_per_trial=settings.cpus_per_trial,
        gpus_per_trial=settings.gpus_per_trial,
        device=settings.device,
        space=space,
        repeats=settings.repeats,
        checkpoints=CheckpointSchedule(
            last_epoch=settings.epochs,
            stop_epochs=scheduler_stop_epochs(settings.epochs, settings.grace_period, settings.reduction_factor),
            interval_s=settings.checkpoint_interval,
        ),
    )
    searcher = TolerantOptunaSearch(
        space=space,
        metric=OPTIMIZED_METRIC,
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=settings.seed, multivariate=True),
    )
    scheduler = ASHAScheduler(
        metric=SCHEDULER_METRIC,
        mode="max",
        time_attr="training_iteration",
        max_t=settings.epochs,
        grace_period=settings.grace_period,
        reduction_factor=settings.reduction_factor,
    )
    mlflow_callback = MlflowTrialCallback(
        tracking_uri,
        experiment_id,
        parent_id,
        space.training_values,
        max_epochs=settings.epochs,
    )
    set_artifact_writer(parent_id, functools.partial(write_trial_artifacts, data=data))
    progress = SearchProgress(settings.trials, console=console)

    # with_parameters puts the arrays in Ray's object store once; every trial reads them from there.
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, data=data),
        {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial},
    )
    storage = _storage_arguments(settings)
    name = _experiment_name(settings, parent_id)
    if resuming:
        tuner = _restore_tuner(trainable, storage, name)
    else:
        callbacks = [mlflow_callback, progress, CheckpointPruner(name)]
        tuner = _new_tuner(trainable, settings, searcher, scheduler, storage, name, callbacks)

    if not resuming:
        progress.start()
    try:
        results = tuner.fit()
        _drain_trial_writes(parent_id, tracking_uri, settings)
        pruner = active_pruner(name)
        if pruner is not None:
            pruner.prune_to_latest()
        return results
    finally:
        progress.stop()


class TrackingUnavailableError(SearchError):
    """The tracking store stayed unreachable at the end of a search; the same command continues it."""


def _drain_trial_writes(parent_id: str, tracking_uri: str, settings: SearchSettings) -> None:
    """Wait until the tracking store has accepted every trial's queued writes, or stop the search with a message."""
    callback = active_callback(parent_id)
    if callback is None or callback.drain(TRACKING_WAIT_S):
        return

    raise TrackingUnavailableError(
        f"The MLflow tracking store {tracking_uri} was unreachable for {TRACKING_WAIT_S:.0f} s, so {callback.pending} "
        f"writes of the trials are not logged yet and no model was registered. Ray Tune keeps them with the trial "
        f"results under {settings.storage}: run the same command again once the store is reachable, and the search "
        f"logs them and registers its best model."
    )


def _restore_tuner(trainable: Any, storage: dict[str, Any], name: str) -> tune.Tuner:
    """Restore an interrupted search from Tune's experiment state, with Optuna's history and every trial.

    The callbacks come back from the saved state, so they write to the same MLflow runs.
    """
    path = f"{storage['storage_path']}/{name}"
    filesystem = storage.get("storage_filesystem")
    if not tune.Tuner.can_restore(path, storage_filesystem=filesystem):
        raise SearchError(f"No Ray Tune state to resume at {path}. Check --storage, or run the search without --resume.")

    logger.info("Restoring Ray Tune's experiment state from %s.", path)
    return tune.Tuner.restore(
        path, trainable=trainable, resume_unfinished=True, resume_errored=False, storage_filesystem=filesystem
    )


def _new_tuner(
    trainable: Any,
    settings: SearchSettings,
    searcher: OptunaSearch,
    scheduler: ASHAScheduler,
    storage: dict[str, Any],
    name: str,
    callbacks: list[Any],
) -> tune.Tuner:
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=settings.max_concurrent),
            scheduler=scheduler,
            num_samples=settings.trials,
            trial_dirname_creator=_trial_dirname,
            # A trial process imports torch and aeplat once and then runs trial after trial,
            # instead of a new process (about 3.5 s) for every trial.
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(
            name=name,
            **storage,
            callbacks=callbacks,
            # No num_to_keep: Tune would delete a checkpoint that the saved experiment state may
            # still name; CheckpointPruner deletes old checkpoints safely instead.
            checkpoint_config=tune.CheckpointConfig(),
            failure_config=tune.FailureConfig(max_failures=settings.max_failures),
            verbose=0,
        ),
    )


def _storage_arguments(settings: SearchSettings) -> dict[str, Any]:
    """Return Ray Tune's storage_path, and for S3 an explicit filesystem.

    pyarrow, which Tune uses for storage, ignores AWS_ENDPOINT_URL, so an S3-compatible store
    (MinIO, moto) is reached only through a filesystem built with its endpoint.
    """
    if not is_s3_uri(settings.storage):
        return {"storage_path": str(Path(settings.storage).resolve())}

    location = parse_s3_uri(str(settings.storage))
    endpoint = resolve_endpoint_url(settings.s3_endpoint_url)
    if endpoint is None:
        return {"storage_path": f"s3://{location.bucket}/{location.prefix}".rstrip("/")}

    from pyarrow import fs

    scheme = "https" if endpoint.startswith("https://") else "http"
    filesystem = fs.S3FileSystem(endpoint_override=endpoint.split("://", 1)[-1], scheme=scheme)
    return {"storage_path": f"{location.bucket}/{location.prefix}".rstrip("/"), "storage_filesystem": filesystem}


def _trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


def _trial_rows(results: tune.ResultGrid, space: SearchSpace, max_epochs: int) -> list[dict[str, Any]]:
    rows = []
    for result in results:
        metrics = result.metrics or {}
        config = result.config or {}
        row: dict[str, Any] = {
            "trial_id": metrics.get("trial_id", Path(result.path).name.removeprefix("trial_")),
            "status": _trial_status(result, max_epochs),
            "error": _short_error(result.error),
        }
        row.update(space.training_values(config))
        row.update({key: metrics.get(key) for key in _TRIAL_COLUMNS if key not in row})
        rows.append(row)
    return rows


def _trial_status(result: tune.Result, max_epochs: int) -> str:
    if result.error is not None:
        return "failed"
    if int((result.metrics or {}).get("epoch", 0)) < max_epochs:
        return "stopped early"
    return "finished"


def _short_error(error: BaseException | None) -> str:
    if error is None:
        return ""
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1][:500] if lines else type(error).__name__


def _log_trial_table(client: MlflowClient, parent_id: str, rows: list[dict[str, Any]]) -> None:
    with tempfile.TemporaryDirectory(prefix="aeplat-trials-") as folder:
        path = Path(folder) / "trials.csv"
        pd.DataFrame(rows).to_csv(path, index=False)
        client.log_artifact(parent_id, str(path))

    failed = sum(1 for row in rows if row["status"] == "failed")
    client.log_metric(parent_id, "trials_finished", len(rows) - failed)
    client.log_metric(parent_id, "trials_failed", failed)
    _log_auc_by_latent_size(client, parent_id, rows)

    from aeplat.platform.review import log_optuna_plots

    log_optuna_plots(client, parent_id, rows)


def _log_auc_by_latent_size(client: MlflowClient, parent_id: str, rows: list[dict[str, Any]]) -> None:
    """Log a plot of best validation AUC against latent size d, one point per trial that reported one."""
    points = [row for row in rows if row.get("latent_dim") is not None and _is_finite(row.get("best_val_auc"))]
    if not points:
        logger.warning("No trial reported a validation AUC with a latent size, so the parent run has no AUC plot.")
        return

    with tempfile.TemporaryDirectory(prefix="aeplat-plots-") as folder:
        path = plot_auc_by_latent_size(
            np.array([row["latent_dim"] for row in points]),
            np.array([row["best_val_auc"] for row in points]),
            np.array([row.get("entropy_weight") or 0.0 for row in points]),
            Path(folder) / AUC_BY_LATENT_SIZE_FILE,
        )
        client.log_artifact(parent_id, str(path))


def _is_finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _best_result(results: tune.ResultGrid) -> tune.Result | None:
    """Return the successful trial with the highest best validation AUC. Failed trials never win."""
    candidates = [
        result
        for result in results
        if result.error is None
        and result.checkpoint is not None
        and math.isfinite(float((result.metrics or {}).get(OPTIMIZED_METRIC, float("nan"))))
    ]
    if not candidates:
        return None
    return max(candidates, key=lambda result: result.metrics[OPTIMIZED_METRIC])


def _find_child_run(client: MlflowClient, experiment_id: str, parent_id: str, trial_id: str) -> str:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SEARCH_RUN_TAG}` = '{parent_id}' and tags.`{TRIAL_ID_TAG}` = '{trial_id}'",
        max_results=1,
    )
    if not runs:
        raise SearchError(f"No MLflow child run found for trial {trial_id} of search run {parent_id}.")
    return runs[0].info.run_id


def _finish_with_best_trial(
    client: MlflowClient,
    settings: SearchSettings,
    space: SearchSpace,
    splits: DatasetSplits,
    results: tune.ResultGrid,
    outcome: SearchOutcome,
) -> None:
    """Score the best trial once on the test split, log its model and register it."""
    best = _best_result(results)
    if best is None:
        reasons = sorted({row["error"] for row in outcome.trials if row["error"]})
        hint = "Check the trials' aeplat.failure_reason tags in MLflow."
        if any("TrainingDivergedError" in reason for reason in reasons):
            hint += " The losses diverged: lower the learning rate range in a --search-space file."
        raise SearchError(
            f"All {len(outcome.trials)} trials failed, so no model was registered. Reasons: {reasons[:5]}. {hint}"
        )

    trial_id = best.metrics["trial_id"]
    best_val_auc = float(best.metrics[OPTIMIZED_METRIC])
    weights, _ = load_best_weights(best.checkpoint)
    trainer = _trainer_with_weights(settings, space, best.config, weights)

    scores = trainer.score(splits.test.images)
    test_metrics = image_metrics(splits.test.labels, scores)
    logger.info("Best trial %s: validation AUC %.4f, test AUC %.4f, test AP %.4f.", trial_id, best_val_auc, test_metrics["auc"], test_metrics["ap"])

    parent_id = outcome.parent_run_id
    client.log_metric(parent_id, "best_val_auc", best_val_auc)
    client.log_metric(parent_id, "test_auc", test_metrics["auc"])
    client.log_metric(parent_id, "test_ap", test_metrics["ap"])
    test_pixel_metrics = _test_pixel_metrics(trainer, splits)
    for key, value in test_pixel_metrics.items():
        client.log_metric(parent_id, f"test_{key}", value)

    child_run_id = _find_child_run(client, outcome.experiment_id, parent_id, trial_id)
    client.set_tag(parent_id, "best_trial_id", trial_id)
    client.set_tag(parent_id, "best_run_id", child_run_id)
    log_params(client, parent_id, {f"best.{key}": value for key, value in space.training_values(best.config).items()})

    values = space.training_values(best.config)
    registered_version = find_search_version(client, settings.registered_model_name, parent_id)
    if registered_version is not None:
        # A resumed search that was killed after registering: the version exists, only the alias may be missing.
        logger.info("This search registered %s v%s before it was interrupted.", settings.registered_model_name, registered_version)
        registration = promote_if_better(client, settings.registered_model_name, registered_version, best_val_auc)
    else:
        example = splits.validation.images[:2]
        model_uri = log_scoring_model(child_run_id, ErrorMapModel(trainer.model.cpu()).eval(), example, serving_config(settings))
        registration = register_model(
            client,
            settings.registered_model_name,
            model_uri,
            child_run_id,
            tags={
                "dataset": settings.dataset,
                "modality": settings.model_modality,
                "model": values.get("model", "ae"),
                "latent_dim": values.get("latent_dim"),
                "entropy_weight": values.get("entropy_weight"),
                "image_size": settings.image_size,
                "val_auc": f"{best_val_auc:.6f}",
                "test_auc": f"{test_metrics['auc']:.6f}",
                "test_ap": f"{test_metrics['ap']:.6f}",
                **{f"test_{key}": f"{value:.6f}" for key, value in test_pixel_metrics.items()},
                "search_run_id": parent_id,
                "trial_id": trial_id,
            },
            val_auc=best_val_auc,
        )
    client.set_tag(parent_id, "registered_model", f"{registration.model_name}/{registration.version}")
    client.set_tag(parent_id, "champion", str(registration.is_champion).lower())

    outcome.best_trial_id = trial_id
    outcome.best_val_auc = best_val_auc
    outcome.test_metrics = {"auc": float(test_metrics["auc"]), "ap": float(test_metrics["ap"]), **test_pixel_metrics}
    outcome.registered_version = registration.version
    outcome.is_champion = registration.is_champion


def _test_pixel_metrics(trainer: Trainer, splits: DatasetSplits) -> dict[str, float]:
    """Return the best trial's pixel metrics on the test split, for datasets with lesion masks; else nothing."""
    test, validation = splits.test, splits.validation
    if test.masks is None or validation.masks is None:
        return {}
    try:
        metrics = pixel_metrics(trainer, test.images, test.masks, validation.images, validation.masks)
    except UndefinedMetricError as error:
        logger.warning("The pixel metrics of the test split are undefined: %s", error)
        return {}

    logger.info(
        "Test pixel AUC %.4f, pixel AP %.4f, best Dice %.4f, Dice at the validation threshold %.4f.",
        metrics["pixel_auc"],
        metrics["pixel_ap"],
        metrics["best_dice"],
        metrics["dice_at_val_threshold"],
    )
    return metrics


def _trainer_with_weights(
    settings: SearchSettings, space: SearchSpace, config: dict[str, Any], weights: dict[str, Any]
) -> Trainer:
    device = resolve_device(settings.device)
    trainer = Trainer(training_config(config, space, settings.seed), image_size=settings.image_size, device=device)
    trainer.model.load_state_dict(weights)
    return trainer
