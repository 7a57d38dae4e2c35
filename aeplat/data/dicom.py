"""Decode DICOM images to greyscale in [0, 1] the way a viewer displays them.

The steps follow the grayscale pipeline of DICOM PS3.3 C.11. Stored pixel values are
masked to Bits Stored and pass through the modality LUT, then the VOI LUT or window. The
result is scaled to [0, 1], and MONOCHROME1 is inverted, so every image shows bone bright
and air dark.
Compressed transfer syntaxes are decoded by pydicom with the pylibjpeg plugins (JPEG,
JPEG-LS, JPEG 2000, RLE).

Patient identifiers never leave this module: the PatientID element is read as raw bytes and
only its pseudonymous key is returned, metadata comes from an allow-list of technical
attributes, and no message quotes an element value.
"""

from __future__ import annotations

import io
import logging
import types
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID

from aeplat.data.cache import default_cache_dir
from aeplat.data.errors import DatasetError
from aeplat.data.privacy import load_or_create_salt, pseudonymize

logger = logging.getLogger(__name__)

# Technical attributes copied into DecodedImage.metadata. This is an allow-list on purpose:
# any attribute not named here, including every private one, is never copied.
METADATA_ATTRIBUTES = (
    "Modality",
    "PhotometricInterpretation",
    "BitsStored",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "SamplesPerPixel",
)

# The element tag in little and big endian byte order, to tell a file cut off inside its
# Pixel Data from one that never had it.
_PIXEL_DATA_TAG_BYTES = (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10")

_PATIENT_ID_TAG = 0x00100020

# ITU-R BT.601 luma weights, the weights Pillow uses for RGB to L as well.
LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])

# The pip packages whose pydicom plugin decodes each transfer syntax.
_PYLIBJPEG_LIBJPEG = "pylibjpeg pylibjpeg-libjpeg"
_PYLIBJPEG_OPENJPEG = "pylibjpeg pylibjpeg-openjpeg"
_DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": _PYLIBJPEG_LIBJPEG,  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51": _PYLIBJPEG_LIBJPEG,  # JPEG Extended (Process 2 and 4)
    "1.2.840.10008.1.2.4.57": _PYLIBJPEG_LIBJPEG,  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70": _PYLIBJPEG_LIBJPEG,  # JPEG Lossless (Process 14, Selection Value 1)
    "1.2.840.10008.1.2.4.80": _PYLIBJPEG_LIBJPEG,  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81": _PYLIBJPEG_LIBJPEG,  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90": _PYLIBJPEG_OPENJPEG,  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91": _PYLIBJPEG_OPENJPEG,  # JPEG 2000
    "1.2.840.10008.1.2.4.201": _PYLIBJPEG_OPENJPEG,  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202": _PYLIBJPEG_OPENJPEG,  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203": _PYLIBJPEG_OPENJPEG,  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE Lossless
}

# Exceptions that pydicom and its decoder plugins raise for damaged pixel data. pylibjpeg
# raises RuntimeError, Pillow OSError or ValueError, and pydicom ValueError when the
# Pixel Data element is shorter than Rows x Columns x Bits Allocated need.
_DECODE_ERRORS = (ValueError, RuntimeError, OSError, EOFError, IndexError, KeyError, AttributeError)


class BadFileError(DatasetError):
    """An image file that cannot be decoded.

    Attributes:
        path: the file.
        reason: what is wrong with it and how to fix it. Never contains patient identifiers.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"Cannot use image file {path}: {reason}")
        self.path = Path(path)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded 2-D image and the non-identifying facts about it.

    Attributes:
        pixels: float32 array of shape (H, W) in [0, 1], bone and tissue bright, air dark.
        source: the file it was read from.
        patient_key: pseudonymous patient key from the DICOM PatientID, or None when the
            file has no PatientID or is not DICOM.
        metadata: read-only technical attributes (METADATA_ATTRIBUTES and TransferSyntaxUID
            for DICOM, Format and Mode for Pillow images) as strings.
    """

    pixels: np.ndarray
    source: Path
    patient_key: str | None
    metadata: Mapping[str, str]

    def __repr__(self) -> str:
        return (
            f"DecodedImage(source={str(self.source)!r}, shape={self.pixels.shape}, dtype={self.pixels.dtype}, "
            f"patient_key={self.patient_key!r}, metadata={dict(self.metadata)!r})"
        )


