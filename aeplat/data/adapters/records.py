"""2-D image records shared by the rsna, vindr, brain-tumor and folder adapters.

A scan produces one ImageRecord per image file. Loading decodes each record with
aeplat.data.images.read_image (PNG, JPEG, DICOM, 2-D NIfTI), builds its lesion
mask from a mask file or from boxes, resizes both to the output size and reports every
file that fails to the BadFileReport.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.filebasedimages import ImageFileError

from aeplat.data.adapters.base import BadFile, BadFileReport, ProgressCallback, Scan, check_folder
from aeplat.data.errors import DatasetError
from aeplat.data.nifti import AFFINE_TOLERANCE
from aeplat.data.images import read_image, resize_image
from aeplat.data.preprocess import resize_masks
from aeplat.data.types import NORMAL, SliceSet

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom", ".nii", ".nii.gz")
NIFTI_SUFFIXES = (".nii", ".nii.gz")


@dataclass(frozen=True)
class Box:
    """A lesion rectangle in pixel coordinates: columns x_min..x_max, rows y_min..y_max."""

    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image file, before decoding.

    Attributes:
        path: the image file.
        label: NORMAL or ABNORMAL.
        class_name: the dataset's class of the image, for reports.
        patient_id: the patient the image belongs to, or None to take the pseudonymous
            DICOM patient key, else the file's path without suffix.
        mask_path: a lesion mask file of the same grid, or None.
        boxes: lesion rectangles, merged into the mask.
        box_frame: (height, width) of the image the boxes were drawn on, or None when they
            are in this file's own pixel coordinates. Boxes are scaled to the decoded size.
    """

    path: Path
    label: int
    class_name: str
    patient_id: str | None = None
    mask_path: Path | None = None
    boxes: tuple[Box, ...] = ()
    box_frame: tuple[int, int] | None = None


def file_suffix(path: Path) -> str:
    """Return the lower-case suffix, with .nii.gz as one suffix."""
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def file_stem(path: Path) -> str:
    """Return the file name without its suffix (.nii.gz counts as one)."""
    suffix = file_suffix(path)
    return path.name[: len(path.name) - len(suffix)] if suffix else path.name


def resolve_image_dir(data_dir: Path, image_dir: Path | None, default_name: str, what: str) -> Path:
    """Return --image-dir, else the data folder's `default_name` subfolder when present, else the data folder."""
    if image_dir is None:
        subfolder = data_dir / default_name
        image_dir = subfolder if subfolder.is_dir() else data_dir
    return check_folder(image_dir, what, "--image-dir")


def list_image_files(folder: Path, suffixes: Iterable[str] = IMAGE_SUFFIXES) -> list[Path]:
    """Return the files under folder with one of the suffixes, sorted, skipping hidden files and folders."""
    allowed = tuple(suffixes)
    found = []
    for path in sorted(Path(folder).rglob("*")):
        relative = path.relative_to(folder)
        if any(part.startswith(".") for part in relative.parts):
            continue
        if path.is_file() and file_suffix(path) in allowed:
            found.append(path)
    return found


def index_by_stem(files: Sequence[Path], report_name: Callable[[Path], str]) -> tuple[dict[str, Path], list[BadFile]]:
    """Map file stems to files. Two files with one stem are both bad, because a label cannot choose."""
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(file_stem(path), []).append(path)

    index = {stem: paths[0] for stem, paths in groups.items() if len(paths) == 1}
    bad = [
        BadFile(report_name(path), f"{len(paths)} files share the name {stem}, so its label is ambiguous")
        for stem, paths in groups.items()
        if len(paths) > 1
        for path in paths
    ]
    return index, bad


