"""A real search logs over HTTP to an MLflow server on PostgreSQL with artifacts in a local S3 server.

The test run starts every service itself on 127.0.0.1: a throwaway PostgreSQL cluster, moto's
S3 server and `mlflow server --serve-artifacts`. The search's champion then loads from that
server and scores the held-out test split to the test AUC that the search logged.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import numpy as np
import pytest
from deploy_support import CHAMPION_URI, MODEL_NAME, tracking_store
from local_services import (
    AWS_TEST_CREDENTIALS,
    PostgresCluster,
    postgres_bin_dir,
    skip_or_fail,
    start_mlflow_server,
    start_moto_server,
)
from mlflow.tracking import MlflowClient

from aeplat.deploy import load_scoring_model
from aeplat.platform.search import prepare_splits
from aeplat.platform.settings import SearchSettings
from aeplat.trainers import image_metrics

pytestmark = pytest.mark.slow

CASES = ("BraTS2021_00006", "Brats18_2013_3_1", "Brats18_CBICA_ABM_1")
BUCKET = "aeplat-test"
ARTIFACT_PREFIX = "mlflow"
IMAGE_SIZE = 32


@pytest.fixture(scope="module")
def postgres() -> PostgresCluster:
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        skip_or_fail("PostgreSQL binaries (initdb, postgres) are not installed; on Debian run `apt-get install postgresql`")
    cluster = PostgresCluster(bin_dir)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    server, endpoint = start_moto_server(tmp_path_factory.mktemp("moto"))
    try:
        _s3_client(endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
    finally:
        server.stop()


@pytest.fixture(scope="module")
def tracking_server(postgres: PostgresCluster, s3_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    log_dir = tmp_path_factory.mktemp("mlflow-server")
    server, url = start_mlflow_server(postgres.uri, f"s3://{BUCKET}/{ARTIFACT_PREFIX}", s3_endpoint, log_dir)
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def brats_subset(brats_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("server-brats")
    data_dir = work / "brats"
    data_dir.mkdir()
    for case in CASES:
        (data_dir / case).symlink_to(brats_dir / case, target_is_directory=True)
    return {"data_dir": data_dir, "cache_dir": work / "cache", "work": work}


@pytest.fixture(scope="module")
def server_search(tracking_server: str, brats_subset: dict) -> dict:
    """Run `aeplat search` with --tracking-uri of the MLflow server, as a user would."""
    command = [
        sys.executable, "-m", "aeplat.platform.cli", "search",
        "--dataset", "brats", "--data-dir", str(brats_subset["data_dir"]), "--modality", "flair",
        "--image-size", str(IMAGE_SIZE), "--trials", "2", "--epochs", "2", "--grace-period", "1",
        "--max-concurrent", "2",
        "--tracking-uri", tracking_server,
        "--cache-dir", str(brats_subset["cache_dir"]), "--storage", str(brats_subset["work"] / "runs"),
    ]  # fmt: skip
    # The client needs no S3 credentials: the server stores the artifacts it receives over HTTP.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("MLFLOW_TRACKING", "MLFLOW_REGISTRY", "AWS_"))}

    completed = subprocess.run(command, cwd=brats_subset["work"], capture_output=True, text=True, timeout=600, env=env)

    assert completed.returncode == 0, completed.stderr[-4000:]
    return {"tracking_uri": tracking_server, "output": completed.stderr}


def _s3_client(endpoint: str):
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=AWS_TEST_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS_TEST_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        region_name=AWS_TEST_CREDENTIALS["AWS_DEFAULT_REGION"],
    )


def _parent_run(client: MlflowClient):
    experiment = client.get_experiment_by_name("aeplat-brats-flair")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`aeplat.kind` = 'search'")
    assert len(runs) == 1
    return runs[0]


def test_champion_registered_in_postgres(server_search: dict, postgres: PostgresCluster) -> None:
    import psycopg2

    client = MlflowClient(server_search["tracking_uri"])
    champion = client.get_model_version_by_alias(MODEL_NAME, "champion")

    connection = psycopg2.connect(postgres.uri.replace("postgresql+psycopg2://", "postgresql://"))
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT name, version FROM model_versions")
            versions = cursor.fetchall()
            cursor.execute("SELECT name, alias, version FROM registered_model_aliases")
            aliases = cursor.fetchall()
    finally:
        connection.close()
    assert versions == [(MODEL_NAME, int(champion.version))]
    assert aliases == [(MODEL_NAME, "champion", int(champion.version))]


def test_artifacts_stored_in_s3(server_search: dict, s3_endpoint: str) -> None:
    listing = _s3_client(s3_endpoint).list_objects_v2(Bucket=BUCKET, Prefix=f"{ARTIFACT_PREFIX}/")
    keys = [item["Key"] for item in listing.get("Contents", [])]

    assert any(key.endswith("/MLmodel") for key in keys), keys[:20]
    assert any(key.endswith("/model.pt2") for key in keys), keys[:20]
    assert any(key.endswith("/serving_config.json") for key in keys), keys[:20]
    assert any(key.endswith("/trials.csv") for key in keys), keys[:20]


def test_served_champion_reproduces_test_auc(server_search: dict, brats_subset: dict, tmp_path: Path) -> None:
    client = MlflowClient(server_search["tracking_uri"])
    logged_test_auc = _parent_run(client).data.metrics["test_auc"]
    settings = SearchSettings(
        dataset="brats",
        data_dir=brats_subset["data_dir"],
        modality="flair",
        image_size=IMAGE_SIZE,
        cache_dir=brats_subset["cache_dir"],
    )
    splits, _ = prepare_splits(settings)

    with tracking_store(server_search["tracking_uri"]):
        model = load_scoring_model(CHAMPION_URI, dst_path=tmp_path / "champion")
    scores = model.predict(splits.test.images)["score"]

    assert scores.shape == (len(splits.test),)
    assert np.all(np.isfinite(scores))
    assert image_metrics(splits.test.labels, scores)["auc"] == pytest.approx(logged_test_auc, abs=1e-6)