@dataclass(frozen=True, eq=False)
class VoiOutput:
    """The output of the VOI stage and the range that maps to [0, 1].

    Attributes:
        values: float64 VOI output. For a window it is already in [0, 1], for a VOI LUT it
            is in LUT entry units, and without either it is the modality output.
        low: the value shown as black (before MONOCHROME1 inversion).
        high: the value shown as white.
    """

    values: np.ndarray
    low: float
    high: float

    def scaled(self) -> np.ndarray:
        """Return the values mapped linearly from [low, high] to [0, 1] as float32, clipped."""
        if not self.high > self.low:
            return np.zeros(self.values.shape, dtype=np.float32)
        unit = (self.values - self.low) / (self.high - self.low)
        return np.clip(unit, 0.0, 1.0).astype(np.float32)


def decode_dicom(path: Path, *, salt: bytes | None = None) -> DecodedImage:
    """Decode the first frame of a DICOM file to a greyscale image in [0, 1].

    Greyscale images go through the modality LUT, the VOI stage (see apply_voi) and
    MONOCHROME1 inversion. Colour images (RGB, YBR, PALETTE COLOR) are converted to grey with
    the BT.601 luma weights and scaled by their maximum stored value, without VOI. Of a
    multi-frame file only frame 0 is decoded. The patient key is pseudonymized with `salt`,
    or with load_or_create_salt(default_cache_dir()) when no salt is given.

    Raises:
        BadFileError: the file is not DICOM, is truncated, has no Pixel Data, or needs a
            decoder plugin that is not installed.
    """
    path = Path(path)
    dataset = read_dataset(path)
    stored = stored_pixels(dataset, path)

    try:
        if _is_colour(dataset, stored):
            pixels = _colour_to_grey(dataset, stored)
        else:
            pixels = _grey_to_display(dataset, stored)
    except (ValueError, TypeError, AttributeError, IndexError) as error:
        raise BadFileError(
            path,
            f"invalid Modality LUT, VOI LUT or palette attributes ({type(error).__name__}: {error}). "
            "Fix or remove those attributes with a DICOM tool.",
        ) from error

    return DecodedImage(
        pixels=pixels,
        source=path,
        patient_key=_patient_key(dataset, salt),
        metadata=dicom_metadata(dataset),
    )


def read_stored_pixels(path: Path) -> np.ndarray:
    """Return the stored pixel values of frame 0 of a DICOM file, masked to Bits Stored.

    These are the raw values before any LUT, in the integer dtype pydicom decodes to
    (uint8, uint16, int16, ...), of shape (Rows, Columns) or (Rows, Columns, 3) for colour.
    """
    path = Path(path)
    return stored_pixels(read_dataset(path), path)


def read_dataset(path: Path) -> Dataset:
    """Read a DICOM file that contains an image and return its dataset.

    Raises:
        BadFileError: the file cannot be read, is not DICOM, or has no Pixel Data element.
    """
    path = Path(path)
    try:
        content = path.read_bytes()
    except OSError as error:
        raise BadFileError(path, f"failed to read the file ({error.strerror}). Check that it exists and is readable.") from error

    try:
        with warnings.catch_warnings():
            # A truncated element is reported below as a BadFileError. pydicom warns about it
            # too, also to its logger, with "<no filename>" because it reads from memory.
            warnings.simplefilter("ignore")
            dataset = pydicom.dcmread(io.BytesIO(content))
    except InvalidDicomError as error:
        raise BadFileError(
            path,
            "not a DICOM file, because the 'DICM' prefix after the 128-byte preamble is missing. "
            "Remove it from the dataset folder, or convert it to DICOM Part 10 format.",
        ) from error
    except (ValueError, EOFError, OSError, KeyError, TypeError) as error:
        raise BadFileError(path, f"the DICOM header is damaged ({type(error).__name__}). Copy the file again.") from error

    _check_pixel_data_present(dataset, content, path)
    return dataset


