"""`aeplat data prepare` and `aeplat data inspect`, and the dataset options shared with `aeplat search`."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from aeplat.data.adapters import BAD_FILE_POLICIES, DATASET_NAMES, FINDING_VOTES, BadFile, DataOptions
from aeplat.data.brats import BRATS_MODALITIES
from aeplat.data.cache import PreparedDataset
from aeplat.data.errors import DatasetError
from aeplat.data.splits import SPLIT_NAMES, SplitSettings, check_splits, split_by_patient
from aeplat.data.types import ABNORMAL, NORMAL, SliceSet
from aeplat.platform.settings import SearchSettings, SettingsError

# Side in pixels of one image in a contact sheet, and the height of its caption strip.
SHEET_TILE = 128
SHEET_CAPTION = 16
INTENSITY_PERCENTILES = (1, 50, 99)


def add_dataset_options(group: argparse._ArgumentGroup) -> None:
    """Add the options that select and label the files of rsna, vindr and folder datasets."""
    group.add_argument("--labels-csv", type=Path, default=None, help="rsna: stage_2_train_labels.csv (default: in --data-dir); vindr: train.csv, plain or .gz (default: in --data-dir)")
    group.add_argument("--image-dir", type=Path, default=None, help="rsna and vindr: folder of the images, DICOM or PNG/JPEG named by patientId or image_id (default: stage_2_train_images or train in --data-dir, else --data-dir)")
    group.add_argument("--include-not-normal", action="store_true", help="rsna: count 'No Lung Opacity / Not Normal' as abnormal instead of leaving it out")
    group.add_argument("--finding-vote", default="any", choices=FINDING_VOTES, help="vindr: 'any' makes an image abnormal when any radiologist reported a finding, 'majority' when more than half did (default: %(default)s)")
    group.add_argument("--normal-classes", nargs="+", default=(), metavar="FOLDER", help="folder: names of the folders of normal images, for example NORMAL")
    group.add_argument("--abnormal-classes", nargs="+", default=(), metavar="FOLDER", help="folder: names of the folders of abnormal images, for example PNEUMONIA")
    group.add_argument("--patient-id-pattern", default=None, help="folder: regular expression searched in each file name, whose named group 'patient' is the patient id")
    group.add_argument("--patient-csv", type=Path, default=None, help="folder: CSV with columns file (path relative to --data-dir, or file name) and patient")
    group.add_argument("--mask-dir", type=Path, default=None, help="folder: folder of lesion masks named like their images")
    group.add_argument("--dataset-name", default=None, help="folder: lower-case name in the registered model name folder-<name> (default: images)")
    group.add_argument("--on-bad-file", default="fail", choices=BAD_FILE_POLICIES, help="fail: stop at an unreadable or unlabelled file; skip: leave such files out and list them (default: %(default)s)")


def data_options_from_args(args: argparse.Namespace) -> DataOptions:
    """Return the adapter options of parsed arguments. image_size and modality come from SearchSettings."""
    return DataOptions(
        labels_csv=args.labels_csv,
        image_dir=args.image_dir,
        include_not_normal=args.include_not_normal,
        finding_vote=args.finding_vote,
        normal_classes=tuple(args.normal_classes),
        abnormal_classes=tuple(args.abnormal_classes),
        patient_id_pattern=args.patient_id_pattern,
        patient_csv=args.patient_csv,
        mask_dir=args.mask_dir,
        name=args.dataset_name,
    )


def check_modality_option(dataset: str, modality: str | None) -> str:
    """Return the BraTS modality (flair by default), raising SettingsError when --modality is given for another dataset."""
    if modality is not None and dataset != "brats":
        raise SettingsError(f"--modality applies to --dataset brats only; remove it for --dataset {dataset}.")
    return modality or "flair"


def add_data_parser(commands: argparse._SubParsersAction) -> None:
    """Register `aeplat data prepare` and `aeplat data inspect`."""
    data = commands.add_parser("data", help="prepare or inspect a dataset without searching")
    actions = data.add_subparsers(dest="data_command", required=True)

    prepare = actions.add_parser("prepare", help="decode a dataset into the cache", description="Decode a dataset through its adapter and store it in the cache, so a later search starts at once.")
    _add_source_options(prepare)

    inspect = actions.add_parser("inspect", help="print per-split counts, intensity statistics and skipped files", description="Prepare a dataset (from the cache when possible), split it by patient and print images, patients and intensities per split and class.")
    _add_source_options(inspect)
    inspect.add_argument("--contact-sheet", type=Path, default=None, metavar="PNG", help="write a PNG grid of sample normal and abnormal images, with lesion masks outlined in red")
    inspect.add_argument("--samples", type=int, default=8, help="images per class in the contact sheet (default: %(default)s)")


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", required=True, choices=DATASET_NAMES, help="dataset layout to read")
    group.add_argument("--data-dir", type=Path, required=True, help="folder of the dataset")
    group.add_argument("--modality", default=None, choices=BRATS_MODALITIES, help="brats: MRI sequence (default: flair)")
    group.add_argument("--image-size", type=int, default=64, help="side of the square images in pixels, a multiple of 16 (default: %(default)s)")
    group.add_argument("--cache-dir", type=Path, default=None, help="folder of prepared datasets (default: $AEPLAT_CACHE_DIR or ~/.cache/aeplat)")
    group.add_argument("--validation-fraction", type=float, default=0.2, help="share of patients in the validation split (default: %(default)s)")
    group.add_argument("--test-fraction", type=float, default=0.2, help="share of patients in the test split (default: %(default)s)")
    group.add_argument("--seed", type=int, default=0, help="seed of the patient split (default: %(default)s)")
    add_dataset_options(group)


def run_data(args: argparse.Namespace, console: Console) -> int:
    """Run `aeplat data prepare` or `aeplat data inspect` and return the exit status."""
    from aeplat.platform.search import prepare_data

    try:
        settings = _settings(args)
        settings.validate()
        with _ProgressBar(console) as update:
            prepared = prepare_data(settings, progress=update)
    except (SettingsError, DatasetError) as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2

    _print_prepared(console, prepared)
    if args.data_command == "prepare":
        return 0
    return _inspect(args, console, settings, prepared)


def _settings(args: argparse.Namespace) -> SearchSettings:
    return SearchSettings(
        dataset=args.dataset,
        data_dir=args.data_dir,
        modality=check_modality_option(args.dataset, args.modality),
        image_size=args.image_size,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        cache_dir=args.cache_dir,
        data_options=data_options_from_args(args),
        on_bad_file=args.on_bad_file,
    )


class _ProgressBar:
    """A rich progress bar whose __enter__ returns a progress(done, total) callback."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("decoding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(), console=console, transient=True
        )
        self.task: Any = None

    def __enter__(self) -> Callable[[int, int], None]:
        self.progress.start()
        self.task = self.progress.add_task("decoding", total=None)
        return self.update

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def update(self, done: int, total: int) -> None:
        self.progress.update(self.task, completed=done, total=total)


