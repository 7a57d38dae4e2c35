from __future__ import annotations

from pathlib import Path

import optuna
import pytest

from aeplat.search_spaces import SearchSpaceError, available_spaces, load_search_space, parse_search_space

VALID = """
dataset: toy
parameters:
  latent_dim: {type: power_of_two, low: 2, high: 32}
  entropy_weight: {type: float, low: 1.0e-4, high: 1.0, log: true, include_zero: true}
  model: {type: categorical, choices: [ae]}
constants:
  hidden_dim: 64
"""


def _sample(space, count: int, seed: int = 0) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    return [space(study.ask()) for _ in range(count)]


def test_brats_space_ships_and_loads() -> None:
    assert "brats" in available_spaces()

    space = load_search_space("brats", "flair")

    names = {parameter.name for parameter in space.parameters}
    assert {"latent_dim", "entropy_weight", "lr"} <= names


def test_brats_latent_dims_are_powers_of_two() -> None:
    space = load_search_space("brats")

    values = {sample["latent_dim"] for sample in _sample(space, 200)}

    assert values <= {1, 2, 4, 8, 16, 32, 64, 128}
    assert {1, 128} <= values


def test_include_zero_reaches_zero_and_range() -> None:
    space = parse_search_space(VALID)

    weights = [sample["entropy_weight"] for sample in _sample(space, 100)]

    assert 0.0 in weights
    assert all(weight == 0.0 or 1e-4 <= weight <= 1.0 for weight in weights)


def test_constants_are_returned_with_samples() -> None:
    space = parse_search_space(VALID)

    sample = _sample(space, 1)[0]

    assert sample["hidden_dim"] == 64
    assert sample["model"] == "ae"


def test_training_values_drop_sampler_bookkeeping() -> None:
    space = parse_search_space(VALID)
    config = {"latent_dim_log2": 3, "latent_dim": 8, "entropy_weight_enabled": False, "entropy_weight": 0.0, "model": "ae", "hidden_dim": 64}

    values = space.training_values(config)

    assert values == {"latent_dim": 8, "entropy_weight": 0.0, "model": "ae", "hidden_dim": 64}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("parameters: {}", "non-empty"),
        ("parameters: {d: {type: nope, low: 1, high: 2}}", "supported types"),
        ("parameters: {d: {type: power_of_two, low: 3, high: 8}}", "not a power of two"),
        ("parameters: {w: {type: float, low: 0.0, high: 1.0, log: true}}", "must be > 0"),
        ("parameters: {w: {type: float, low: 2.0, high: 1.0}}", "low <= high"),
        ("parameters: {w: {type: float, low: 1.0}}", "missing 'high'"),
        ("parameters: {w: {type: float, low: 1, high: 2, step: 1}}", "not valid for type"),
        ("parameters: {m: {type: categorical, choices: []}}", "non-empty list"),
        ("parameters: {w: {type: float, low: 1, high: 2}}\nconstants: {w: 1}", "both as parameters and constants"),
        ("paramters: {}", "unknown top-level keys"),
        ("parameters: [", "invalid YAML"),
    ],
)
def test_invalid_space_rejected(text: str, message: str) -> None:
    with pytest.raises(SearchSpaceError, match=message):
        parse_search_space(text, source="space.yaml")


def test_missing_space_file_names_path(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"

    with pytest.raises(SearchSpaceError, match="nope.yaml"):
        load_search_space("brats", path=missing)


def test_unknown_dataset_lists_shipped_spaces() -> None:
    with pytest.raises(SearchSpaceError, match="brats"):
        load_search_space("mystery")


def test_shipped_spaces_pass_value_checks() -> None:
    from aeplat.platform.search import check_training_values

    for name in available_spaces():
        check_training_values(load_search_space(name))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("parameters: {latent_dim: {type: power_of_two, low: 2, high: 8}}\nconstants: {lr: -1.0}", "a constant is invalid: lr must be"),
        ("parameters: {lr: {type: categorical, choices: [0.001, -1.0]}}", "parameter 'lr' can take the invalid value -1.0"),
        ("parameters: {model: {type: categorical, choices: [ae, nope]}}", "parameter 'model' can take the invalid value 'nope'"),
        ("parameters: {batch_size: {type: int, low: 0, high: 64}}", "parameter 'batch_size' can take the invalid value 0"),
    ],
)
def test_invalid_training_values_rejected(text: str, expected: str) -> None:
    from aeplat.platform.search import check_training_values

    space = parse_search_space(f"dataset: brats\n{text}", source="space.yaml")

    with pytest.raises(SearchSpaceError) as raised:
        check_training_values(space)

    assert expected in str(raised.value)
    assert str(raised.value).startswith("space.yaml: ")
