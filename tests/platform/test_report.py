"""Optuna review artifacts of a search and `aeplat report`, against real SQLite MLflow stores."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from aeplat.platform.cli import main
from aeplat.platform.review import (
    CONTOUR_FILE,
    OPTIMIZATION_HISTORY_FILE,
    OPTUNA_TRIALS_FILE,
    PARAM_IMPORTANCES_FILE,
    SearchNotFoundError,
    build_study,
    collect_report,
    find_search_run,
    log_optuna_plots,
    run_url,
)
from aeplat.platform.tracking import FAILURE_TAG, SEARCH_RUN_TAG, STOPPED_EARLY_TAG, TRIAL_ID_TAG, log_params
from aeplat.search_spaces import SearchSpace, load_search_space, parse_search_space

ALL_FILES = [OPTUNA_TRIALS_FILE, OPTIMIZATION_HISTORY_FILE, PARAM_IMPORTANCES_FILE, CONTOUR_FILE]
BRATS_SPACE = load_search_space("brats")

# A custom space in which λ is a constant, as in tests/platform/test_search_e2e.py.
CONSTANT_LAMBDA_SPACE = parse_search_space(
    """
dataset: brats
parameters:
  latent_dim: {type: power_of_two, low: 4, high: 16}
  lr: {type: categorical, choices: [1.0e-3, 1.0e+12]}
constants:
  model: ae
  entropy_weight: 0.0
"""
)


def _row(trial: int, auc: float | None, latent_dim: int = 16, entropy_weight: float = 0.5, **values: Any) -> dict:
    """One trial row as runner._trial_rows builds it; auc None means the trial failed."""
    return {
        "trial_id": f"a1b2c3{trial:02d}",
        "status": "failed" if auc is None else values.pop("status", "finished"),
        "error": "TrainingDivergedError: the loss is nan at epoch 1" if auc is None else "",
        "latent_dim": latent_dim,
        "entropy_weight": entropy_weight,
        "lr": values.pop("lr", 1e-3),
        "model": values.pop("model", "ae"),
        "epoch": 1 if auc is None else 3,
        "best_val_auc": auc,
        **values,
    }


SIX_ROWS = [
    _row(0, 0.71, latent_dim=16, entropy_weight=0.5, lr=1e-3),
    _row(1, 0.62, latent_dim=4, entropy_weight=0.0, lr=2e-4, model="vae", status="stopped early"),
    _row(2, None, latent_dim=64, entropy_weight=3.0, lr=2.5e-3),
    _row(3, 0.66, latent_dim=32, entropy_weight=0.01, lr=5e-4, model="memae"),
    _row(4, 0.69, latent_dim=8, entropy_weight=0.002, lr=7e-4, model="ceae"),
    _row(5, 0.58, latent_dim=2, entropy_weight=0.0, lr=1e-4),
]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A SQLite MLflow store with its artifacts in a temporary folder; each test adds its own runs."""
    folder = tmp_path_factory.mktemp("review-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment_id = client.create_experiment("review", artifact_location=str(folder / "artifacts"))
    return {"client": client, "uri": uri, "experiment_id": experiment_id, "folder": folder}


def _parent_run(store: dict, space: SearchSpace | None = BRATS_SPACE) -> str:
    """A search's parent run with its space.* params, as runner._log_search_inputs logs them."""
    client = store["client"]
    run_id = client.create_run(store["experiment_id"], tags={"aeplat.kind": "search"}).info.run_id
    if space is not None:
        params = {f"space.{name}": json.dumps(described) for name, described in space.describe()["parameters"].items()}
        log_params(client, run_id, params)
    return run_id


def _artifacts(client: MlflowClient, run_id: str) -> set[str]:
    return {item.path for item in client.list_artifacts(run_id)}


def _review_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "aeplat.platform.review" and record.levelno == logging.WARNING]


# The study


