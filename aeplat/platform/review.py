"""Review a search: Optuna's plots of its trials, and the data that `aeplat report` prints.

- `log_optuna_plots` rebuilds a search's trials as an in-memory Optuna study and logs Optuna's
  optimisation history, parameter importances and latent_dim × entropy_weight contour, with the
  study's trial table, to the search's MLflow parent run.
- `find_search_run` and `collect_report` read a search back from MLflow as plain data.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: the search driver runs headless

import matplotlib.pyplot as plt  # noqa: E402
import optuna  # noqa: E402
from mlflow.entities import Run  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402
from optuna.distributions import (  # noqa: E402
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.exceptions import ExperimentalWarning  # noqa: E402
from optuna.trial import TrialState  # noqa: E402
from optuna.visualization import matplotlib as optuna_plots  # noqa: E402

from aeplat.platform.registry import CHAMPION_ALIAS  # noqa: E402
from aeplat.platform.search import OPTIMIZED_METRIC  # noqa: E402
from aeplat.platform.tracking import FAILURE_TAG, SEARCH_RUN_TAG, STOPPED_EARLY_TAG, TRIAL_ID_TAG  # noqa: E402
from aeplat.search_spaces import Parameter, SearchSpace, parse_search_space  # noqa: E402

logger = logging.getLogger(__name__)

# Metrics of the parent run that `aeplat report` prints: the best trial's validation AUC and its
# scores on the test split (pixel metrics only for datasets with lesion masks).
REPORTED_METRICS = (
    "best_val_auc",
    "test_auc",
    "test_ap",
    "test_pixel_auc",
    "test_pixel_ap",
    "test_best_dice",
    "test_dice_at_val_threshold",
)

# Params and artifacts of a search's parent run.
SPACE_PARAM_PREFIX = "space."
OPTUNA_TRIALS_FILE = "optuna_trials.csv"
OPTIMIZATION_HISTORY_FILE = "optuna_optimization_history.png"
PARAM_IMPORTANCES_FILE = "optuna_param_importances.png"
CONTOUR_PARAMS = ("latent_dim", "entropy_weight")
CONTOUR_FILE = "optuna_contour_latent_dim_entropy_weight.png"

SEARCH_KIND_TAG = "aeplat.kind"
SEARCH_KIND = "search"

# Fewest completed trials for each plot. Optuna itself calls importances of one trial meaningless.
MIN_TRIALS_HISTORY = 1
MIN_TRIALS_IMPORTANCES = 2
MIN_TRIALS_CONTOUR = 2

_TARGET_NAME = "best validation AUC"


# Optuna review artifacts


def log_optuna_plots(
    client: MlflowClient,
    parent_id: str,
    rows: Sequence[Mapping[str, Any]],
    space: SearchSpace | None = None,
) -> list[str]:
    """Log Optuna's review of a search's trials to its parent run and return the names logged.

    rows are the search's trial rows: trial_id, status ("finished", "stopped early" or
    "failed"), best_val_auc, epoch, error and the training values. space is the search space,
    by default the one in the run's space.* params. Logs optuna_trials.csv and, where the
    trials allow it, the optimisation history, the parameter importances and the contour of
    latent_dim × entropy_weight as PNG files. A plot that cannot be drawn is skipped with one
    warning that gives the reason. Nothing here raises: a search never fails because of its review.
    """
    try:
        if space is None:
            space = load_run_search_space(client, parent_id)
        study = build_study(rows, space)
    except Exception as error:  # noqa: BLE001 - review artifacts must not end the search
        logger.warning(
            "Search run %s gets no Optuna plots: its trials could not be rebuilt as a study (%s: %s).",
            parent_id,
            type(error).__name__,
            error,
            exc_info=True,
        )
        return []

    writers: tuple[tuple[str, Callable[[optuna.Study, SearchSpace, Path], str | None]], ...] = (
        (OPTUNA_TRIALS_FILE, _write_trials_csv),
        (OPTIMIZATION_HISTORY_FILE, _draw_history),
        (PARAM_IMPORTANCES_FILE, _draw_importances),
        (CONTOUR_FILE, _draw_contour),
    )
    logged = []
    with tempfile.TemporaryDirectory(prefix="aeplat-optuna-") as folder:
        for name, write in writers:
            path = Path(folder) / name
            try:
                skip_reason = write(study, space, path)
                if skip_reason is not None:
                    logger.warning("Skipped %s of search run %s: %s", name, parent_id, skip_reason)
                    continue
                client.log_artifact(parent_id, str(path))
            except Exception as error:  # noqa: BLE001 - review artifacts must not end the search
                logger.warning(
                    "Failed to log %s to search run %s (%s: %s).", name, parent_id, type(error).__name__, error, exc_info=True
                )
                continue
            logged.append(name)
    return logged


def load_run_search_space(client: MlflowClient, run_id: str) -> SearchSpace:
    """Return the sampled parameters of a search's space, from the space.* params of its parent run.

    The params hold each parameter as described in search_space.json; the constants are not
    params, so the space returned has none.
    """
    params = client.get_run(run_id).data.params
    parameters = {
        key.removeprefix(SPACE_PARAM_PREFIX): json.loads(value)
        for key, value in params.items()
        if key.startswith(SPACE_PARAM_PREFIX)
    }
    return parse_search_space(json.dumps({"parameters": parameters}), source=f"the space.* params of run {run_id}")


def build_study(rows: Sequence[Mapping[str, Any]], space: SearchSpace) -> optuna.Study:
    """Return an in-memory Optuna study with one trial per row, numbered in the order of the rows.

    A trial's value is the row's best validation AUC. Failed rows, and rows without a finite
    AUC, become FAIL trials. Trials stopped early are COMPLETE, because Ray Tune's OptunaSearch
    records them so in its own study. Parameters keep the names and values trials trained with: a
    power_of_two parameter is an integer on a log scale (latent_dim, not the sampled exponent),
    and a float with include_zero has the sampler's `<name>_enabled` choice, plus the float
    itself only where it is not 0. Constants are not parameters. A value outside the space is
    left out of its trial, with one warning for all of them. The row's trial_id, status, epoch
    and error become user attributes.
    """
    distributions = space_distributions(space)
    study = optuna.create_study(direction="maximize")
    left_out: list[str] = []

    for row in rows:
        params: dict[str, Any] = {}
        for parameter in space.parameters:
            values = _study_values(parameter, row.get(parameter.name), distributions)
            if values is None:
                left_out.append(f"trial {row.get('trial_id')} {parameter.name}={row.get(parameter.name)!r}")
                continue
            params.update(values)

        value = row.get("best_val_auc")
        complete = row.get("status") != "failed" and _is_finite(value)
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={name: distributions[name] for name in params},
                value=float(value) if complete else None,
                state=TrialState.COMPLETE if complete else TrialState.FAIL,
                user_attrs=_user_attrs(row),
            )
        )

    if left_out:
        logger.warning(
            "Left values outside the search space out of the Optuna study of the trials: %s.", ", ".join(left_out)
        )
    return study


def space_distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """Return the Optuna distribution of every study parameter of a space, by name (see build_study)."""
    distributions: dict[str, BaseDistribution] = {}
    for parameter in space.parameters:
        if parameter.type == "categorical":
            distributions[parameter.name] = CategoricalDistribution(list(parameter.choices))
        elif parameter.type == "power_of_two":
            distributions[parameter.name] = IntDistribution(int(parameter.low), int(parameter.high), log=True)
        elif parameter.type == "int":
            distributions[parameter.name] = IntDistribution(int(parameter.low), int(parameter.high), log=parameter.log)
        else:
            if parameter.include_zero:
                distributions[parameter.enabled_name] = CategoricalDistribution([True, False])
            distributions[parameter.name] = FloatDistribution(parameter.low, parameter.high, log=parameter.log)
    return distributions


def _study_values(
    parameter: Parameter, value: Any, distributions: Mapping[str, BaseDistribution]
) -> dict[str, Any] | None:
    """Return the study parameters of one training value: {} when the row lacks it, None when it is outside the space."""
    if value is None:
        return {}

    values: dict[str, Any] = {}
    if parameter.type == "float" and parameter.include_zero:
        if _is_number(value) and value == 0:
            return {parameter.enabled_name: False}
        values[parameter.enabled_name] = True

    distribution = distributions[parameter.name]
    if isinstance(distribution, CategoricalDistribution):
        return {**values, parameter.name: value} if value in distribution.choices else None
    if not (_is_number(value) and distribution.low <= value <= distribution.high):
        return None
    if isinstance(distribution, IntDistribution):
        return {**values, parameter.name: int(value)} if value == int(value) else None
    return {**values, parameter.name: float(value)}


def _user_attrs(row: Mapping[str, Any]) -> dict[str, Any]:
    attrs: dict[str, Any] = {"trial_id": str(row.get("trial_id", "")), "status": str(row.get("status", ""))}
    if _is_finite(row.get("epoch")):
        attrs["epochs"] = int(row["epoch"])
    if row.get("error"):
        attrs["error"] = str(row["error"])
    return attrs


def _write_trials_csv(study: optuna.Study, space: SearchSpace, path: Path) -> str | None:
    # The study's start and end times are those of its rebuilding, not of the trials, so they are left out.
    study.trials_dataframe(attrs=("number", "value", "params", "user_attrs", "state")).to_csv(path, index=False)
    return None


def _draw_history(study: optuna.Study, space: SearchSpace, path: Path) -> str | None:
    completed = _completed(study)
    if len(completed) < MIN_TRIALS_HISTORY:
        return f"no trial completed with a validation AUC ({len(study.trials)} failed)."

    with _optuna_remarks(OPTIMIZATION_HISTORY_FILE):
        axes = optuna_plots.plot_optimization_history(study, target_name=_TARGET_NAME)
    _save(axes, path)
    return None


def _draw_importances(study: optuna.Study, space: SearchSpace, path: Path) -> str | None:
    completed = _completed(study)
    if len(completed) < MIN_TRIALS_IMPORTANCES:
        return f"parameter importances need {MIN_TRIALS_IMPORTANCES} completed trials, the search has {len(completed)}."
    if not any(len(_distinct(completed, name)) > 1 for name in space_distributions(space)):
        return "every parameter has one distinct value among the completed trials, so none can explain the AUC."

    with _optuna_remarks(PARAM_IMPORTANCES_FILE):
        axes = optuna_plots.plot_param_importances(study, target_name=_TARGET_NAME)
    _save(axes, path)
    return None


def _draw_contour(study: optuna.Study, space: SearchSpace, path: Path) -> str | None:
    searched = {parameter.name for parameter in space.parameters}
    for name in CONTOUR_PARAMS:
        if name not in searched:
            constant = f" (it is the constant {space.constants[name]!r})" if name in space.constants else ""
            return f"{name} is not a searched parameter of this space{constant}."

    completed = [trial for trial in _completed(study) if all(name in trial.params for name in CONTOUR_PARAMS)]
    if len(completed) < MIN_TRIALS_CONTOUR:
        return (
            f"the contour needs {MIN_TRIALS_CONTOUR} completed trials with both {' and '.join(CONTOUR_PARAMS)}, "
            f"the search has {len(completed)} (a trial with entropy_weight = 0 has no entropy_weight in the study)."
        )
    for name in CONTOUR_PARAMS:
        if len(_distinct(completed, name)) < 2:
            return f"{name} has one distinct value among the {len(completed)} completed trials that have both parameters."

    with _optuna_remarks(CONTOUR_FILE):
        axes = optuna_plots.plot_contour(study, params=list(CONTOUR_PARAMS), target_name=_TARGET_NAME)
    _save(axes, path)
    return None


def _completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _distinct(trials: Sequence[optuna.trial.FrozenTrial], name: str) -> set[Any]:
    return {trial.params[name] for trial in trials if name in trial.params}


@contextlib.contextmanager
def _optuna_remarks(name: str) -> Iterator[None]:
    """Log Optuna's warnings about a plot (such as "importance may be inaccurate") as INFO lines.

    Optuna marks its matplotlib plots experimental on every call; that warning is dropped.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield
    for message in dict.fromkeys(str(warning.message) for warning in caught):
        logger.info("Optuna on %s: %s", name, message)


