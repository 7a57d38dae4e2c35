"""Patient keys, the salt file, and that no patient identifier leaks from DICOM decoding."""

from __future__ import annotations

import logging
import stat
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import write_dicom
from PIL import Image
from pydicom.datadict import keyword_dict

from aeplat.data.dicom import METADATA_ATTRIBUTES, BadFileError, decode_dicom, read_dataset
from aeplat.data.images import read_image
from aeplat.data.privacy import (
    MIN_SALT_BYTES,
    PHI_ATTRIBUTES,
    SALT_ENV,
    SALT_FILE_NAME,
    load_or_create_salt,
    pseudonymize,
)

SALT = b"test-salt-of-32-bytes-0123456789"
MARKER = "MARKER"

# Fake identifiers: every value contains MARKER except the birth date, which must be a valid DA.
BIRTH_DATE = "19230405"
PHI_VALUES = {
    "PatientName": "MARKER^PHI",
    "PatientID": "MARKERID123",
    "OtherPatientIDs": "MARKEROTHERID",
    "PatientBirthDate": BIRTH_DATE,
    "PatientAddress": "MARKER STREET 1",
    "InstitutionName": "MARKER HOSPITAL",
    "ReferringPhysicianName": "MARKER^DOCTOR",
    "AccessionNumber": "MARKERACC9",
    "StudyID": "MARKERSTUDY",
    "StudyDescription": "MARKER CHEST",
}


@pytest.fixture(autouse=True)
def no_salt_in_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SALT_ENV, raising=False)


@pytest.fixture
def real_pixels(shared_dir: Path) -> np.ndarray:
    files = sorted((shared_dir / "data" / "rsna" / "nih_png_64px").glob("*/*/*.png"))
    if not files:
        pytest.skip("no NIH PNG images under data/rsna/nih_png_64px")
    with Image.open(files[0]) as image:
        return np.asarray(image.convert("L"), dtype=np.uint8)


@pytest.fixture
def marked_dicom(tmp_path: Path, real_pixels: np.ndarray) -> Path:
    """A DICOM of a real radiograph with fake identifiers and private tags that contain them."""
    attributes = {keyword: value for keyword, value in PHI_VALUES.items() if keyword != "PatientID"}
    path = write_dicom(
        tmp_path / "marked.dcm", real_pixels, patient_id=PHI_VALUES["PatientID"], Modality="CR", **attributes
    )

    dataset = pydicom.dcmread(path)
    block = dataset.private_block(0x0011, "MARKER PRIVATE CREATOR", create=True)
    block.add_new(0x01, "LO", "MARKER PRIVATE NAME")
    block.add_new(0x02, "LO", "MARKERID123")
    dataset.save_as(path)
    return path


def _leaks(text: str) -> bool:
    return MARKER in text.upper() or BIRTH_DATE in text


def _logged_text(records: list[logging.LogRecord]) -> str:
    return "\n".join(record.getMessage() for record in records)


# Pseudonymization.


def test_pseudonymize_format() -> None:
    key = pseudonymize("patient-1", SALT)
    assert key.startswith("p-")
    assert len(key) == 18
    assert all(character in "0123456789abcdef" for character in key[2:])


def test_pseudonymize_stable_and_salted() -> None:
    assert pseudonymize("patient-1", SALT) == pseudonymize("patient-1", SALT)
    assert pseudonymize("patient-1", SALT) != pseudonymize("patient-2", SALT)
    assert pseudonymize("patient-1", SALT) != pseudonymize("patient-1", SALT[::-1])


def test_pseudonymize_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="empty"):
        pseudonymize("", SALT)
    with pytest.raises(ValueError, match="at least 16"):
        pseudonymize("patient-1", b"short")


# The salt file and the environment variable.


def test_salt_file_created_once(tmp_path: Path) -> None:
    first = load_or_create_salt(tmp_path / "cache")
    second = load_or_create_salt(tmp_path / "cache")
    path = tmp_path / "cache" / SALT_FILE_NAME

    assert first == second
    assert len(first) == 64
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert not [name for name in path.parent.iterdir() if name.name.endswith(".tmp")]


def test_existing_salt_file_kept(tmp_path: Path) -> None:
    path = tmp_path / SALT_FILE_NAME
    path.write_bytes(b"an-existing-salt-value-of-enough-length\n")
    path.chmod(0o600)
    assert load_or_create_salt(tmp_path) == b"an-existing-salt-value-of-enough-length"