def _print_prepared(console: Console, prepared: PreparedDataset) -> None:
    counts = prepared.slices.class_counts()
    source = "read from the cache" if prepared.cache_hit else "decoded and cached"
    console.print(
        f"{len(prepared.slices)} images ({counts['normal']} normal, {counts['abnormal']} abnormal) of "
        f"{len(prepared.slices.patients())} patients, {source} (key {prepared.cache_key})."
    )
    if prepared.skipped:
        console.print(f"[yellow]Skipped {len(prepared.skipped)} bad files[/] (listed by `aeplat data inspect`).")


def _inspect(args: argparse.Namespace, console: Console, settings: SearchSettings, prepared: PreparedDataset) -> int:
    split_settings = SplitSettings(settings.validation_fraction, settings.test_fraction, settings.seed)
    try:
        splits = split_by_patient(prepared.slices, split_settings)
    except DatasetError as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2

    console.print(split_table(dict(zip(SPLIT_NAMES, (splits.train, splits.validation, splits.test)))))
    if prepared.skipped:
        console.print(skipped_table(prepared.skipped))
    if args.contact_sheet is not None:
        write_contact_sheet(prepared.slices, args.contact_sheet, args.samples, settings.seed)
        console.print(f"Wrote contact sheet {args.contact_sheet}.")

    try:
        check_splits(splits)
    except DatasetError as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2
    return 0


