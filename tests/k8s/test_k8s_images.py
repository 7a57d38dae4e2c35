"""The Dockerfiles pin the same Python, torch, Ray, MLflow and Optuna versions that pyproject.toml allows."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from k8s_checks import REPO_ROOT

DOCKER_DIR = REPO_ROOT / "docker"
AEPLAT_DOCKERFILE = DOCKER_DIR / "aeplat.Dockerfile"
MLFLOW_DOCKERFILE = DOCKER_DIR / "mlflow.Dockerfile"
PINNED_PACKAGES = {"TORCH_VERSION": "torch", "RAY_VERSION": "ray", "MLFLOW_VERSION": "mlflow", "OPTUNA_VERSION": "optuna"}


def _build_args(dockerfile: Path) -> dict[str, str]:
    text = dockerfile.read_text(encoding="utf-8")
    return dict(re.findall(r"^ARG\s+([A-Z0-9_]+)=(\S+)\s*$", text, flags=re.MULTILINE))


def _base_images(dockerfile: Path) -> list[str]:
    return re.findall(r"^FROM\s+(\S+)", dockerfile.read_text(encoding="utf-8"), flags=re.MULTILINE)


def _project() -> dict:
    with (REPO_ROOT / "pyproject.toml").open("rb") as stream:
        return tomllib.load(stream)["project"]


def _specifier(package: str) -> SpecifierSet:
    for line in _project()["dependencies"]:
        requirement = Requirement(line)
        if requirement.name == package:
            return requirement.specifier
    raise AssertionError(f"{package} is not a dependency in pyproject.toml")


@pytest.mark.parametrize(("argument", "package"), PINNED_PACKAGES.items())
def test_aeplat_image_pins_match_pyproject(argument: str, package: str) -> None:
    version = _build_args(AEPLAT_DOCKERFILE)[argument]

    assert Version(version) in _specifier(package), f"{argument}={version} is outside {package}{_specifier(package)} of pyproject.toml"


def test_mlflow_image_matches_aeplat() -> None:
    server_version = _build_args(MLFLOW_DOCKERFILE)["MLFLOW_VERSION"]

    assert server_version == _build_args(AEPLAT_DOCKERFILE)["MLFLOW_VERSION"]
    assert Version(server_version) in _specifier("mlflow")
    assert {"PSYCOPG2_VERSION", "BOTO3_VERSION"} <= _build_args(MLFLOW_DOCKERFILE).keys()


@pytest.mark.parametrize("dockerfile", [AEPLAT_DOCKERFILE, MLFLOW_DOCKERFILE], ids=lambda path: path.name)
def test_python_base_pinned(dockerfile: Path) -> None:
    images = _base_images(dockerfile)
    match = re.fullmatch(r"python:(\d+\.\d+\.\d+)-slim-\w+", images[0])

    assert len(images) == 1
    assert match, f"{images[0]} is not a python:X.Y.Z-slim-<debian> image"
    assert Version(match.group(1)) in SpecifierSet(_project()["requires-python"])
    assert Version(match.group(1)).release[:2] == (3, 11)


@pytest.mark.parametrize("dockerfile", [AEPLAT_DOCKERFILE, MLFLOW_DOCKERFILE], ids=lambda path: path.name)
def test_image_user_not_root(dockerfile: Path) -> None:
    user = re.findall(r"^USER\s+(\S+)", dockerfile.read_text(encoding="utf-8"), flags=re.MULTILINE)[-1]
    user_id = _build_args(dockerfile)["USER_ID"]

    # A numeric user lets Kubernetes verify runAsNonRoot without reading /etc/passwd.
    assert user == "${USER_ID}:${USER_ID}"
    assert int(user_id) > 0


def test_image_users_match_manifests() -> None:
    from aeplat.platform import k8s

    assert int(_build_args(AEPLAT_DOCKERFILE)["USER_ID"]) == k8s.IMAGE_USER_ID
    assert "runAsUser: 1001" in (REPO_ROOT / "k8s" / "base" / "mlflow.yaml").read_text(encoding="utf-8")
    assert _build_args(MLFLOW_DOCKERFILE)["USER_ID"] == "1001"


def test_ray_version_matches_image() -> None:
    from aeplat.platform import k8s

    assert k8s.RAY_VERSION == _build_args(AEPLAT_DOCKERFILE)["RAY_VERSION"]
