"""Registration and the champion alias against a real SQLite MLflow store."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from aeplat.deploy import load_error_map_model, load_scoring_model, score_images
from aeplat.deploy.config import ServingConfig
from aeplat.platform.registry import CHAMPION_ALIAS, current_champion, log_scoring_model, logged_model_id, register_model

CONFIG = ServingConfig(dataset="toy", modality="flair", image_size=16, lower_percentile=0.5, upper_percentile=99.5, min_brain_fraction=0.0)


class HalfGreyError(torch.nn.Module):
    """Stands in for a trained model: the error map is the squared distance to mid grey."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return (images - 0.5) ** 2


@pytest.fixture()
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    # The Default experiment stores artifacts under ./mlruns of the working directory.
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return MlflowClient(uri)


def _log_and_register(client: MlflowClient, val_auc: float):
    experiment_id = client.get_experiment_by_name("Default").experiment_id
    run = client.create_run(experiment_id)
    client.set_terminated(run.info.run_id)
    example = np.full((2, 1, 16, 16), 0.25, dtype=np.float32)
    uri = log_scoring_model(run.info.run_id, HalfGreyError(), example, CONFIG)
    return register_model(client, "toy-flair", uri, run.info.run_id, tags={"val_auc": val_auc}, val_auc=val_auc)


def test_champion_moves_only_to_better_model(client: MlflowClient) -> None:
    first = _log_and_register(client, 0.70)
    worse = _log_and_register(client, 0.60)
    better = _log_and_register(client, 0.80)

    assert first.is_champion
    assert not worse.is_champion
    assert worse.previous_champion_version == first.version
    assert better.is_champion
    assert better.previous_champion_val_auc == pytest.approx(0.70)
    assert current_champion(client, "toy-flair") == (better.version, pytest.approx(0.80))
    assert str(client.get_model_version_by_alias("toy-flair", CHAMPION_ALIAS).version) == better.version


def test_registered_model_scores_any_batch_size(client: MlflowClient, tmp_path: Path) -> None:
    _log_and_register(client, 0.7)

    model = load_error_map_model("models:/toy-flair@champion", dst_path=tmp_path / "download")
    scores, maps = score_images(model, np.zeros((5, 1, 16, 16), dtype=np.float32))

    assert maps.shape == (5, 1, 16, 16)
    assert scores == pytest.approx(np.full(5, 0.25))


def test_registered_pyfunc_resizes_and_scores(client: MlflowClient, tmp_path: Path) -> None:
    _log_and_register(client, 0.7)

    model = load_scoring_model("models:/toy-flair@champion", dst_path=tmp_path / "pyfunc")
    output = model.predict(np.zeros((3, 40, 24), dtype=np.float32))

    assert output["error_map"].shape == (3, 1, 16, 16)
    assert output["score"] == pytest.approx(np.full(3, 0.25))
    assert output["input_index"].tolist() == [0, 1, 2]


def test_logged_model_id_parsed_from_uri() -> None:
    assert logged_model_id("models:/m-0123456789abcdef0123456789abcdef") == "m-0123456789abcdef0123456789abcdef"
    assert logged_model_id("models:/brats-flair/3") is None
    assert logged_model_id("runs:/abc/model") is None


def test_example_needs_two_images(client: MlflowClient) -> None:
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)

    with pytest.raises(ValueError, match="N>=2"):
        log_scoring_model(run.info.run_id, HalfGreyError(), np.zeros((1, 1, 16, 16), dtype=np.float32), CONFIG)