def _save(axes: Any, path: Path) -> None:
    figure = axes.figure
    try:
        figure.savefig(path, dpi=120, bbox_inches="tight")
    finally:
        plt.close(figure)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_finite(value: Any) -> bool:
    return _is_number(value) and math.isfinite(value)


# Report data


class SearchNotFoundError(LookupError):
    """No search run matches the requested name or id; the message names what was looked up."""


@dataclass(frozen=True)
class TrialSummary:
    """One trial of a search, read from its MLflow child run."""

    trial_id: str
    run_id: str
    status: str  # finished, stopped early, failed, killed or running
    best_val_auc: float | None
    epochs: int  # epochs the trial ran (steps of its best_val_auc metric)
    params: dict[str, str]  # training values as logged, such as latent_dim and lr
    failure_reason: str = ""


@dataclass(frozen=True)
class SearchReport:
    """Contents of `aeplat report` for one search: settings, trials, budget and registration."""

    run_id: str
    run_name: str
    experiment_id: str
    experiment_name: str
    status: str  # the MLflow status of the parent run: RUNNING, FINISHED, FAILED or KILLED
    tracking_uri: str
    dataset: str
    modality: str
    settings: dict[str, str]  # the search.* params of the parent run, without the prefix
    trials: list[TrialSummary]  # best validation AUC first; failed trials and trials without an AUC last
    started_ms: int
    ended_ms: int | None
    failure_reason: str = ""
    metrics: dict[str, float] = field(default_factory=dict)  # REPORTED_METRICS that the parent run has
    best_trial_id: str | None = None
    best_run_id: str | None = None
    registered_model: str | None = None  # NAME/VERSION
    champion_at_registration: bool | None = None
    current_champion_version: str | None = None
    artifacts: list[str] = field(default_factory=list)  # files at the root of the parent run

    @property
    def model_name(self) -> str:
        return f"{self.dataset}-{self.modality}"

    @property
    def trials_requested(self) -> int | None:
        return _int_or_none(self.settings.get("trials"))

    @property
    def epochs_per_trial(self) -> int | None:
        return _int_or_none(self.settings.get("epochs"))

    @property
    def wall_time_s(self) -> float:
        """Seconds from the start of the parent run to its end, or to now while it runs."""
        end = self.ended_ms if self.ended_ms is not None else int(time.time() * 1000)
        return max(0.0, (end - self.started_ms) / 1000)

    @property
    def epochs_run(self) -> int:
        return sum(trial.epochs for trial in self.trials)

    @property
    def epoch_budget(self) -> int | None:
        """Trials requested × maximum epochs per trial."""
        if self.trials_requested is None or self.epochs_per_trial is None:
            return None
        return self.trials_requested * self.epochs_per_trial

    def count(self, status: str) -> int:
        return sum(1 for trial in self.trials if trial.status == status)

    def top(self, n: int) -> list[TrialSummary]:
        return self.trials[:n]

    @property
    def failed(self) -> list[TrialSummary]:
        return [trial for trial in self.trials if trial.status == "failed"]


