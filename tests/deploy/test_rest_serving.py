"""`mlflow models serve` on the champion returns the scores of Trainer.score to real HTTP requests."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest
import requests
from deploy_support import CHAMPION_URI, TOLERANCE
from local_services import start_model_server

REQUEST_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def model_server(registered_model: dict, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Serve brats-flair@champion from the SQLite registry on a free port of 127.0.0.1."""
    log_dir = tmp_path_factory.mktemp("model-server")
    server, url = start_model_server(CHAMPION_URI, registered_model["tracking_uri"], log_dir)
    yield url
    server.stop()


def _invoke(url: str, payload: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", json=payload, timeout=REQUEST_TIMEOUT_S)


def test_server_answers_ping_and_health(model_server: str) -> None:
    assert requests.get(f"{model_server}/ping", timeout=REQUEST_TIMEOUT_S).status_code == 200
    assert requests.get(f"{model_server}/health", timeout=REQUEST_TIMEOUT_S).status_code == 200


def test_rest_array_scores_equal_trainer(model_server: str, trainer, case_slices) -> None:
    images = case_slices.images[30:50]

    response = _invoke(model_server, {"inputs": images.tolist()})

    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    np.testing.assert_allclose(predictions["score"], trainer.score(images), rtol=0, atol=TOLERANCE)
    assert np.asarray(predictions["error_map"]).shape == (20, 1, 32, 32)
    assert predictions["slice_index"] == [-1] * 20


def test_rest_volume_scores_equal_training_slices(model_server: str, trainer, case_slices, volume_path: Path) -> None:
    encoded = base64.b64encode(volume_path.read_bytes()).decode("ascii")

    response = _invoke(model_server, {"dataframe_split": {"columns": ["image"], "data": [[encoded]]}})

    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert predictions["slice_index"] == case_slices.slice_indices.tolist()
    np.testing.assert_allclose(predictions["score"], trainer.score(case_slices.images), rtol=0, atol=TOLERANCE)


def test_rest_rejects_unreadable_file(model_server: str) -> None:
    encoded = base64.b64encode(b"this is not an image").decode("ascii")

    response = _invoke(model_server, {"inputs": {"image": [encoded]}})

    assert response.status_code == 400
    assert "not a PNG, JPEG, DICOM" in response.json()["message"]
