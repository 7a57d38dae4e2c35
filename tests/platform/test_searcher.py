"""TolerantOptunaSearch proposes every configuration once and ends an exhausted space, called as Ray Tune calls it."""

from __future__ import annotations

import logging

import optuna
import pytest
from ray.tune.search import Searcher

pytest.importorskip("ray")

from aeplat.platform.runner import TolerantOptunaSearch  # noqa: E402
from aeplat.search_spaces import parse_search_space  # noqa: E402

SPACE = """
dataset: brats
parameters:
  latent_dim:
    type: power_of_two
    low: 4
    high: 32
constants:
  model: ae
"""


def _searcher(seed: int = 0) -> TolerantOptunaSearch:
    return TolerantOptunaSearch(
        space=parse_search_space(SPACE),
        metric="best_val_auc",
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=seed, multivariate=True),
    )


def _complete(searcher: TolerantOptunaSearch, trial_id: str, value: float) -> None:
    searcher.on_trial_result(trial_id, {"best_val_auc": value, "training_iteration": 1})
    searcher.on_trial_complete(trial_id, {"best_val_auc": value, "training_iteration": 1})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finished_configurations_are_not_proposed_again(seed: int) -> None:
    searcher = _searcher(seed)

    latent_dims = []
    for number in range(4):
        config = searcher.suggest(f"trial-{number}")
        latent_dims.append(config["latent_dim"])
        _complete(searcher, f"trial-{number}", 0.5 + 0.1 * number)

    assert sorted(latent_dims) == [4, 8, 16, 32]


def test_running_configurations_are_not_proposed_again() -> None:
    searcher = _searcher()

    latent_dims = [searcher.suggest(f"trial-{number}")["latent_dim"] for number in range(4)]

    assert sorted(latent_dims) == [4, 8, 16, 32]


def test_repeated_proposal_told_earlier_value() -> None:
    searcher = _searcher()
    searcher.suggest("trial-0")
    _complete(searcher, "trial-0", 0.75)

    for number in range(1, 4):
        searcher.suggest(f"trial-{number}")

    study = searcher._ot_study
    first = study.trials[0]
    repeats = [trial for trial in study.trials[1:] if trial.params == first.params]
    assert repeats, "the sampler never proposed the first configuration again, so nothing was checked"
    assert all(trial.state == optuna.trial.TrialState.COMPLETE and trial.value == 0.75 for trial in repeats)


def test_exhausted_space_ends_the_search(caplog: pytest.LogCaptureFixture) -> None:
    searcher = _searcher()
    for number in range(4):
        searcher.suggest(f"trial-{number}")
        _complete(searcher, f"trial-{number}", 0.6)

    with caplog.at_level(logging.INFO, logger="aeplat.platform.runner"):
        config = searcher.suggest("trial-4")

    assert config == Searcher.FINISHED
    assert "Every configuration of the search space (4 in all)" in caplog.text
    running = searcher._ot_study.get_trials(states=(optuna.trial.TrialState.RUNNING,))
    assert running == [], "the last repeated proposal stayed open in the study"


def test_failed_configurations_are_not_proposed_again() -> None:
    searcher = _searcher()
    first = searcher.suggest("trial-0")
    searcher.on_trial_complete("trial-0", None, error=True)

    later = []
    for number in range(1, 4):
        later.append(searcher.suggest(f"trial-{number}")["latent_dim"])
        _complete(searcher, f"trial-{number}", 0.6)

    assert first["latent_dim"] not in later
    assert sorted([first["latent_dim"], *later]) == [4, 8, 16, 32]
    assert searcher.suggest("trial-4") == Searcher.FINISHED


def test_running_configurations_count_as_tried() -> None:
    searcher = _searcher()
    for number in range(4):
        searcher.suggest(f"trial-{number}")

    assert searcher.suggest("trial-4") == Searcher.FINISHED


@pytest.mark.parametrize(
    ("parameters", "size"),
    [
        ("  d:\n    type: power_of_two\n    low: 4\n    high: 32\n", 4),
        ("  d:\n    type: power_of_two\n    low: 4\n    high: 32\n  m:\n    type: categorical\n    choices: [ae, vae, ceae]\n", 12),
        ("  n:\n    type: int\n    low: 2\n    high: 6\n", 5),
        ("  lr:\n    type: float\n    low: 0.0001\n    high: 0.01\n    log: true\n", None),
        ("  lam:\n    type: float\n    low: 0.5\n    high: 0.5\n    include_zero: true\n", 2),
    ],
)
def test_search_space_size(parameters: str, size: int | None) -> None:
    assert parse_search_space(f"dataset: brats\nparameters:\n{parameters}").size() == size