def find_search_run(client: MlflowClient, search: str) -> Run:
    """Return the search run that `search` names: a parent run id, an experiment name or a model name.

    For an experiment or a registered model name (such as brats-flair, that is dataset and
    modality) the newest search run is returned. Raises SearchNotFoundError otherwise.
    """
    run = _run_or_none(client, search)
    if run is not None:
        tags = run.data.tags
        if tags.get(SEARCH_KIND_TAG) == SEARCH_KIND:
            return run
        if SEARCH_RUN_TAG in tags:
            raise SearchNotFoundError(
                f"Run {search} is trial {tags.get(TRIAL_ID_TAG, '?')} of search run {tags[SEARCH_RUN_TAG]}; "
                f"pass {tags[SEARCH_RUN_TAG]} for the whole search."
            )
        raise SearchNotFoundError(f"Run {search} is not an aeplat search (it has no tag {SEARCH_KIND_TAG} = {SEARCH_KIND}).")

    experiment = client.get_experiment_by_name(search)
    if experiment is not None:
        runs = _search_runs(client, [experiment.experiment_id], max_results=1)
        if runs:
            return runs[0]

    runs = _search_runs_of_model(client, search) if "'" not in search else []
    if runs:
        return runs[0]

    raise SearchNotFoundError(_not_found_message(client, search))