def test_study_marks_failed_trials_fail() -> None:
    study = build_study(SIX_ROWS, BRATS_SPACE)

    trials = study.trials
    assert [trial.user_attrs["trial_id"] for trial in trials] == [row["trial_id"] for row in SIX_ROWS]
    assert [trial.state for trial in trials] == [TrialState.COMPLETE] * 2 + [TrialState.FAIL] + [TrialState.COMPLETE] * 3
    assert [trial.value for trial in trials] == [0.71, 0.62, None, 0.66, 0.69, 0.58]
    assert trials[1].user_attrs["status"] == "stopped early"
    assert "TrainingDivergedError" in trials[2].user_attrs["error"]
    assert trials[2].params["latent_dim"] == 64


def test_study_parameters_follow_the_sampler() -> None:
    """latent_dim keeps its trained value on a log scale; λ = 0 is the sampler's 'enabled' choice set to False."""
    study = build_study(SIX_ROWS[:2], BRATS_SPACE)

    with_lambda, without_lambda = study.trials
    assert with_lambda.params == {"latent_dim": 16, "entropy_weight_enabled": True, "entropy_weight": 0.5, "lr": 1e-3, "model": "ae"}
    assert without_lambda.params == {"latent_dim": 4, "entropy_weight_enabled": False, "lr": 2e-4, "model": "vae"}
    assert with_lambda.distributions["latent_dim"].log
    assert (with_lambda.distributions["latent_dim"].low, with_lambda.distributions["latent_dim"].high) == (1, 128)
    assert with_lambda.distributions["entropy_weight"].log


def test_study_leaves_out_values_outside_the_space(caplog: pytest.LogCaptureFixture) -> None:
    rows = [_row(0, 0.7, latent_dim=256), _row(1, 0.6, model="unet")]

    study = build_study(rows, BRATS_SPACE)

    assert "latent_dim" not in study.trials[0].params
    assert "model" not in study.trials[1].params
    assert study.trials[1].params["latent_dim"] == 16
    warnings = _review_warnings(caplog)
    assert len(warnings) == 1
    assert "latent_dim=256" in warnings[0]
    assert "model='unet'" in warnings[0]


# Plots logged to the parent run


def test_plots_and_trials_table_logged_to_parent_run(store: dict, caplog: pytest.LogCaptureFixture) -> None:
    client = store["client"]
    run_id = _parent_run(store)

    logged = log_optuna_plots(client, run_id, SIX_ROWS)

    assert logged == ALL_FILES
    assert set(ALL_FILES) <= _artifacts(client, run_id)
    assert _review_warnings(caplog) == []
    table = pd.read_csv(client.download_artifacts(run_id, OPTUNA_TRIALS_FILE, str(store["folder"])))
    assert list(table["state"]) == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE", "COMPLETE", "COMPLETE"]
    assert list(table["user_attrs_trial_id"]) == [row["trial_id"] for row in SIX_ROWS]
    assert {"value", "params_latent_dim", "params_entropy_weight", "params_lr", "params_model", "user_attrs_status"} <= set(table.columns)
    assert "datetime_start" not in table.columns


