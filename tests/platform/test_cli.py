from __future__ import annotations

from pathlib import Path

import pytest

from aeplat.platform.cli import build_parser, main, settings_from_args
from aeplat.platform.settings import SearchSettings, SettingsError


def _help_text() -> str:
    parser = build_parser()
    search = parser._subparsers._group_actions[0].choices["search"]
    return search.format_help()


def test_search_help_documents_every_option() -> None:
    text = _help_text()

    for option in (
        "--dataset",
        "--data-dir",
        "--modality",
        "--image-size",
        "--trials",
        "--max-concurrent",
        "--epochs",
        "--cpus-per-trial",
        "--gpus-per-trial",
        "--seed",
        "--ray-address",
        "--tracking-uri",
        "--search-space",
    ):
        assert option in text


def test_search_help_gives_units_and_defaults() -> None:
    text = " ".join(_help_text().split())

    assert "in pixels" in text
    assert "(default: 64)" in text
    assert "(default: 20)" in text
    assert "fractions such as 0.25" in text


def test_settings_from_arguments() -> None:
    args = build_parser().parse_args(
        ["search", "--dataset", "brats", "--data-dir", "cases", "--trials", "3", "--epochs", "2", "--gpus-per-trial", "0.25"]
    )

    settings = settings_from_args(args)

    assert settings.trials == 3
    assert settings.grace_period == 2
    assert settings.gpus_per_trial == 0.25
    assert settings.registered_model_name == "brats-flair"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"trials": 0}, "--trials"),
        ({"epochs": 0}, "--epochs"),
        ({"gpus_per_trial": 1.5}, "whole number"),
        ({"cpus_per_trial": 0}, "--cpus-per-trial"),
        ({"grace_period": 50, "epochs": 10}, "--grace-period"),
        ({"modality": "dwi"}, "--modality"),
        ({"dataset": "mnist"}, "--dataset"),
    ],
)
def test_invalid_settings_rejected(change: dict, message: str) -> None:
    settings = SearchSettings(**{"dataset": "brats", "data_dir": Path("x"), **change})

    with pytest.raises(SettingsError, match=message):
        settings.validate()


def test_missing_data_dir_fails_with_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-folder"

    code = main(["search", "--dataset", "brats", "--data-dir", str(missing), "--cache-dir", str(tmp_path / "cache")])

    assert code == 2
    assert "no-such-folder" in capsys.readouterr().err


def test_repeats_option_reaches_settings() -> None:
    args = build_parser().parse_args(["search", "--dataset", "brats", "--data-dir", "data", "--repeats", "3"])

    assert settings_from_args(args).repeats == 3
    assert "--repeats" in _help_text()


def test_combined_seed_metrics() -> None:
    from aeplat.platform.trainable import _combine_seeds

    combined = _combine_seeds([{"val_auc": 0.6, "train_loss": 1.0}, {"val_auc": 0.8, "train_loss": 3.0}], seeds=[5, 6])

    assert combined["val_auc"] == pytest.approx(0.7)
    assert combined["val_auc_std"] == pytest.approx(0.1)
    assert combined["train_loss"] == pytest.approx(2.0)
    assert combined["seed_6/val_auc"] == 0.8