def list_searches(client: MlflowClient, max_results: int = 10) -> list[Run]:
    """Return the newest search runs of every experiment, newest first."""
    return _search_runs(client, _experiment_ids(client), max_results=max_results)


def collect_report(client: MlflowClient, run: Run, tracking_uri: str) -> SearchReport:
    """Read a search's parent run, its trials' child runs and its registered version from MLflow."""
    info, data = run.info, run.data
    experiment = client.get_experiment(info.experiment_id)
    children = _all_runs(client, [info.experiment_id], f"tags.`{SEARCH_RUN_TAG}` = '{info.run_id}'")
    best_trial_id = data.tags.get("best_trial_id")
    trials = sorted((_trial_summary(client, child) for child in children), key=lambda trial: _rank_key(trial, best_trial_id))

    registered = data.tags.get("registered_model")
    champion_tag = data.tags.get("champion")
    return SearchReport(
        run_id=info.run_id,
        run_name=info.run_name or "",
        experiment_id=info.experiment_id,
        experiment_name=experiment.name,
        status=info.status,
        tracking_uri=tracking_uri,
        dataset=data.tags.get("dataset", ""),
        modality=data.tags.get("modality", ""),
        settings={key.removeprefix("search."): value for key, value in data.params.items() if key.startswith("search.")},
        trials=trials,
        started_ms=info.start_time,
        ended_ms=info.end_time,
        failure_reason=data.tags.get(FAILURE_TAG, ""),
        metrics={name: data.metrics[name] for name in REPORTED_METRICS if name in data.metrics},
        best_trial_id=best_trial_id,
        best_run_id=data.tags.get("best_run_id"),
        registered_model=registered,
        champion_at_registration=None if champion_tag is None else champion_tag == "true",
        current_champion_version=_current_champion(client, registered.split("/")[0]) if registered else None,
        artifacts=_root_artifacts(client, info.run_id),
    )