@pytest.mark.parametrize(
    ("rows", "space", "expected", "reasons"),
    [
        pytest.param(
            [_row(0, 0.7), _row(1, None)],
            BRATS_SPACE,
            [OPTUNA_TRIALS_FILE, OPTIMIZATION_HISTORY_FILE],
            ["importances need 2 completed trials, the search has 1", "contour needs 2 completed trials"],
            id="one completed trial",
        ),
        pytest.param(
            [_row(0, None), _row(1, None)],
            BRATS_SPACE,
            [OPTUNA_TRIALS_FILE],
            ["no trial completed", "importances need 2 completed trials, the search has 0", "contour needs 2"],
            id="every trial failed",
        ),
        pytest.param(
            [_row(0, 0.7, entropy_weight=0.0), _row(1, 0.6, latent_dim=4, entropy_weight=0.0), _row(2, 0.65, latent_dim=8)],
            BRATS_SPACE,
            [OPTUNA_TRIALS_FILE, OPTIMIZATION_HISTORY_FILE, PARAM_IMPORTANCES_FILE],
            ["the search has 1 (a trial with entropy_weight = 0 has no entropy_weight in the study)"],
            id="λ = 0 in all but one trial",
        ),
        pytest.param(
            [_row(0, 0.7, entropy_weight=0.1), _row(1, 0.6, entropy_weight=1.0), _row(2, 0.65, entropy_weight=0.01)],
            BRATS_SPACE,
            [OPTUNA_TRIALS_FILE, OPTIMIZATION_HISTORY_FILE, PARAM_IMPORTANCES_FILE],
            ["latent_dim has one distinct value"],
            id="one distinct latent size",
        ),
        pytest.param(
            [_row(0, 0.7), _row(1, 0.6)],
            BRATS_SPACE,
            [OPTUNA_TRIALS_FILE, OPTIMIZATION_HISTORY_FILE],
            ["every parameter has one distinct value", "latent_dim has one distinct value"],
            id="no parameter varies",
        ),
        pytest.param(
            [_row(0, 0.7, latent_dim=4, entropy_weight=0.0), _row(1, 0.6, latent_dim=8, entropy_weight=0.0, lr=1e12)],
            CONSTANT_LAMBDA_SPACE,
            [OPTUNA_TRIALS_FILE, OPTIMIZATION_HISTORY_FILE, PARAM_IMPORTANCES_FILE],
            ["entropy_weight is not a searched parameter of this space (it is the constant 0.0)"],
            id="λ not searched in a custom space",
        ),
    ],
)
def test_undrawable_plots_skipped_with_warning(
    store: dict, caplog: pytest.LogCaptureFixture, rows: list, space: SearchSpace, expected: list, reasons: list
) -> None:
    client = store["client"]
    run_id = _parent_run(store, space)

    logged = log_optuna_plots(client, run_id, rows, space)

    assert logged == expected
    assert _artifacts(client, run_id) == set(expected)
    warnings = _review_warnings(caplog)
    assert len(warnings) == len(ALL_FILES) - len(expected)
    for reason, warning in zip(reasons, warnings, strict=True):
        assert reason in warning


def test_space_read_from_parent_run(store: dict) -> None:
    run_id = _parent_run(store, CONSTANT_LAMBDA_SPACE)
    rows = [_row(0, 0.7, latent_dim=4), _row(1, 0.6, latent_dim=8)]

    logged = log_optuna_plots(store["client"], run_id, rows)

    assert logged == [OPTUNA_TRIALS_FILE, OPTIMIZATION_HISTORY_FILE, PARAM_IMPORTANCES_FILE]


def test_run_without_space_warns(store: dict, caplog: pytest.LogCaptureFixture) -> None:
    run_id = _parent_run(store, space=None)

    logged = log_optuna_plots(store["client"], run_id, SIX_ROWS)

    assert logged == []
    assert len(_review_warnings(caplog)) == 1
    assert "could not be rebuilt" in _review_warnings(caplog)[0]


