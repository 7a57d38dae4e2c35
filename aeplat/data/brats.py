"""BraTS brain MRI: find case folders, load one modality and its tumour mask as 2-D axial slices.

A slice is abnormal when the full-resolution segmentation has any voxel > 0 on it. Slices
without brain are dropped. Every supported file naming is one entry of NAMING_SCHEMES.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from aeplat.data.errors import DatasetError
from aeplat.data.nifti import check_alignment, read_canonical
from aeplat.data.preprocess import axial_stack, normalize_intensity, resize_images, resize_masks
from aeplat.data.types import SliceSet

logger = logging.getLogger(__name__)

BRATS_MODALITIES = ("flair", "t1", "t1ce", "t2")
SEGMENTATION = "seg"

# The encoder halves the image size four times, so sizes must be multiples of 16.
IMAGE_SIZE_MULTIPLE = 16

# At most this many problems are listed in one error message.
MAX_LISTED_PROBLEMS = 20

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class NamingScheme:
    """One BraTS file naming: a regular expression over file names and the names of its files.

    Attributes:
        name: the release that uses the naming, for messages.
        pattern: matches a whole file name, with the groups `case` (the case id) and `kind`.
        kinds: maps each `kind` spelling to a name in BRATS_MODALITIES or to SEGMENTATION.
        separator: the character between case id and kind in a file name.
        example_case: a case id of this scheme, for messages.
    """

    name: str
    pattern: re.Pattern[str]
    kinds: Mapping[str, str]
    separator: str
    example_case: str

    def parse(self, file_name: str) -> tuple[str, str] | None:
        """Return (case id, modality or SEGMENTATION) for a matching file name, else None."""
        match = self.pattern.match(file_name)
        if match is None:
            return None
        return match.group("case"), self.kinds[match.group("kind")]

    def file_name(self, case_id: str, kind: str) -> str:
        """Return the .nii.gz file name of a modality or SEGMENTATION of a case in this scheme."""
        spelling = next(key for key, value in self.kinds.items() if value == kind)
        return f"{case_id}{self.separator}{spelling}.nii.gz"


def _scheme(name: str, case_pattern: str, kinds: Mapping[str, str], separator: str, example_case: str) -> NamingScheme:
    alternatives = "|".join(sorted(map(re.escape, kinds), key=len, reverse=True))
    regex = rf"^(?P<case>{case_pattern}){re.escape(separator)}(?P<kind>{alternatives})\.nii(?:\.gz)?$"
    return NamingScheme(name, re.compile(regex), dict(kinds), separator, example_case)


_SAME_NAMES = {name: name for name in (*BRATS_MODALITIES, SEGMENTATION)}

NAMING_SCHEMES: tuple[NamingScheme, ...] = (
    _scheme("BraTS 2018", r"Brats18_.+", _SAME_NAMES, "_", "Brats18_2013_2_1"),
    _scheme("BraTS 2021", r"BraTS2021_\d+", _SAME_NAMES, "_", "BraTS2021_00000"),
    _scheme(
        "BraTS 2023",
        r"BraTS-[A-Z]+-\d+-\d+",
        {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "seg": SEGMENTATION},
        "-",
        "BraTS-GLI-00000-000",
    ),
)


def parse_brats_file_name(file_name: str) -> tuple[NamingScheme, str, str] | None:
    """Return (scheme, case id, modality or SEGMENTATION) of the first matching scheme, else None."""
    for scheme in NAMING_SCHEMES:
        parsed = scheme.parse(file_name)
        if parsed is not None:
            return scheme, parsed[0], parsed[1]
    return None


@dataclass(frozen=True)
class BratsSettings:
    """Preprocessing of BraTS volumes into 2-D slices.

    Attributes:
        modality: the MRI sequence to load, one of BRATS_MODALITIES.
        image_size: side of the square output slices in pixels, a multiple of 16.
        lower_percentile: percentile of brain intensities mapped to 0.
        upper_percentile: percentile of brain intensities mapped to 1.
        min_brain_fraction: a slice is kept when the fraction of its voxels that are
            brain (> 0) is above this value. The default 0.0 keeps every slice with brain.
    """

    modality: str = "flair"
    image_size: int = 64
    lower_percentile: float = 0.5
    upper_percentile: float = 99.5
    min_brain_fraction: float = 0.0

    def validate(self) -> None:
        """Raise DatasetError for the first invalid setting, naming its value and the allowed values."""
        _check_modality(self.modality)

        check_image_size(self.image_size)

        lower, upper = self.lower_percentile, self.upper_percentile
        if not (_is_finite_number(lower) and _is_finite_number(upper) and 0 <= lower < upper <= 100):
            raise DatasetError(
                f"Invalid intensity percentiles lower_percentile={lower!r}, upper_percentile={upper!r}. "
                "They must satisfy 0 <= lower_percentile < upper_percentile <= 100, and the defaults are 0.5 and 99.5."
            )

        fraction = self.min_brain_fraction
        if not (_is_finite_number(fraction) and 0 <= fraction < 1):
            raise DatasetError(
                f"min_brain_fraction must lie in [0, 1), got {fraction!r}. "
                "Use 0.0 to keep every slice that contains brain."
            )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class BratsCase:
    """The files of one BraTS case.

    Attributes:
        case_id: the id shared by the file names, for example "BraTS2021_00006".
        folder: the case folder.
        images: path of every modality found, keyed by a name in BRATS_MODALITIES.
        segmentation: path of the tumour segmentation.
    """

    case_id: str
    folder: Path
    images: dict[str, Path]
    segmentation: Path


def find_brats_cases(data_dir: Path, modality: str) -> list[BratsCase]:
    """Find the BraTS cases in the subfolders of data_dir, sorted by case id.

    Each case folder contains the files of one case, named by one of NAMING_SCHEMES. Files
    that match no scheme are ignored, and so are folders without any matching file.

    Raises:
        DatasetError: data_dir is missing or not a folder, no case folder is found, a
            folder mixes cases, a case appears twice, or a case lacks the requested
            modality or its segmentation.
    """
    _check_modality(modality)
    data_dir = Path(data_dir)
    _check_data_dir(data_dir)

    scanned = [_scan_case_folder(folder) for folder in _subfolders(data_dir)]
    cases = _index_cases([entry for entry in scanned if entry is not None])
    if not cases:
        raise DatasetError(_no_cases_message(data_dir))

    _check_complete(data_dir, cases, modality)

    return [
        BratsCase(
            case_id=case_id,
            folder=folder,
            images={kind: path for kind, path in sorted(files.items()) if kind != SEGMENTATION},
            segmentation=files[SEGMENTATION],
        )
        for case_id, (_, folder, files) in sorted(cases.items())
    ]


def load_brats_case(case: BratsCase, settings: BratsSettings) -> SliceSet:
    """Load one case as normalised, resized axial slices with tumour labels and masks.

    Both volumes are reoriented to canonical RAS and must share shape and affine. Slices
    whose brain fraction is not above settings.min_brain_fraction are dropped. Images are
    normalised per volume, and every slice is rotated so that anterior is at the top.

    Raises:
        DatasetError: a file cannot be read, the mask does not align with the image, or
            the image has no voxel > 0.
    """
    settings.validate()
    image_path = case.images.get(settings.modality)
    if image_path is None:
        raise DatasetError(
            f"Case {case.case_id} in {case.folder} has no {settings.modality} image, only "
            f"{_join(case.images) or 'none'}. Choose one of those with --modality."
        )

    image, image_affine = read_canonical(image_path)
    mask, mask_affine = read_canonical(case.segmentation)
    check_alignment(image_path, image.shape, image_affine, case.segmentation, mask.shape, mask_affine)

    indices = _brain_slice_indices(image, image_path, settings.min_brain_fraction)
    logger.debug(
        "Case %s: %d of %d axial slices have a brain fraction above %g.",
        case.case_id, indices.size, image.shape[2], settings.min_brain_fraction,
    )

    normalized = normalize_intensity(image, settings.lower_percentile, settings.upper_percentile)
    lesion = mask > 0
    labels = lesion[:, :, indices].any(axis=(0, 1)).astype(np.int64)

    return SliceSet(
        images=resize_images(axial_stack(normalized, indices), settings.image_size),
        labels=labels,
        masks=resize_masks(axial_stack(lesion, indices), settings.image_size),
        patient_ids=np.array([case.case_id] * indices.size, dtype=np.str_),
        slice_indices=indices.astype(np.int64),
    )


def load_brats_cases(
    cases: list[BratsCase], settings: BratsSettings, progress: ProgressCallback | None = None
) -> SliceSet:
    """Load the given cases in order and concatenate their slices.

    progress(done, total) is called after each case.

    Raises:
        DatasetError: a case cannot be loaded, or no slice is kept at all.
    """
    settings.validate()
    parts = []
    for done, case in enumerate(cases, start=1):
        part = load_brats_case(case, settings)
        counts = part.class_counts()
        logger.info(
            "Loaded BraTS case %s (%d/%d): %d normal and %d abnormal %s slices.",
            case.case_id, done, len(cases), counts["normal"], counts["abnormal"], settings.modality,
        )
        parts.append(part)
        if progress is not None:
            progress(done, len(cases))

    if sum(len(part) for part in parts) == 0:
        raise DatasetError(
            f"None of the {len(cases)} BraTS cases has a slice with a brain fraction above "
            f"min_brain_fraction={settings.min_brain_fraction}. Lower min_brain_fraction."
        )
    return SliceSet.concatenate(parts)


def load_brats(data_dir: Path, settings: BratsSettings, progress: ProgressCallback | None = None) -> SliceSet:
    """Load every BraTS case under data_dir, concatenated in case-id order.

    progress(done, total) is called after each case.
    """
    settings.validate()
    cases = find_brats_cases(data_dir, settings.modality)
    return load_brats_cases(cases, settings, progress)


def _check_modality(modality: str) -> None:
    if modality not in BRATS_MODALITIES:
        raise DatasetError(
            f"--modality {modality!r} is not a BraTS modality. Choose one of: {', '.join(BRATS_MODALITIES)}."
        )


def _is_finite_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_data_dir(data_dir: Path) -> None:
    if not data_dir.exists():
        raise DatasetError(
            f"BraTS data folder {data_dir} does not exist. Pass the folder that contains one "
            "subfolder per case (--data-dir)."
        )
    if not data_dir.is_dir():
        raise DatasetError(
            f"BraTS data path {data_dir} is a file, not a folder. Pass the folder that contains "
            "one subfolder per case (--data-dir)."
        )


def _subfolders(data_dir: Path) -> list[Path]:
    try:
        entries = list(data_dir.iterdir())
    except OSError as error:
        raise DatasetError(f"Failed to list BraTS data folder {data_dir}: {error}. Check its permissions.") from error
    return sorted(path for path in entries if path.is_dir() and not path.name.startswith("."))


def _scan_case_folder(folder: Path) -> tuple[NamingScheme, str, Path, dict[str, Path]] | None:
    """Return (scheme, case id, folder, files by kind) of a case folder, or None without any BraTS file."""
    files: dict[str, Path] = {}
    case_ids: set[str] = set()
    scheme = None
    for path in sorted(folder.iterdir()):
        parsed = parse_brats_file_name(path.name) if path.is_file() else None
        if parsed is None:
            logger.debug("Ignoring %s: its name matches no BraTS naming scheme.", path)
            continue

        scheme, case_id, kind = parsed
        case_ids.add(case_id)
        if kind in files:
            raise DatasetError(
                f"Case folder {folder} has two {kind} files: {files[kind].name} and {path.name}. "
                "Keep one of them."
            )
        files[kind] = path

    if scheme is None:
        logger.debug("Ignoring folder %s: it contains no BraTS file.", folder)
        return None
    if len(case_ids) > 1:
        raise DatasetError(
            f"Folder {folder} contains files of several cases ({', '.join(sorted(case_ids))}). "
            "Put each case in its own folder."
        )
    return scheme, case_ids.pop(), folder, files


def _index_cases(
    scanned: list[tuple[NamingScheme, str, Path, dict[str, Path]]],
) -> dict[str, tuple[NamingScheme, Path, dict[str, Path]]]:
    cases: dict[str, tuple[NamingScheme, Path, dict[str, Path]]] = {}
    for scheme, case_id, folder, files in scanned:
        if case_id in cases:
            raise DatasetError(
                f"Case {case_id} appears in two folders: {cases[case_id][1]} and {folder}. Remove one of them."
            )
        cases[case_id] = (scheme, folder, files)
    return cases


def _no_cases_message(data_dir: Path) -> str:
    examples = "; ".join(
        f"{scheme.name}: {scheme.example_case}/{scheme.file_name(scheme.example_case, 'flair')}"
        for scheme in NAMING_SCHEMES
    )
    message = (
        f"No BraTS case folders found in {data_dir}. Expected one subfolder per case with files "
        f"named as in one of these schemes ({examples}), each with a "
        f"{SEGMENTATION} file next to the images."
    )
    if any(parse_brats_file_name(path.name) for path in data_dir.iterdir() if path.is_file()):
        message += f" {data_dir} itself contains BraTS files, so pass its parent folder instead."
    return message


def _check_complete(
    data_dir: Path, cases: dict[str, tuple[NamingScheme, Path, dict[str, Path]]], modality: str
) -> None:
    """Raise one DatasetError listing every case without the requested modality or a segmentation."""
    problems = []
    for case_id, (scheme, folder, files) in sorted(cases.items()):
        available = [kind for kind in BRATS_MODALITIES if kind in files]
        if modality not in files:
            problems.append(
                f"case {case_id} in {folder} has no {modality} image ({scheme.file_name(case_id, modality)}); "
                f"found {', '.join(sorted(files))}, so this case supports --modality {', '.join(available) or 'none'}"
            )
        if SEGMENTATION not in files:
            problems.append(
                f"case {case_id} in {folder} has no segmentation ({scheme.file_name(case_id, SEGMENTATION)})"
            )
    if not problems:
        return

    common = [kind for kind in BRATS_MODALITIES if all(kind in files for _, _, files in cases.values())]
    fix = (
        f"Every case has --modality {', '.join(common)}. Choose one of those, or add the missing files."
        if common
        else "No modality is present in every case; add the missing files or remove those case folders."
    )
    raise DatasetError(
        f"BraTS data in {data_dir} is incomplete for --modality {modality}:\n"
        + _bullet_list(problems)
        + f"\n{fix}"
    )


def _bullet_list(problems: list[str]) -> str:
    lines = [f"  - {problem}" for problem in problems[:MAX_LISTED_PROBLEMS]]
    if len(problems) > MAX_LISTED_PROBLEMS:
        lines.append(f"  - ... and {len(problems) - MAX_LISTED_PROBLEMS} more")
    return "\n".join(lines)


def _brain_slice_indices(image: np.ndarray, image_path: Path, min_brain_fraction: float) -> np.ndarray:
    """Return the axial indices whose fraction of brain voxels (> 0) is above min_brain_fraction."""
    brain = np.isfinite(image) & (image > 0)
    if not brain.any():
        raise DatasetError(
            f"Image {image_path} has no voxel > 0, so it contains no brain. Replace the file or "
            "remove its case folder."
        )
    fraction = brain.mean(axis=(0, 1))
    return np.flatnonzero(fraction > min_brain_fraction)


def _join(names: Mapping[str, Any]) -> str:
    return ", ".join(sorted(names))


# Largest --image-size: a whole dataset of prepared images is held in memory as float32, and at
# 512×512 that is already 1 MiB per image. The paper trains at 64×64.
MAX_IMAGE_SIZE = 512


def check_image_size(size: object) -> None:
    """Raise DatasetError unless size is an integer multiple of IMAGE_SIZE_MULTIPLE, at most MAX_IMAGE_SIZE."""
    if isinstance(size, bool) or not isinstance(size, int) or size < IMAGE_SIZE_MULTIPLE or size % IMAGE_SIZE_MULTIPLE:
        raise DatasetError(
            f"image_size (--image-size) is {size!r}, but it must be an integer multiple of "
            f"{IMAGE_SIZE_MULTIPLE} and at least {IMAGE_SIZE_MULTIPLE}, because the autoencoder "
            "halves it four times. Use for example 64 or 128."
        )
    if size > MAX_IMAGE_SIZE:
        raise DatasetError(
            f"image_size (--image-size) is {size}, above the largest supported size {MAX_IMAGE_SIZE}. Every prepared "
            f"image is held in memory as float32 ({size}×{size}×4 bytes = {size * size * 4 / 2**20:.0f} MiB each), "
            "so use for example 64, 128 or 256."
        )