def stored_pixels(dataset: Dataset, path: Path) -> np.ndarray:
    """Decode frame 0 of a dataset read from `path` and mask it to Bits Stored.

    pydicom 3.0.2 already clears the bits above Bits Stored of native pixel data and
    sign-extends signed values (checked with garbage in bits 12-15). Masking again here
    changes nothing then, and keeps the values right with a decoder that returns the full
    container.

    Raises:
        BadFileError: the transfer syntax has no installed decoder, or the pixel data is
            truncated or corrupt.
    """
    _check_decoder_available(dataset, path)

    with warnings.catch_warnings():
        # pydicom warns about invalid header values, and such warnings may quote the value.
        warnings.simplefilter("ignore")
        try:
            pixels = pixel_array(dataset, index=0)
        except _DECODE_ERRORS as error:
            raise BadFileError(
                path,
                f"failed to decode the pixel data ({type(error).__name__}: {error}). "
                "The file is truncated, corrupt or lacks required image attributes; copy it again.",
            ) from error

    frames = _number_of_frames(dataset)
    if frames > 1:
        logger.debug("Decoded frame 0 of %d in multi-frame DICOM file %s.", frames, path)

    bits_stored = int(dataset.get("BitsStored") or pixels.dtype.itemsize * 8)
    signed = int(dataset.get("PixelRepresentation") or 0) == 1
    return mask_to_bits_stored(pixels, bits_stored, signed)


def mask_to_bits_stored(pixels: np.ndarray, bits_stored: int, signed: bool) -> np.ndarray:
    """Clear the bits above Bits Stored, and sign-extend from bit Bits Stored - 1 when signed.

    Returns the input unchanged when it is not an integer array or Bits Stored fills its dtype.
    """
    container_bits = pixels.dtype.itemsize * 8
    if pixels.dtype.kind not in "iu" or not 0 < bits_stored < container_bits:
        return pixels

    masked = pixels.astype(np.int64) & ((1 << bits_stored) - 1)
    if signed:
        negative = masked >= (1 << (bits_stored - 1))
        masked[negative] -= 1 << bits_stored
    return masked.astype(pixels.dtype)


def apply_modality_lut(stored: np.ndarray, dataset: Dataset) -> np.ndarray:
    """Return the modality output of stored values as float64.

    A Modality LUT Sequence is used in place of Rescale Slope and Intercept when a file has
    both. The float64 result cannot overflow, unlike stored * slope in a uint16 dtype.
    """
    values = stored.astype(np.float64)

    sequence = dataset.get("ModalityLUTSequence")
    if sequence:
        signed = int(dataset.get("PixelRepresentation") or 0) == 1
        first_mapped, table, _ = _lut_table(sequence[0], signed)
        return _look_up(values, first_mapped, table)

    slope = _first_number(dataset.get("RescaleSlope"), default=1.0)
    intercept = _first_number(dataset.get("RescaleIntercept"), default=0.0)
    return values * slope + intercept


def apply_voi(values: np.ndarray, dataset: Dataset) -> VoiOutput:
    """Apply the VOI stage to modality output values.

    The first item of the VOI LUT Sequence is used when present, because it can be a curve
    that no window expresses. Else the first Window Center and Width pair is applied with
    the VOI LUT Function (LINEAR, LINEAR_EXACT or SIGMOID, where unknown names count as
    LINEAR). Else the minimum and maximum of the values map to black and white. A window with
    an invalid width is logged as a WARNING and skipped.
    """
    sequence = dataset.get("VOILUTSequence")
    if sequence:
        return _apply_voi_lut(values, sequence[0])

    center = _first_number(dataset.get("WindowCenter"), default=None)
    width = _first_number(dataset.get("WindowWidth"), default=None)
    if center is not None and width is not None:
        function = str(dataset.get("VOILUTFunction") or "LINEAR").strip().upper()
        windowed = _apply_window(values, center, width, function)
        if windowed is not None:
            return windowed
        logger.warning(
            "Ignoring window center %s, width %s with VOI LUT Function %s, because the width is invalid. "
            "Scaling by the minimum and maximum pixel value instead.",
            center,
            width,
            function,
        )

    return VoiOutput(values=values, low=float(values.min()), high=float(values.max()))