def read_label_csv(path: Path, required: Sequence[str], what: str, option: str) -> pd.DataFrame:
    """Read a CSV (plain, .gz or .zip) and check that it has the required columns.

    Raises:
        DatasetError: the file is missing or unreadable, or lacks a required column.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{what} {path} not found. Pass the file with {option}.")

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (OSError, ValueError, UnicodeDecodeError, pd.errors.ParserError) as error:
        raise DatasetError(f"Failed to read {what} {path}: {error}. Check that it is a CSV file.") from error

    missing = [column for column in required if column not in table.columns]
    if missing:
        raise DatasetError(
            f"{what} {path} has columns {', '.join(map(str, table.columns)) or 'none'}, but the columns "
            f"{', '.join(required)} are expected (missing: {', '.join(missing)}). Pass the right file with {option}."
        )
    return table


def parse_box(values: Sequence[str]) -> Box | None:
    """Return a Box from four strings (x_min, y_min, x_max, y_max), or None when all are empty.

    Raises:
        ValueError: some but not all values are empty, a value is not a number, or max < min.
    """
    stripped = [value.strip() for value in values]
    if not any(stripped):
        return None
    x_min, y_min, x_max, y_max = (float(value) for value in stripped)
    if not all(np.isfinite([x_min, y_min, x_max, y_max])) or x_max <= x_min or y_max <= y_min:
        raise ValueError(f"box ({x_min}, {y_min}, {x_max}, {y_max}) is empty or not finite")
    return Box(x_min, y_min, x_max, y_max)


def load_records(scan: Scan, image_size: int, report: BadFileReport, progress: ProgressCallback | None) -> SliceSet:
    """Decode the ImageRecords of a scan into a SliceSet, reporting each file that fails.

    Raises:
        DatasetError: a file fails under --on-bad-file fail.
    """
    images, masks, labels, patients, paths = [], [], [], [], []
    records: tuple[ImageRecord, ...] = scan.items
    for done, record in enumerate(records, start=1):
        try:
            image, mask, patient_key = decode_record(record, image_size, scan.has_masks)
        except DatasetError as error:
            report.add(getattr(error, "path", None) or record.path, getattr(error, "reason", None) or str(error))
        else:
            images.append(image)
            masks.append(mask)
            labels.append(record.label)
            patients.append(record.patient_id or patient_key or file_stem(record.path))
            paths.append(report.display_name(record.path))
        if progress is not None:
            progress(done, len(records))

    return _slice_set(images, masks if scan.has_masks else None, labels, patients, paths, image_size)


def decode_record(record: ImageRecord, image_size: int, with_mask: bool) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """Return the (1, S, S) image, its (1, S, S) mask or None, and the DICOM patient key or None.

    Raises:
        DatasetError: the image or its mask cannot be read, or they do not match.
    """
    pixels, affine, patient_key = read_pixels(record.path)
    image = resize_image(pixels, image_size)[np.newaxis]
    if not with_mask:
        return image, None, patient_key

    lesion = np.zeros(pixels.shape, dtype=bool)
    if record.mask_path is not None:
        lesion |= _read_mask(record.mask_path, pixels.shape, affine)
    for box in record.boxes:
        lesion |= _box_mask(box, pixels.shape, record.box_frame)
    return image, resize_masks(lesion[np.newaxis], image_size)[0], patient_key


def read_pixels(path: Path) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """Return (pixels (H, W) float32 in [0, 1], NIfTI affine or None, DICOM patient key or None).

    Raises:
        DatasetError: the file cannot be decoded (BadFileError names the file and reason).
    """
    decoded = read_image(path)
    affine = _nifti_affine(path) if file_suffix(path) in NIFTI_SUFFIXES else None
    return np.asarray(decoded.pixels, dtype=np.float32), affine, decoded.patient_key


def _nifti_affine(path: Path) -> np.ndarray:
    try:
        return np.asarray(nib.load(path).affine, dtype=np.float64)
    except (OSError, EOFError, zlib.error, ValueError, ImageFileError) as error:
        raise DatasetError(f"NIfTI file {path} cannot be read: {error}") from error


def _read_nifti_2d(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Return the raw voxels of a 2-D NIfTI mask and its affine. Masks are not rescaled like images."""
    try:
        image = nib.load(path)
        voxels = np.asarray(image.dataobj, dtype=np.float32)
    except (OSError, EOFError, zlib.error, ValueError, ImageFileError) as error:
        raise DatasetError(f"NIfTI file {path} cannot be read: {error}") from error

    squeezed = np.squeeze(voxels)
    if squeezed.ndim != 2:
        raise DatasetError(
            f"NIfTI file {path} has shape {voxels.shape}, but a 2-D image is expected; "
            "use --dataset brats for volumes"
        )
    return squeezed, np.asarray(image.affine, dtype=np.float64)


def _read_mask(path: Path, shape: tuple[int, int], image_affine: np.ndarray | None) -> np.ndarray:
    if file_suffix(path) in NIFTI_SUFFIXES:
        pixels, mask_affine = _read_nifti_2d(path)
    else:
        pixels, mask_affine, _ = read_pixels(path)

    if pixels.shape != shape:
        raise DatasetError(f"mask {path.name} has shape {pixels.shape} but its image has shape {shape}")
    if image_affine is not None and mask_affine is not None and not np.allclose(
        image_affine, mask_affine, rtol=0.0, atol=AFFINE_TOLERANCE
    ):
        raise DatasetError(f"mask {path.name} has another affine than its image, so it does not lie on the image")
    return pixels > 0


def _box_mask(box: Box, shape: tuple[int, int], frame: tuple[int, int] | None) -> np.ndarray:
    """Return the box as a boolean (H, W) mask, scaled from frame to shape and clipped to the image."""
    height, width = shape
    scale_y, scale_x = (1.0, 1.0) if frame is None else (height / frame[0], width / frame[1])
    top, bottom = int(np.floor(box.y_min * scale_y)), int(np.ceil(box.y_max * scale_y))
    left, right = int(np.floor(box.x_min * scale_x)), int(np.ceil(box.x_max * scale_x))
    if bottom <= 0 or right <= 0 or top >= height or left >= width:
        raise DatasetError(
            f"box (x {box.x_min}-{box.x_max}, y {box.y_min}-{box.y_max}) lies outside the "
            f"{width}x{height} image, so the labels do not belong to this image"
        )

    mask = np.zeros(shape, dtype=bool)
    mask[max(top, 0) : min(bottom, height), max(left, 0) : min(right, width)] = True
    return mask


def _slice_set(
    images: list[np.ndarray],
    masks: list[np.ndarray] | None,
    labels: list[int],
    patients: list[str],
    paths: list[str],
    image_size: int,
) -> SliceSet:
    count = len(images)
    empty_shape = (0, 1, image_size, image_size)
    image_array = np.stack(images).astype(np.float32) if count else np.zeros(empty_shape, dtype=np.float32)
    mask_array = None
    if masks is not None:
        mask_array = np.stack(masks) if count else np.zeros(empty_shape, dtype=np.uint8)

    return SliceSet(
        images=image_array,
        labels=np.array(labels, dtype=np.int64),
        masks=mask_array,
        patient_ids=np.array(patients, dtype=np.str_),
        slice_indices=np.full(count, -1, dtype=np.int64),
        source_paths=np.array(paths, dtype=np.str_),
    )


def count_labels(records: Sequence[ImageRecord]) -> dict[str, int]:
    """Return the number of normal and abnormal records."""
    normal = sum(1 for record in records if record.label == NORMAL)
    return {"normal": normal, "abnormal": len(records) - normal}
