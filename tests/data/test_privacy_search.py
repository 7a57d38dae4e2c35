"""Patient identifiers in DICOM headers never reach logs, MLflow or the cache, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicom_factory import write_dicom

MARKER = b"MARKERPHI"
PATIENTS = 6


def _chest_pixels(folder: Path, count: int) -> list[np.ndarray]:
    files = sorted(folder.glob("*.jpeg"))[:count]
    return [np.asarray(Image.open(path).convert("L").resize((64, 64))) for path in files]


def _write_marked_dataset(root: Path, chest_dir: Path) -> None:
    normal = _chest_pixels(chest_dir / "train" / "NORMAL", PATIENTS * 4)
    abnormal = _chest_pixels(chest_dir / "train" / "PNEUMONIA", PATIENTS * 2)
    for label, images, per_patient in (("NORMAL", normal, 4), ("PNEUMONIA", abnormal, 2)):
        (root / label).mkdir(parents=True)
        for index, pixels in enumerate(images):
            patient = index // per_patient
            write_dicom(
                root / label / f"image_{label.lower()}_{index:03d}.dcm",
                pixels.astype(np.uint8),
                patient_id=f"MARKERPHI-ID-{patient:03d}",
                PatientName=f"MARKERPHI^NAME{patient}",
                PatientBirthDate="19010101",
                InstitutionName="MARKERPHI HOSPITAL",
                ReferringPhysicianName="MARKERPHI^DOCTOR",
                AccessionNumber=f"MARKERPHI{index}",
            )


def _files_containing_marker(folder: Path) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and MARKER in path.read_bytes()]


def test_identifiers_never_leave_dicom_headers(shared_dir: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "dicoms"
    _write_marked_dataset(data_dir, shared_dir / "data" / "chest_xray")
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "AEPLAT_CACHE_DIR": str(work / "cache")}
    data_options = [
        "--dataset", "folder", "--data-dir", str(data_dir),
        "--normal-classes", "NORMAL", "--abnormal-classes", "PNEUMONIA", "--image-size", "32",
        "--validation-fraction", "0.34", "--test-fraction", "0.34",
    ]  # fmt: skip
    commands = [
        [sys.executable, "-m", "aeplat.platform.cli", "-v", "data", "prepare", *data_options],
        [
            sys.executable, "-m", "aeplat.platform.cli", "-v", "search", *data_options,
            "--trials", "1", "--epochs", "1", "--grace-period", "1",
            "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}", "--storage", str(work / "runs"),
        ],
    ]  # fmt: skip

    assert len(_files_containing_marker(data_dir)) == PATIENTS * 6, "the markers must be findable in the source files"

    outputs = []
    for command in commands:
        completed = subprocess.run(command, cwd=work, env=env, capture_output=True, timeout=600)
        outputs.append(completed.stdout + completed.stderr)
        assert completed.returncode == 0, completed.stderr.decode(errors="replace")[-3000:]

    assert all(MARKER not in output for output in outputs)
    assert (work / "mlflow.db").is_file()
    assert any((work / "cache").iterdir())
    assert _files_containing_marker(work) == []