def dicom_metadata(dataset: Dataset) -> Mapping[str, str]:
    """Return a read-only mapping of the allow-listed technical attributes that are present."""
    metadata: dict[str, str] = {}
    transfer_syntax = dataset.file_meta.get("TransferSyntaxUID") if hasattr(dataset, "file_meta") else None
    if transfer_syntax:
        metadata["TransferSyntaxUID"] = str(transfer_syntax)

    for keyword in METADATA_ATTRIBUTES:
        value = dataset.get(keyword)
        if value is not None and value != "":
            metadata[keyword] = str(value)
    return types.MappingProxyType(metadata)


def _grey_to_display(dataset: Dataset, stored: np.ndarray) -> np.ndarray:
    modality = apply_modality_lut(stored, dataset)
    pixels = apply_voi(modality, dataset).scaled()

    # MONOCHROME1 shows the minimum value as white, so it is inverted to bring it in line
    # with MONOCHROME2, where the minimum is black.
    if _photometric(dataset) == "MONOCHROME1":
        pixels = 1.0 - pixels
    return pixels


def _is_colour(dataset: Dataset, stored: np.ndarray) -> bool:
    return stored.ndim == 3 or _photometric(dataset) == "PALETTE COLOR"


def _colour_to_grey(dataset: Dataset, stored: np.ndarray) -> np.ndarray:
    """Convert RGB (pydicom converts YBR to RGB) or palette indices to luma in [0, 1]."""
    if _photometric(dataset) == "PALETTE COLOR":
        rgb = apply_color_lut(stored, dataset)
        maximum = float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "iu" else 1.0
    else:
        rgb = stored
        bits_stored = int(dataset.get("BitsStored") or rgb.dtype.itemsize * 8)
        maximum = float((1 << bits_stored) - 1)

    luma = rgb.astype(np.float64) @ LUMA_WEIGHTS
    return np.clip(luma / maximum, 0.0, 1.0).astype(np.float32)


def _apply_voi_lut(values: np.ndarray, item: Dataset) -> VoiOutput:
    first_mapped, table, bits = _lut_table(item, signed=False)
    output = _look_up(values, first_mapped, table)

    # NOTE: some files state more bits than their LUT uses (16 for a 12-bit curve). Such a
    # LUT looks the same as a curve that is meant to stay dark, so the stated bits are kept.
    # Only a LUT whose entries exceed the stated bits is widened to fit them.
    top = float((1 << bits) - 1)
    largest = float(table.max())
    if largest > top:
        top = float((1 << int(largest).bit_length()) - 1)
    return VoiOutput(values=output, low=0.0, high=top)


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> VoiOutput | None:
    """Window to [0, 1] with the formulas of DICOM PS3.3 C.11.2.1.2, or None for an invalid width."""
    if function == "SIGMOID":
        if width <= 0:
            return None
        output = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif function == "LINEAR_EXACT":
        if width <= 0:
            return None
        output = np.clip((values - center) / width + 0.5, 0.0, 1.0)
    else:
        if width < 1:
            return None
        output = _linear_window(values, center, width)
    return VoiOutput(values=output, low=0.0, high=1.0)