def run_url(tracking_uri: str, experiment_id: str, run_id: str) -> str | None:
    """Return the MLflow UI address of a run on an http(s) tracking server, else None."""
    if not tracking_uri.startswith(("http://", "https://")):
        return None
    return f"{tracking_uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"


def _run_or_none(client: MlflowClient, run_id: str) -> Run | None:
    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _search_runs(client: MlflowClient, experiment_ids: list[str], max_results: int, extra_filter: str = "") -> list[Run]:
    if not experiment_ids:
        return []
    filter_string = f"tags.`{SEARCH_KIND_TAG}` = '{SEARCH_KIND}'" + (f" and {extra_filter}" if extra_filter else "")
    return list(
        client.search_runs(
            experiment_ids, filter_string=filter_string, order_by=["attributes.start_time DESC"], max_results=max_results
        )
    )


def _search_runs_of_model(client: MlflowClient, name: str) -> list[Run]:
    """Return the newest search run whose dataset and modality tags make up `name`, as a one-item list.

    A name such as brain-tumor-mri can be split at more than one dash, so each split is tried.
    """
    experiment_ids = _experiment_ids(client)
    candidates = []
    for position, character in enumerate(name):
        if character != "-":
            continue
        dataset, modality = name[:position], name[position + 1 :]
        condition = f"tags.dataset = '{dataset}' and tags.modality = '{modality}'"
        candidates.extend(_search_runs(client, experiment_ids, max_results=1, extra_filter=condition))
    return sorted(candidates, key=lambda run: run.info.start_time, reverse=True)[:1]


