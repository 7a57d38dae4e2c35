"""The interface every dataset adapter implements, and the bookkeeping of bad input files.

An adapter turns a data folder into a SliceSet in two steps. `scan` lists the files and
their labels without decoding pixels, so the cache key can be computed cheaply and label
problems are found before any decoding. `load` decodes the scanned items. Both report
every unusable file to a BadFileReport, which either raises at once (--on-bad-file fail)
or records the file and reason and goes on (--on-bad-file skip).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from aeplat.data.brats import IMAGE_SIZE_MULTIPLE, MAX_IMAGE_SIZE, check_image_size
from aeplat.data.errors import DatasetError
from aeplat.data.types import SliceSet

logger = logging.getLogger(__name__)

BAD_FILE_POLICIES = ("fail", "skip")

# At most this many bad files are listed in one error message.
MAX_LISTED_BAD_FILES = 20

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class BadFile:
    """An input file that cannot be used.

    Attributes:
        name: the path relative to the data folder (or the file name for files outside it).
        reason: why the file cannot be used, as a short sentence.
    """

    name: str
    reason: str


class BadFileReport:
    """Collects bad files. Under the policy "fail", `raise_if_failed` raises one DatasetError listing all of them."""

    def __init__(self, policy: str, data_dir: Path) -> None:
        check_bad_file_policy(policy)
        self.policy = policy
        self.data_dir = Path(data_dir)
        self.files: list[BadFile] = []

    def add(self, path: Path | str, reason: str) -> None:
        """Record one bad file."""
        self.add_all([BadFile(self.display_name(path), reason)])

    def add_all(self, bad_files: Sequence[BadFile]) -> None:
        """Record bad files. The caller goes on without them, so one run finds every bad file."""
        for bad_file in bad_files:
            logger.debug("Bad file %s: %s", bad_file.name, bad_file.reason)
        self.files.extend(bad_files)

    def raise_if_failed(self) -> None:
        """Raise one DatasetError listing every recorded bad file when the policy is "fail"."""
        if self.policy == "fail" and self.files:
            raise DatasetError(bad_files_message(self.files, self.data_dir))

    def display_name(self, path: Path | str) -> str:
        """Return the path relative to the data folder, or its file name when it lies outside."""
        path = Path(path)
        try:
            return path.relative_to(self.data_dir).as_posix()
        except ValueError:
            return path.name


def bad_files_message(bad_files: Sequence[BadFile], data_dir: Path) -> str:
    """Return an error message that lists bad files with their reasons and the two ways on."""
    lines = [f"  - {bad_file.name}: {bad_file.reason}" for bad_file in bad_files[:MAX_LISTED_BAD_FILES]]
    if len(bad_files) > MAX_LISTED_BAD_FILES:
        lines.append(f"  - ... and {len(bad_files) - MAX_LISTED_BAD_FILES} more")
    return (
        f"{len(bad_files)} input file(s) in {data_dir} cannot be used:\n"
        + "\n".join(lines)
        + "\nFix or remove these files, or pass --on-bad-file skip to leave them out."
    )


def check_bad_file_policy(policy: str) -> None:
    if policy not in BAD_FILE_POLICIES:
        raise DatasetError(f"--on-bad-file must be one of {', '.join(BAD_FILE_POLICIES)}, got {policy!r}.")


@dataclass(frozen=True)
class DataOptions:
    """Dataset options as the command line gives them; each adapter reads the ones it supports.

    Attributes:
        image_size: side of the square output images in pixels.
        modality: BraTS MRI sequence; None means the adapter's default.
        labels_csv: label table of rsna or vindr; None means the default place in the data folder.
        image_dir: folder of the images of rsna or vindr; None means the default place.
        include_not_normal: rsna only: count "No Lung Opacity / Not Normal" as abnormal.
        finding_vote: vindr only: how radiologists' disagreement resolves ("any" or "majority").
        normal_classes: folder only: folder names whose images are normal.
        abnormal_classes: folder only: folder names whose images are abnormal.
        patient_id_pattern: folder only: regular expression with a group `patient` over file names.
        patient_csv: folder only: CSV with columns file and patient.
        mask_dir: folder only: folder of lesion masks named like their images.
        name: folder only: dataset name used in the registered model name.
    """

    image_size: int = 64
    modality: str | None = None
    labels_csv: Path | None = None
    image_dir: Path | None = None
    include_not_normal: bool = False
    finding_vote: str = "any"
    normal_classes: tuple[str, ...] = ()
    abnormal_classes: tuple[str, ...] = ()
    patient_id_pattern: str | None = None
    patient_csv: Path | None = None
    mask_dir: Path | None = None
    name: str | None = None

    def check_only(self, dataset: str, supported: set[str]) -> None:
        """Raise DatasetError when an option outside `supported` differs from its default."""
        defaults = DataOptions()
        used = [
            item.name
            for item in fields(self)
            if item.name not in supported and getattr(self, item.name) != getattr(defaults, item.name)
        ]
        if used:
            options = ", ".join("--" + name.replace("_", "-") for name in used)
            raise DatasetError(f"Option(s) {options} do not apply to --dataset {dataset}. Remove them.")


@dataclass(frozen=True)
class Scan:
    """Files and labels that an adapter found in a data folder, before any pixels are decoded.

    Attributes:
        data_dir: the data folder.
        items: what `load` decodes, one entry per image file or per volume.
        source_files: every file whose content decides the output, fingerprinted for the cache key.
        bad_files: files that the scan already found unusable (for example a label row without a file).
        has_masks: whether `load` returns lesion masks.
    """

    data_dir: Path
    items: tuple[Any, ...]
    source_files: tuple[Path, ...]
    bad_files: tuple[BadFile, ...] = ()
    has_masks: bool = False


class DatasetAdapter(ABC):
    """One dataset layout: how its files are found, labelled and decoded into a SliceSet.

    A new dataset is one subclass in its own module, registered in aeplat.data.adapters.ADAPTERS.
    Settings objects are frozen dataclasses with validate() and as_dict(); as_dict() is part
    of the cache key, so it lists everything that changes the output.
    """

    name: ClassVar[str]

    @abstractmethod
    def settings_from_options(self, options: DataOptions) -> Any:
        """Return validated settings for the options, raising DatasetError for an option that does not apply."""

    @abstractmethod
    def model_modality(self, settings: Any) -> str:
        """Return the second part of the registered model name `<dataset>-<modality>`."""

    @abstractmethod
    def scan(self, data_dir: Path, settings: Any) -> Scan:
        """List the files and labels in data_dir, raising DatasetError when the layout is wrong."""

    @abstractmethod
    def load(self, scan: Scan, settings: Any, report: BadFileReport, progress: ProgressCallback | None) -> SliceSet:
        """Decode the scanned items, reporting each unusable file, and call progress(done, total) after each item."""


def check_folder(path: Path, what: str, option: str) -> Path:
    """Return path when it is an existing folder, else raise DatasetError naming the option."""
    path = Path(path)
    if not path.is_dir():
        state = "is a file, not a folder" if path.exists() else "does not exist"
        raise DatasetError(f"{what} {path} {state}. Pass an existing folder with {option}.")
    return path



