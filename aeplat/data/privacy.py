"""Patient privacy: pseudonymous patient keys and the DICOM attributes that identify a patient.

A patient key is an HMAC-SHA256 of the patient identifier under a secret salt. The same
identifier and salt always give the same key, so patient-disjoint splits still work, but
without the salt a guessed identifier cannot be checked against a key.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)

SALT_ENV = "AEPLAT_PATIENT_SALT"
SALT_FILE_NAME = "patient-salt"

# The salt file stores this many random bytes as hex text.
SALT_RANDOM_BYTES = 32

# A salt shorter than this is easy to brute-force, so it is rejected.
MIN_SALT_BYTES = 16

PATIENT_KEY_PREFIX = "p-"

# 16 hex digits are 64 bits: among one million patients the chance that two share a key is
# about 3e-8.
PATIENT_KEY_HEX_DIGITS = 16

# DICOM keywords of attributes that identify a patient, directly or by linking to other
# records. They are a selection from the Basic Application Level Confidentiality Profile,
# DICOM PS3.15 Annex E, Table E.1-1: patient identity and demographics, people and
# institutions, study and accession identifiers, free-text descriptions, and acquisition
# dates and times. aeplat never copies these values: image metadata is built from an
# allow-list of technical attributes, and this list serves tests that check that none of
# these values leaks. Private attributes (odd group numbers) may also hold identifiers
# and are never copied either.
PHI_ATTRIBUTES: tuple[str, ...] = (
    # Patient identity and demographics.
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "OtherPatientIDs",
    "OtherPatientIDsSequence",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientBirthTime",
    "PatientAge",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "CountryOfResidence",
    "RegionOfResidence",
    "MilitaryRank",
    "BranchOfService",
    "MedicalRecordLocator",
    "EthnicGroup",
    "Occupation",
    "PatientReligiousPreference",
    "PatientComments",
    "AdditionalPatientHistory",
    "PatientInsurancePlanCodeSequence",
    "ResponsiblePerson",
    "ResponsibleOrganization",
    # People and institutions.
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "ReferringPhysicianAddress",
    "ReferringPhysicianTelephoneNumbers",
    "PhysiciansOfRecord",
    "PerformingPhysicianName",
    "NameOfPhysiciansReadingStudy",
    "OperatorsName",
    "RequestingPhysician",
    "StationName",
    "DeviceSerialNumber",
    # Study, visit and request identifiers.
    "AccessionNumber",
    "StudyID",
    "AdmissionID",
    "RequestedProcedureID",
    "PerformedProcedureStepID",
    "ScheduledProcedureStepID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "FrameOfReferenceUID",
    # Free-text descriptions that often repeat names or identifiers.
    "StudyDescription",
    "SeriesDescription",
    "ImageComments",
    "RequestAttributesSequence",
    # Dates and times, which link an image to a visit.
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
    "AcquisitionDateTime",
    "InstanceCreationDate",
    "StudyTime",
    "SeriesTime",
    "AcquisitionTime",
    "ContentTime",
    "InstanceCreationTime",
)


def pseudonymize(identifier: str, salt: bytes) -> str:
    """Return the patient key of an identifier: `p-` and 16 hex digits of HMAC-SHA256(salt, identifier).

    The identifier is hashed as UTF-8 exactly as given, so callers strip padding first.

    Raises:
        ValueError: the identifier is empty or the salt is shorter than MIN_SALT_BYTES.
    """
    if not identifier:
        raise ValueError("Cannot pseudonymize an empty patient identifier. Pass None as the patient key instead.")
    _check_salt_length(salt, "the salt passed to pseudonymize")

    digest = hmac.new(salt, identifier.encode("utf-8"), hashlib.sha256).hexdigest()
    return PATIENT_KEY_PREFIX + digest[:PATIENT_KEY_HEX_DIGITS]


def load_or_create_salt(folder: Path) -> bytes:
    """Return the patient salt: $AEPLAT_PATIENT_SALT if set, else the salt file in the folder.

    The salt file `<folder>/patient-salt` contains 64 hex digits (32 random bytes) and the salt
    is that text encoded as UTF-8, so `export AEPLAT_PATIENT_SALT=$(cat patient-salt)` on
    another machine gives the same patient keys. A missing file is created with mode 0600.
    Processes that create it at the same time all end up with the salt of the first one.

    Raises:
        ValueError: the salt from the environment or the file is shorter than MIN_SALT_BYTES.
        OSError: the folder or the file cannot be created or read.
    """
    from_environment = os.environ.get(SALT_ENV, "").strip()
    if from_environment:
        salt = from_environment.encode("utf-8")
        _check_salt_length(salt, f"${SALT_ENV}")
        return salt

    path = Path(folder) / SALT_FILE_NAME
    if not path.exists():
        _create_salt_file(path)
    return _read_salt_file(path)


def _create_salt_file(path: Path) -> None:
    """Write a new salt file atomically, unless another process has just created one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    content = secrets.token_hex(SALT_RANDOM_BYTES).encode("ascii")

    # mkstemp creates the file with mode 0600. os.link fails when the target exists, so a
    # salt that another process has already used is never replaced.
    descriptor, temporary_name = tempfile.mkstemp(dir=path.parent, prefix=f".{SALT_FILE_NAME}.", suffix=".tmp")
    temporary = Path(temporary_name)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            stream.write(content)
            stream.flush()
            os.fsync(stream.fileno())
        # NOTE: a file system without hard links raises OSError here.
        os.link(temporary, path)
        logger.info("Created patient salt file %s.", path)
    except FileExistsError:
        logger.debug("Patient salt file %s was created by another process.", path)
    finally:
        temporary.unlink(missing_ok=True)


def _read_salt_file(path: Path) -> bytes:
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        logger.warning(
            "Patient salt file %s has mode %o, so other users can read it. Run `chmod 600 %s`.", path, mode, path
        )

    salt = path.read_bytes().strip()
    _check_salt_length(salt, f"salt file {path}")
    return salt


def _check_salt_length(salt: bytes, source: str) -> None:
    if len(salt) < MIN_SALT_BYTES:
        raise ValueError(
            f"The patient salt from {source} has {len(salt)} bytes, but at least {MIN_SALT_BYTES} are needed. "
            f'Generate one with `python -c "import secrets; print(secrets.token_hex(32))"`. '
            "A new salt changes every patient key."
        )
