"""A small autoencoder trained on one real BraTS case and registered as brats-flair@champion in SQLite."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from aeplat.data import BratsSettings, SliceSet, find_brats_cases, load_brats_case
from aeplat.data.brats import BratsCase
from aeplat.deploy import load_scoring_model
from aeplat.deploy.config import ServingConfig
from aeplat.platform.registry import log_scoring_model, register_model
from aeplat.trainers import ErrorMapModel, Trainer, TrainingConfig
from deploy_support import CASE_ID, CHAMPION_URI, IMAGE_SIZE, MODEL_NAME, tracking_store


@pytest.fixture(scope="session")
def brats_settings() -> BratsSettings:
    return BratsSettings(modality="flair", image_size=IMAGE_SIZE)


@pytest.fixture(scope="session")
def brats_case(brats_dir: Path) -> BratsCase:
    cases = {case.case_id: case for case in find_brats_cases(brats_dir, "flair")}
    if CASE_ID not in cases:
        pytest.skip(f"BraTS case {CASE_ID} is absent from {brats_dir}")
    return cases[CASE_ID]


@pytest.fixture(scope="session")
def case_slices(brats_case: BratsCase, brats_settings: BratsSettings) -> SliceSet:
    """The case's slices exactly as training prepares them."""
    return load_brats_case(brats_case, brats_settings)


@pytest.fixture(scope="session")
def trainer(case_slices: SliceSet) -> Trainer:
    """An autoencoder trained for two epochs on the case's normal slices."""
    config = TrainingConfig(latent_dim=8, hidden_dim=64, batch_size=16, lr=3e-3, seed=0)
    trainer = Trainer(config, image_size=IMAGE_SIZE, device="cpu")
    normal = case_slices.images[case_slices.labels == 0]
    for _ in range(2):
        trainer.train_epoch(normal)
    return trainer


@pytest.fixture(scope="session")
def registered_model(tmp_path_factory: pytest.TempPathFactory, trainer: Trainer, case_slices: SliceSet, brats_settings: BratsSettings) -> dict:
    """Log the trainer's model as the scoring model and register it as the champion in a SQLite store."""
    work = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    config = ServingConfig.from_brats("brats", brats_settings)

    with tracking_store(uri):
        client = MlflowClient(uri)
        experiment_id = client.create_experiment("deploy-tests", artifact_location=(work / "artifacts").as_uri())
        run_id = client.create_run(experiment_id).info.run_id
        model_uri = log_scoring_model(run_id, ErrorMapModel(trainer.model).eval(), case_slices.images[:2], config)
        client.set_terminated(run_id)
        registration = register_model(client, MODEL_NAME, model_uri, run_id, tags={"val_auc": 0.5}, val_auc=0.5)

    return {"work": work, "tracking_uri": uri, "model_uri": model_uri, "registration": registration}


@pytest.fixture(scope="session")
def scoring_model(registered_model: dict):
    """The champion loaded as an MLflow pyfunc model."""
    with tracking_store(registered_model["tracking_uri"]):
        return load_scoring_model(CHAMPION_URI, dst_path=registered_model["work"] / "download")


@pytest.fixture(scope="session")
def volume_path(brats_case: BratsCase) -> Path:
    return brats_case.images["flair"]

