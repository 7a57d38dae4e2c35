"""Fixtures for the data tests: the known-hard NIfTI cases and writable copies of them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

SYNTHETIC_CASE_ID = "BraTS2021_99999"


def _require(path: Path, description: str) -> Path:
    if not path.is_dir():
        pytest.skip(f"{description} {path} is absent")
    return path


@pytest.fixture
def synthetic_cases_dir(shared_dir: Path) -> Path:
    """Folder with one small BraTS 2021-style case of 48x48x32 voxels."""
    case_dir = _require(shared_dir / "cases" / "nifti" / "brats2021_like" / SYNTHETIC_CASE_ID, "synthetic BraTS case")
    return case_dir.parent


@pytest.fixture
def synthetic_case_copy(tmp_path: Path, synthetic_cases_dir: Path) -> Path:
    """A writable copy of the synthetic cases folder, for tests that change files."""
    data_dir = tmp_path / "brats"
    shutil.copytree(synthetic_cases_dir / SYNTHETIC_CASE_ID, data_dir / SYNTHETIC_CASE_ID)
    return data_dir


@pytest.fixture
def mismatch_dir(shared_dir: Path) -> Path:
    """Image with an LPS affine and a mask with an RAS affine covering the same world positions."""
    return _require(shared_dir / "cases" / "nifti" / "seg_voxel_order_mismatch", "orientation mismatch case")