def _linear_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Return the LINEAR window: 0 at or below c - 0.5 - (w - 1) / 2, 1 above c - 0.5 + (w - 1) / 2."""
    lower_edge = center - 0.5 - (width - 1) / 2
    upper_edge = center - 0.5 + (width - 1) / 2
    if width == 1:
        return (values > upper_edge).astype(np.float64)

    output = (values - (center - 0.5)) / (width - 1) + 0.5
    output[values <= lower_edge] = 0.0
    output[values > upper_edge] = 1.0
    return np.clip(output, 0.0, 1.0)


def _lut_table(item: Dataset, signed: bool) -> tuple[int, np.ndarray, int]:
    """Return (first mapped value, entries, bits per entry) of a Modality or VOI LUT item."""
    entries, first_mapped, bits = (int(value) for value in item.LUTDescriptor)

    # The first mapped value is stored as US even when the input values are signed.
    if signed and first_mapped >= 1 << 15:
        first_mapped -= 1 << 16

    # A LUT Descriptor with 0 entries has 2**16 entries.
    entries = entries or 1 << 16

    data = item.LUTData
    if isinstance(data, bytes):
        # With VR OW, 8-bit entries are packed two per 16-bit word.
        # NOTE: OW bytes are read as little endian, so a LUT in a big endian file is misread.
        dtype = np.uint8 if len(data) == entries else np.dtype("<u2")
        table = np.frombuffer(data, dtype=dtype)
    else:
        table = np.atleast_1d(np.asarray(data))

    if table.size == 0:
        raise ValueError("LUT Data (0028,3006) is empty")
    return first_mapped, table.astype(np.float64), bits


def _look_up(values: np.ndarray, first_mapped: int, table: np.ndarray) -> np.ndarray:
    """Map each value to table[value - first_mapped], clamping to the first and last entry.

    Non-integer inputs (after a fractional rescale slope) use the nearest entry.
    """
    index = np.clip(np.rint(values) - first_mapped, 0, table.size - 1).astype(np.intp)
    return table[index]


def _check_pixel_data_present(dataset: Dataset, content: bytes, path: Path) -> None:
    if "PixelData" in dataset:
        return

    if "FloatPixelData" in dataset or "DoubleFloatPixelData" in dataset:
        raise BadFileError(
            path,
            "the file has Float Pixel Data in place of Pixel Data (7FE0,0010), as parametric maps do, "
            "which aeplat does not read. Remove it from the dataset folder.",
        )

    if any(tag in content for tag in _PIXEL_DATA_TAG_BYTES):
        raise BadFileError(
            path,
            "the file is truncated inside its Pixel Data element (7FE0,0010), so the image cannot be decoded. "
            "Copy the file again.",
        )

    raise BadFileError(
        path,
        "the file has no Pixel Data element (7FE0,0010), so it contains no image (for example a report, "
        "or a header-only file). Remove it from the dataset folder.",
    )


def _check_decoder_available(dataset: Dataset, path: Path) -> None:
    file_meta = getattr(dataset, "file_meta", None)
    transfer_syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not transfer_syntax:
        raise BadFileError(
            path,
            "the file meta information has no Transfer Syntax UID (0002,0010), so its pixel data cannot be "
            "decoded. Rewrite the file with a DICOM tool, for example `gdcmconv --raw`.",
        )

    uid = UID(str(transfer_syntax))
    try:
        decoder = get_decoder(uid)
    except NotImplementedError as error:
        raise BadFileError(
            path,
            f"pydicom {pydicom.__version__} has no decoder for transfer syntax {uid.name} ({uid}). "
            "Convert the file to Explicit VR Little Endian with a tool that decodes this transfer syntax, "
            "or remove it from the dataset folder.",
        ) from error

    if not decoder.is_available:
        packages = _DECODER_PACKAGES.get(str(uid), "pylibjpeg and the plugin for this transfer syntax")
        raise BadFileError(path, missing_decoder_reason(uid, packages, decoder.missing_dependencies))


def missing_decoder_reason(uid: UID, packages: str, missing: list[str]) -> str:
    """Return the message for a transfer syntax whose decoder plugins are not installed."""
    details = "; ".join(missing) if missing else "none listed"
    return (
        f"no installed decoder for transfer syntax {uid.name} ({uid}). Install one with "
        f"`pip install {packages}` (pydicom lists these options: {details})."
    )


def _patient_key(dataset: Dataset, salt: bytes | None) -> str | None:
    identifier = _raw_patient_id(dataset)
    if not identifier:
        return None
    if salt is None:
        salt = load_or_create_salt(default_cache_dir())
    return pseudonymize(identifier, salt)


def _raw_patient_id(dataset: Dataset) -> str | None:
    """Return the PatientID text, read from the raw element bytes.

    Reading the raw bytes skips pydicom's value validation, whose warnings quote the value.
    """
    if _PATIENT_ID_TAG not in dataset:
        return None

    value = dataset.get_item(_PATIENT_ID_TAG).value
    if value is None:
        return None
    if isinstance(value, bytes):
        encodings = convert_encodings(dataset.get("SpecificCharacterSet"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            value = decode_bytes(value, encodings, {0x5C})
    return str(value).strip(" \x00") or None


def _photometric(dataset: Dataset) -> str:
    return str(dataset.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()


def _number_of_frames(dataset: Dataset) -> int:
    try:
        return int(dataset.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        return 1


def _first_number(value: object, default: float | None) -> float | None:
    """Return the first value of a DS or IS element (single or multi-valued) as float."""
    if value is None or value == "":
        return default
    if isinstance(value, MultiValue | list | tuple):
        if len(value) == 0:
            return default
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return default
