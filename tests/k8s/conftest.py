"""Fixtures of the manifest tests: the KubeRay schemas and the manifests under k8s/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from k8s_checks import K8S_DIR, Manifest, build_kustomization

OVERLAYS = ("dev", "gpu")


@pytest.fixture(scope="session")
def ray_schema_dir(shared_dir: Path) -> Path:
    """Folder of the KubeRay v1.7.0 CRD schemas (openAPIV3Schema as JSON); tests skip without it."""
    folder = shared_dir / "k8s-schemas" / "kuberay-v1.7.0"
    if not (folder / "rayjob_v1.json").is_file():
        pytest.skip(f"KubeRay v1.7.0 schemas are absent from {folder}")
    return folder


@pytest.fixture(scope="session")
def built_overlays() -> dict[str, list[Manifest]]:
    """Every overlay under k8s/overlays, built with `kubectl kustomize`; tests skip without kubectl."""
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl (which includes kustomize) is not on PATH, so overlays cannot be built")
    return {name: build_kustomization(K8S_DIR / "overlays" / name) for name in OVERLAYS}