def _experiment_ids(client: MlflowClient) -> list[str]:
    ids: list[str] = []
    page_token = None
    while True:
        page = client.search_experiments(max_results=1000, page_token=page_token)
        ids.extend(experiment.experiment_id for experiment in page)
        page_token = page.token
        if not page_token:
            return ids


def _all_runs(client: MlflowClient, experiment_ids: list[str], filter_string: str) -> list[Run]:
    runs: list[Run] = []
    page_token = None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, max_results=1000, page_token=page_token)
        runs.extend(page)
        page_token = page.token
        if not page_token:
            return runs


def _not_found_message(client: MlflowClient, search: str) -> str:
    message = (
        f"No search found for {search!r} in {client.tracking_uri}: it is neither the id of a search run nor the name of "
        "an experiment or a registered model (dataset-modality, such as brats-flair) with a search."
    )
    searches = list_searches(client)
    if not searches:
        return message + " This store has no searches: check --tracking-uri and $MLFLOW_TRACKING_URI, or run `aeplat search`."

    lines = [
        f"  {run.info.run_id}  {run.data.tags.get('dataset', '')}-{run.data.tags.get('modality', '')}  "
        f"{run.info.status}  started {format_timestamp(run.info.start_time)}"
        for run in searches
    ]
    return message + " The newest searches in this store (run id, model, status):\n" + "\n".join(lines)


def _trial_summary(client: MlflowClient, run: Run) -> TrialSummary:
    tags = run.data.tags
    history = client.get_metric_history(run.info.run_id, OPTIMIZED_METRIC)
    return TrialSummary(
        trial_id=tags.get(TRIAL_ID_TAG, run.info.run_name or run.info.run_id),
        run_id=run.info.run_id,
        status=_trial_status(run.info.status, tags.get(STOPPED_EARLY_TAG)),
        best_val_auc=run.data.metrics.get(OPTIMIZED_METRIC),
        epochs=max((metric.step for metric in history), default=0),
        params=dict(run.data.params),
        failure_reason=tags.get(FAILURE_TAG, ""),
    )


def _trial_status(run_status: str, stopped_early: str | None) -> str:
    if run_status == "FAILED":
        return "failed"
    if run_status == "KILLED":
        return "killed"
    if run_status != "FINISHED":
        return "running"
    return "stopped early" if stopped_early == "true" else "finished"


def _rank_key(trial: TrialSummary, best_trial_id: str | None) -> tuple[bool, float, bool, str]:
    """Rank by best validation AUC; a failed trial never wins, as in the search, so it comes last.

    Among equal AUCs the trial that the search chose as best comes first.
    """
    auc = trial.best_val_auc if _is_finite(trial.best_val_auc) else float("-inf")
    return (trial.status == "failed", -auc, trial.trial_id != best_trial_id, trial.trial_id)


def _current_champion(client: MlflowClient, model_name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION_ALIAS).version)
    except MlflowException:
        return None


def _root_artifacts(client: MlflowClient, run_id: str) -> list[str]:
    try:
        return sorted(item.path for item in client.list_artifacts(run_id))
    except Exception as error:  # noqa: BLE001 - each artifact store raises its own errors; the report goes on
        logger.warning("Could not list the artifacts of run %s (%s: %s).", run_id, type(error).__name__, error)
        return []


def _int_or_none(text: str | None) -> int | None:
    try:
        return int(text) if text else None
    except ValueError:
        return None


def format_timestamp(milliseconds: int | None) -> str:
    """Return an MLflow timestamp (milliseconds since the epoch) as local date and time."""
    if milliseconds is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(milliseconds / 1000))
