"""`aeplat search` and `aeplat data inspect` on every 2-D adapter with real images, run as a user runs them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from dataset_layouts import CHEST_XRAY_PATIENT_PATTERN, build_rsna, build_vindr

pytestmark = pytest.mark.slow

RESULT = re.compile(r"best validation AUC (?P<val>[0-9.]+), test AUC (?P<test>[0-9.]+)")


def _real(shared_dir: Path, name: str) -> Path:
    folder = shared_dir / "data" / name
    if not folder.exists():
        pytest.skip(f"real data {folder} is absent")
    return folder


def _aeplat(work: Path, *arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "aeplat.platform.cli", *arguments]
    return subprocess.run(command, cwd=work, capture_output=True, text=True, timeout=600, env={**os.environ})


def _search(work: Path, dataset: str, data_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    return _aeplat(
        work, "search", "--dataset", dataset, "--data-dir", str(data_dir),
        "--image-size", "32", "--trials", "2", "--epochs", "2", "--grace-period", "1",
        "--max-concurrent", "2", "--max-train-images", "64",
        "--tracking-uri", f"sqlite:///{work / 'mlflow.db'}",
        "--cache-dir", str(work / "cache"), "--storage", str(work / "runs"),
        *extra,
    )  # fmt: skip


def _check_search(completed: subprocess.CompletedProcess, work: Path, dataset: str, model_name: str) -> MlflowClient:
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = RESULT.search(completed.stderr.replace("\n", " "))
    assert result is not None, completed.stderr[-2000:]
    assert 0.0 <= float(result["val"]) <= 1.0
    assert 0.0 <= float(result["test"]) <= 1.0

    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    assert client.get_model_version_by_alias(model_name, "champion").tags["dataset"] == dataset
    return client


def test_search_chest_xray_folder(shared_dir: Path, tmp_path: Path) -> None:
    source = _real(shared_dir, "chest_xray")
    data_dir = tmp_path / "chest_xray"
    for split, class_name, count in (("train", "NORMAL", 80), ("train", "PNEUMONIA", 40), ("test", "PNEUMONIA", 40)):
        (data_dir / split / class_name).mkdir(parents=True)
        for path in sorted((source / split / class_name).iterdir())[:count]:
            (data_dir / split / class_name / path.name).symlink_to(path)

    completed = _search(
        tmp_path, "folder", data_dir, "--normal-classes", "NORMAL", "--abnormal-classes", "PNEUMONIA",
        "--patient-id-pattern", CHEST_XRAY_PATIENT_PATTERN, "--dataset-name", "chest-xray",
    )  # fmt: skip

    _check_search(completed, tmp_path, "folder", "folder-chest-xray")


def test_search_brain_tumor(shared_dir: Path, tmp_path: Path) -> None:
    completed = _search(tmp_path, "brain-tumor", _real(shared_dir, "brain_tumor"))

    client = _check_search(completed, tmp_path, "brain-tumor", "brain-tumor-mri")
    assert "no patient ids" in completed.stderr
    version = client.get_model_version_by_alias("brain-tumor-mri", "champion")
    assert int(version.tags["latent_dim"]) in {1, 2, 4, 8, 16, 32, 64, 128}


def test_search_rsna_dicom(shared_dir: Path, tmp_path: Path) -> None:
    _real(shared_dir, "rsna")
    data_dir = build_rsna(shared_dir, tmp_path / "rsna")

    completed = _search(tmp_path, "rsna", data_dir)

    client = _check_search(completed, tmp_path, "rsna", "rsna-cxr")
    version = client.get_model_version_by_alias("rsna-cxr", "champion")
    assert int(version.tags["latent_dim"]) <= 64


def test_search_vindr_skips_bad_file(shared_dir: Path, tmp_path: Path) -> None:
    _real(shared_dir, "vindr")
    data_dir = build_vindr(shared_dir, tmp_path / "vindr", per_class=40)
    broken = sorted((data_dir / "train").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:300])

    completed = _search(tmp_path, "vindr", data_dir, "--on-bad-file", "skip")

    client = _check_search(completed, tmp_path, "vindr", "vindr-cxr")
    parent = next(run for run in client.search_runs([client.get_experiment_by_name("aeplat-vindr-cxr").experiment_id]) if run.data.tags.get("aeplat.kind") == "search")
    assert parent.data.metrics["skipped_files"] == 1
    assert "skipped_files.csv" in {item.path for item in client.list_artifacts(parent.info.run_id)}


def test_search_vindr_bad_file_fails_before_trials(shared_dir: Path, tmp_path: Path) -> None:
    _real(shared_dir, "vindr")
    data_dir = build_vindr(shared_dir, tmp_path / "vindr", per_class=5)
    broken = sorted((data_dir / "train").iterdir())[0]
    broken.write_bytes(broken.read_bytes()[:300])

    completed = _search(tmp_path, "vindr", data_dir)

    assert completed.returncode == 2
    assert f"train/{broken.name}" in completed.stderr
    assert "--on-bad-file skip" in completed.stderr
    assert not (tmp_path / "runs").exists()


def test_data_inspect_brain_tumor(shared_dir: Path, tmp_path: Path) -> None:
    sheet = tmp_path / "sheet.png"

    completed = _aeplat(
        tmp_path, "data", "inspect", "--dataset", "brain-tumor", "--data-dir", str(_real(shared_dir, "brain_tumor")),
        "--image-size", "32", "--cache-dir", str(tmp_path / "cache"), "--contact-sheet", str(sheet),
    )  # fmt: skip

    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "Images per split and class" in completed.stdout + completed.stderr
    assert sheet.stat().st_size > 0


def test_modality_rejected_for_rsna(tmp_path: Path) -> None:
    completed = _aeplat(tmp_path, "data", "prepare", "--dataset", "rsna", "--data-dir", str(tmp_path), "--modality", "t2")

    assert completed.returncode == 2
    assert "--modality applies to --dataset brats only" in completed.stderr