def test_failing_artifact_store_gets_warnings_not_an_error(
    store: dict, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = store["client"]
    run_id = _parent_run(store)

    def reject(*args: Any, **kwargs: Any) -> None:
        raise OSError("No space left on device")

    monkeypatch.setattr(client, "log_artifact", reject)
    logged = log_optuna_plots(client, run_id, SIX_ROWS)

    assert logged == []
    warnings = _review_warnings(caplog)
    assert len(warnings) == len(ALL_FILES)
    assert all("No space left on device" in warning for warning in warnings)


# Report data


def _trial_run(client: MlflowClient, experiment_id: str, parent_id: str, trial_id: str, status: str, aucs: list[float], **tags: str) -> str:
    run_id = client.create_run(
        experiment_id,
        tags={"mlflow.parentRunId": parent_id, SEARCH_RUN_TAG: parent_id, TRIAL_ID_TAG: trial_id, **tags},
    ).info.run_id
    log_params(client, run_id, {"latent_dim": 16, "entropy_weight": 0.25, "lr": 0.001, "model": "ae"})
    for epoch, auc in enumerate(aucs, start=1):
        client.log_metric(run_id, "best_val_auc", auc, step=epoch)
    client.set_terminated(run_id, status)
    return run_id


@pytest.fixture(scope="module")
def searches(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Searches of brats-flair: an older failed one, one with tied trials, and the newest with a finished,
    a stopped-early and a failed trial and the champion."""
    folder = tmp_path_factory.mktemp("report-store")
    uri = f"sqlite:///{folder / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment_id = client.create_experiment("aeplat-brats-flair", artifact_location=str(folder / "artifacts"))
    search_tags = {"aeplat.kind": "search", "dataset": "brats", "modality": "flair"}

    older = client.create_run(experiment_id, tags=search_tags, start_time=1_000).info.run_id
    client.set_terminated(older, "FAILED")
    newer = client.create_run(experiment_id, tags=search_tags, run_name="search-newer", start_time=2_000).info.run_id
    log_params(client, newer, {"search.trials": 4, "search.epochs": 3, "search.dataset": "brats", "search.image_size": 32})

    best = _trial_run(client, experiment_id, newer, "a1b2c300", "FINISHED", [0.6, 0.7, 0.75], **{STOPPED_EARLY_TAG: "false"})
    early = _trial_run(client, experiment_id, newer, "a1b2c301", "FINISHED", [0.55], **{STOPPED_EARLY_TAG: "true"})
    failed = _trial_run(
        client, experiment_id, newer, "a1b2c302", "FAILED", [0.8], **{FAILURE_TAG: "TrainingDivergedError: the loss is nan at epoch 2"}
    )

    client.create_registered_model("brats-flair")
    version = client.create_model_version("brats-flair", source=str(folder / "model"), run_id=best)
    client.set_registered_model_alias("brats-flair", "champion", version.version)
    for key, value in {"registered_model": f"brats-flair/{version.version}", "champion": "true", "best_trial_id": "a1b2c300", "best_run_id": best}.items():
        client.set_tag(newer, key, value)
    client.log_metric(newer, "best_val_auc", 0.75)
    client.log_metric(newer, "test_auc", 0.72)
    client.set_terminated(newer, "FINISHED", end_time=2_000 + 754_000)

    # Between the two in time, so neither lookup by name finds it: two trials with equal AUCs.
    tied = client.create_run(experiment_id, tags={**search_tags, "best_trial_id": "ffff0001"}, start_time=1_500).info.run_id
    for trial_id in ("0000ffff", "ffff0001"):
        _trial_run(client, experiment_id, tied, trial_id, "FINISHED", [0.7])
    client.set_terminated(tied, "FINISHED")

    return {
        "client": client, "uri": uri, "experiment_id": experiment_id,
        "older": older, "newer": newer, "tied": tied, "best": best, "early": early, "failed": failed,
    }  # fmt: skip


@pytest.mark.parametrize(
    ("search", "expected"),
    [("newer", "newer"), ("older", "older"), ("aeplat-brats-flair", "newer"), ("brats-flair", "newer")],
)
def test_search_found_by_id_or_name(searches: dict, search: str, expected: str) -> None:
    name = searches.get(search, search)

    run = find_search_run(searches["client"], name)

    assert run.info.run_id == searches[expected]


def test_unknown_search_names_the_lookup_and_lists_searches(searches: dict) -> None:
    with pytest.raises(SearchNotFoundError) as raised:
        find_search_run(searches["client"], "brats-t1")

    message = str(raised.value)
    assert "'brats-t1'" in message
    assert searches["uri"] in message
    assert "registered model" in message
    assert searches["newer"] in message
    assert searches["older"] in message


def test_trial_run_id_points_to_its_search(searches: dict) -> None:
    with pytest.raises(SearchNotFoundError, match=f"trial a1b2c302 of search run {searches['newer']}"):
        find_search_run(searches["client"], searches["failed"])


def test_report_counts_trials_epochs_and_budget(searches: dict) -> None:
    client = searches["client"]

    report = collect_report(client, client.get_run(searches["newer"]), searches["uri"])

    assert [trial.trial_id for trial in report.trials] == ["a1b2c300", "a1b2c301", "a1b2c302"]
    assert [trial.status for trial in report.trials] == ["finished", "stopped early", "failed"]
    assert [trial.epochs for trial in report.trials] == [3, 1, 1]
    assert [trial.trial_id for trial in report.top(2)] == ["a1b2c300", "a1b2c301"]
    assert [trial.failure_reason for trial in report.failed] == ["TrainingDivergedError: the loss is nan at epoch 2"]
    assert (report.trials_requested, report.epochs_run, report.epoch_budget) == (4, 5, 12)
    assert report.wall_time_s == pytest.approx(754.0)
    assert (report.registered_model, report.champion_at_registration, report.current_champion_version) == ("brats-flair/1", True, "1")
    assert report.best_run_id == searches["best"]
    assert report.model_name == "brats-flair"


def test_search_best_trial_comes_first_among_equal_aucs(searches: dict) -> None:
    client = searches["client"]

    report = collect_report(client, client.get_run(searches["tied"]), searches["uri"])

    assert [trial.trial_id for trial in report.trials] == ["ffff0001", "0000ffff"]


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000/#/experiments/7/runs/abc"),
        ("https://mlflow.example.org/", "https://mlflow.example.org/#/experiments/7/runs/abc"),
        ("sqlite:////data/mlflow.db", None),
    ],
)
def test_run_url_only_for_a_tracking_server(uri: str, expected: str | None) -> None:
    assert run_url(uri, "7", "abc") == expected


# The command


def test_report_command_prints_trials_budget_and_links(searches: dict, capsys: pytest.CaptureFixture) -> None:
    code = main(["report", "brats-flair", "--tracking-uri", searches["uri"], "--top", "2"])

    output = capsys.readouterr().out
    assert code == 0
    assert "search-newer" in output
    assert "FINISHED" in output
    assert "Best 2 of 3 trials" in output
    assert "TrainingDivergedError: the loss is nan at epoch 2" in output
    assert "3 of 4 requested: 1 finished, 1 stopped early, 1 failed" in output
    assert "5 run of 12" in output
    assert "12 min 34 s" in output
    assert "registered: brats-flair/1" in output
    assert "champion now: version 1" in output
    assert f"ui --backend-store-uri {searches['uri']}" in output
    assert searches["newer"] in output
    assert searches["best"] in output


def test_report_command_unknown_search_exits_2(searches: dict, capsys: pytest.CaptureFixture) -> None:
    code = main(["report", "no-such-search", "--tracking-uri", searches["uri"]])

    captured = capsys.readouterr()
    assert code == 2
    assert captured.out == ""
    assert "'no-such-search'" in captured.err
    assert searches["newer"] in captured.err


def test_missing_store_exits_2_uncreated(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "typo.db"

    code = main(["report", "brats-flair", "--tracking-uri", f"sqlite:///{missing}"])

    assert code == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not missing.exists()


# A real search


def test_report_of_a_real_search(search_run: dict, capsys: pytest.CaptureFixture) -> None:
    """The search of tests/platform/conftest.py (3 trials, 3 epochs on real BraTS cases)."""
    uri = search_run["tracking_uri"]
    client = MlflowClient(uri, registry_uri=uri)
    parent = find_search_run(client, "brats-flair")
    children = client.search_runs([parent.info.experiment_id], filter_string=f"tags.`{SEARCH_RUN_TAG}` = '{parent.info.run_id}'")

    code = main(["report", "brats-flair", "--tracking-uri", uri])

    output = capsys.readouterr().out
    assert code == 0
    assert parent.info.run_id in output
    assert all(child.data.tags[TRIAL_ID_TAG] in output for child in children)
    assert "of 3 requested" in output
    assert "registered: brats-flair/1" in output
    assert {"trials.csv", OPTUNA_TRIALS_FILE, OPTIMIZATION_HISTORY_FILE} <= _artifacts(client, parent.info.run_id)
