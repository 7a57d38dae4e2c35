"""Write small DICOM files for tests: `from dicom_factory import write_dicom` in tests/data."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    UID,
    generate_uid,
)

SECONDARY_CAPTURE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.7")

# Transfer syntaxes write_dicom can produce with pydicom 3.0 and the installed packages:
# pydicom encodes RLE itself, pylibjpeg-openjpeg encodes JPEG 2000, and Pillow encodes
# JPEG Baseline, which write_dicom then encapsulates.
SUPPORTED_TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, RLELossless, JPEG2000Lossless, JPEGBaseline8Bit)

JPEG_QUALITY = 95


def write_dicom(
    path: Path,
    pixels: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int | None = None,
    patient_id: str | None = "TEST-PATIENT-1",
    transfer_syntax: UID = ExplicitVRLittleEndian,
    **attributes: Any,
) -> Path:
    """Write `pixels` as a DICOM Part 10 file and return its path.

    pixels: (H, W) uint8, uint16 or int16 greyscale, (H, W, 3) uint8 RGB, or (frames, H, W)
    greyscale for a multi-frame file. Values above `bits_stored` are written unchanged, so
    a test can put garbage in the unused high bits. `attributes` are set by DICOM keyword
    after the defaults (for example RescaleSlope=2, WindowCenter=40, PatientName="A^B").
    """
    if transfer_syntax not in SUPPORTED_TRANSFER_SYNTAXES:
        raise ValueError(
            f"write_dicom cannot encode transfer syntax {transfer_syntax}. Use one of {SUPPORTED_TRANSFER_SYNTAXES}."
        )

    dataset = _base_dataset(pixels, photometric, bits_stored)
    if patient_id is not None:
        dataset.PatientID = patient_id
    for keyword, value in attributes.items():
        setattr(dataset, keyword, value)

    if transfer_syntax == JPEGBaseline8Bit:
        _encode_jpeg_baseline(dataset, pixels)
    elif transfer_syntax != ExplicitVRLittleEndian:
        dataset.compress(transfer_syntax, encoding_plugin="pylibjpeg" if transfer_syntax == JPEG2000Lossless else "")

    path = Path(path)
    dataset.save_as(path, enforce_file_format=True)
    return path


def _base_dataset(pixels: np.ndarray, photometric: str, bits_stored: int | None) -> Dataset:
    colour = photometric in ("RGB", "YBR_FULL")
    multi_frame = pixels.ndim == 3 and not colour
    rows, columns = pixels.shape[-2:] if multi_frame else pixels.shape[:2]
    bits_allocated = pixels.dtype.itemsize * 8

    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE_STORAGE
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian

    dataset.SOPClassUID = SECONDARY_CAPTURE_STORAGE
    dataset.SOPInstanceUID = dataset.file_meta.MediaStorageSOPInstanceUID
    dataset.StudyInstanceUID = generate_uid()
    dataset.SeriesInstanceUID = generate_uid()
    dataset.Modality = "OT"

    dataset.Rows = rows
    dataset.Columns = columns
    dataset.SamplesPerPixel = 3 if colour else 1
    dataset.PhotometricInterpretation = photometric
    dataset.BitsAllocated = bits_allocated
    dataset.BitsStored = bits_stored or bits_allocated
    dataset.HighBit = dataset.BitsStored - 1
    dataset.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if colour:
        dataset.PlanarConfiguration = 0
    if multi_frame:
        dataset.NumberOfFrames = pixels.shape[0]

    dataset.PixelData = np.ascontiguousarray(pixels).astype(pixels.dtype.newbyteorder("<")).tobytes()
    dataset["PixelData"].VR = "OW" if bits_allocated > 8 else "OB"
    return dataset


def _encode_jpeg_baseline(dataset: Dataset, pixels: np.ndarray) -> None:
    if pixels.dtype != np.uint8:
        raise ValueError(f"JPEG Baseline stores 8-bit samples, but the pixels are {pixels.dtype}.")

    frames = pixels if pixels.ndim == 3 and dataset.SamplesPerPixel == 1 else pixels[np.newaxis]
    encoded = []
    for frame in frames:
        buffer = io.BytesIO()
        # subsampling=1 is 4:2:2 chroma subsampling, as YBR_FULL_422 states. Grey images ignore it.
        Image.fromarray(frame).save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=1)
        encoded.append(buffer.getvalue())

    dataset.PixelData = encapsulate(encoded)
    dataset["PixelData"].VR = "OB"
    dataset.LossyImageCompression = "01"
    if dataset.SamplesPerPixel == 3:
        # Pillow stores RGB JPEG as YCbCr with full-range BT.601, which DICOM calls YBR_FULL_422.
        dataset.PhotometricInterpretation = "YBR_FULL_422"
    dataset.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