def split_table(parts: dict[str, SliceSet]) -> Table:
    """Return a table with one row per split and class: images, patients, size and intensity statistics."""
    table = Table(title="Images per split and class")
    for column in ("split", "class", "images", "patients", "size", "mean", "std", *(f"p{q}" for q in INTENSITY_PERCENTILES)):
        table.add_column(column, justify="left" if column in ("split", "class") else "right")

    for name, part in parts.items():
        for label, class_name in ((NORMAL, "normal"), (ABNORMAL, "abnormal")):
            chosen = part.subset(part.labels == label)
            table.add_row(name, class_name, *_statistics(chosen))
    return table


def _statistics(part: SliceSet) -> list[str]:
    if len(part) == 0:
        return ["0", "0", "-", "-", "-", *("-" for _ in INTENSITY_PERCENTILES)]
    pixels = part.images.reshape(-1)
    size = f"{part.images.shape[2]}x{part.images.shape[3]}"
    percentiles = np.percentile(pixels, INTENSITY_PERCENTILES)
    return [
        str(len(part)),
        str(len(part.patients())),
        size,
        f"{pixels.mean():.3f}",
        f"{pixels.std():.3f}",
        *(f"{value:.3f}" for value in percentiles),
    ]


def skipped_table(skipped: tuple[BadFile, ...]) -> Table:
    """Return a table of skipped files and reasons."""
    table = Table(title=f"Skipped files ({len(skipped)})")
    table.add_column("file")
    table.add_column("reason")
    for bad_file in skipped:
        table.add_row(bad_file.name, bad_file.reason)
    return table


def write_contact_sheet(slices: SliceSet, path: Path, samples: int, seed: int) -> None:
    """Write a PNG with a row of random normal images above a row of random abnormal ones.

    Lesion masks, where the dataset has them, are outlined in red.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for label in (NORMAL, ABNORMAL):
        candidates = np.flatnonzero(slices.labels == label)
        rows.append(np.sort(rng.choice(candidates, min(samples, candidates.size), replace=False)))

    columns = max(1, max(len(row) for row in rows))
    sheet = Image.new("RGB", (columns * SHEET_TILE, 2 * (SHEET_TILE + SHEET_CAPTION)), "black")
    draw = ImageDraw.Draw(sheet)
    for row_number, (row, caption) in enumerate(zip(rows, ("normal", "abnormal"))):
        top = row_number * (SHEET_TILE + SHEET_CAPTION)
        for column, index in enumerate(row):
            left = column * SHEET_TILE
            draw.text((left + 2, top + 2), f"{caption} {index}", fill="white")
            sheet.paste(_tile(slices, int(index)), (left, top + SHEET_CAPTION))

    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, format="PNG")


def _tile(slices: SliceSet, index: int) -> Image.Image:
    grey = (np.clip(slices.images[index, 0], 0.0, 1.0) * 255).astype(np.uint8)
    rgb = np.repeat(grey[:, :, np.newaxis], 3, axis=2)
    if slices.masks is not None:
        mask = slices.masks[index, 0].astype(bool)
        rgb[_outline(mask)] = (255, 0, 0)
    return Image.fromarray(rgb).resize((SHEET_TILE, SHEET_TILE), Image.Resampling.NEAREST)


def _outline(mask: np.ndarray) -> np.ndarray:
    """Return the mask pixels that have a 4-neighbour outside the mask."""
    padded = np.pad(mask, 1)
    inner = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return mask & ~inner
