"""Shared test settings: no telemetry, Ray on loopback only, and the location of real data."""

from __future__ import annotations

from pathlib import Path

import pytest

from aeplat.platform import env

# Ray and MLflow read these when first imported, so they are set before any test imports them.
env.apply_privacy_defaults()
env.bind_ray_to_loopback()

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """Folder of real scans and known-hard cases next to the repository; tests skip without it."""
    if not SHARED_DIR.is_dir():
        pytest.skip(f"real data folder {SHARED_DIR} is absent")
    return SHARED_DIR


@pytest.fixture(scope="session")
def brats_dir(shared_dir: Path) -> Path:
    folder = shared_dir / "data" / "brats"
    if not folder.is_dir():
        pytest.skip(f"BraTS sample {folder} is absent")
    return folder