def test_environment_salt_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SALT_ENV, "salt-from-the-environment-0123")
    assert load_or_create_salt(tmp_path) == b"salt-from-the-environment-0123"
    assert not (tmp_path / SALT_FILE_NAME).exists()


def test_short_salts_rejected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / SALT_FILE_NAME).write_bytes(b"x" * (MIN_SALT_BYTES - 1))
    with pytest.raises(ValueError, match=SALT_FILE_NAME):
        load_or_create_salt(tmp_path)

    monkeypatch.setenv(SALT_ENV, "short")
    with pytest.raises(ValueError, match=SALT_ENV):
        load_or_create_salt(tmp_path)


def test_readable_salt_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / SALT_FILE_NAME
    path.write_bytes(b"a-salt-that-others-can-read-0123")
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="aeplat.data.privacy"):
        load_or_create_salt(tmp_path)
    assert "chmod 600" in caplog.text
    assert "a-salt-that-others-can-read" not in caplog.text


def test_default_salt_in_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AEPLAT_CACHE_DIR", str(tmp_path / "cache"))
    path = write_dicom(tmp_path / "image.dcm", np.array([[0, 255]], dtype=np.uint8), patient_id="patient-7")
    decoded = decode_dicom(path)
    salt = (tmp_path / "cache" / SALT_FILE_NAME).read_bytes()
    assert decoded.patient_key == pseudonymize("patient-7", salt)


# The attribute lists.


def test_phi_attributes_are_dicom_keywords() -> None:
    unknown = [keyword for keyword in PHI_ATTRIBUTES if keyword not in keyword_dict]
    assert unknown == []
    assert len(set(PHI_ATTRIBUTES)) == len(PHI_ATTRIBUTES)


def test_metadata_allow_list_has_no_phi() -> None:
    assert set(METADATA_ATTRIBUTES).isdisjoint(PHI_ATTRIBUTES)


# No identifier leaks from decoding.


def test_marked_file_has_identifiers(marked_dicom: Path) -> None:
    dataset = pydicom.dcmread(marked_dicom)
    assert str(dataset.PatientName) == "MARKER^PHI"
    assert dataset.PatientID == "MARKERID123"
    assert dataset.PatientBirthDate == BIRTH_DATE
    assert dataset[0x0011, 0x1001].value == "MARKER PRIVATE NAME"


def test_decode_leaks_no_identifier(marked_dicom: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")
    with warnings.catch_warnings(record=True) as caught_warnings:
        warnings.simplefilter("always")
        decoded = decode_dicom(marked_dicom, salt=SALT)
        via_read_image = read_image(marked_dicom, salt=SALT)

    assert decoded.patient_key == pseudonymize("MARKERID123", SALT)
    assert via_read_image.patient_key == decoded.patient_key
    assert not _leaks(repr(decoded))
    assert not _leaks(str(dict(decoded.metadata)))
    assert not _leaks(decoded.patient_key)
    assert not _leaks(_logged_text(caplog.records))
    assert not _leaks("\n".join(str(warning.message) for warning in caught_warnings))
    assert set(decoded.metadata) <= {"TransferSyntaxUID", *METADATA_ATTRIBUTES}
    assert decoded.pixels.shape == (64, 64)


def test_errors_leak_no_identifier(marked_dicom: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    caplog.set_level(logging.DEBUG, logger="pydicom")

    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(marked_dicom.read_bytes()[:-1000])

    header_only = tmp_path / "header_only.dcm"
    dataset = read_dataset(marked_dicom)
    del dataset.PixelData
    dataset.save_as(header_only)

    bad_window = tmp_path / "bad_window.dcm"
    dataset = read_dataset(marked_dicom)
    dataset.WindowCenter = 100
    dataset.WindowWidth = 0
    dataset.save_as(bad_window)

    messages = []
    for path in (truncated, header_only):
        with pytest.raises(BadFileError) as caught:
            decode_dicom(path, salt=SALT)
        messages.append(str(caught.value))
    decode_dicom(bad_window, salt=SALT)

    assert not _leaks("\n".join(messages))
    assert not _leaks(_logged_text(caplog.records))
    assert "Ignoring window" in caplog.text
