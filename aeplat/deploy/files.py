"""Score image files with a loaded scoring model, write heatmaps and a CSV of the scores."""

from __future__ import annotations

import csv
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.exceptions import MlflowException

from aeplat.deploy.heatmap import save_heatmap
from aeplat.deploy.inputs import IMAGE_COLUMN
from aeplat.deploy.pyfunc import ERROR_MAP, IMAGE, INCLUDE_IMAGES_PARAM, SCORE, SLICE_INDEX

logger = logging.getLogger(__name__)

SCORES_CSV_NAME = "scores.csv"
NIFTI_SUFFIXES = (".nii.gz", ".nii")


@dataclass(frozen=True)
class ImageScore:
    """The anomaly score of one image of a file, or the reason the file was not scored.

    Attributes:
        path: the input file.
        slice_index: the axial slice of a NIfTI volume, or -1 for a 2-D image.
        score: mean squared reconstruction error (higher is more abnormal), or None on error.
        heatmap: the written heatmap PNG, or None.
        error: why the file was not scored, or None.
    """

    path: Path
    slice_index: int = -1
    score: float | None = None
    heatmap: Path | None = None
    error: str | None = None


def score_files(model: Any, paths: Sequence[Path], output_dir: Path | None = None) -> list[ImageScore]:
    """Score every file with a pyfunc scoring model, one row per image, in input order.

    A file that cannot be read or decoded gives one row with `error` set, and the other
    files are still scored. With output_dir, a heatmap PNG per image is written there.
    """
    rows: list[ImageScore] = []
    used_names: set[str] = set()
    for path in map(Path, paths):
        try:
            rows.extend(_score_file(model, path, output_dir, used_names))
        except (OSError, MlflowException) as error:
            reason = error.message if isinstance(error, MlflowException) else f"{error.strerror or error}"
            logger.error("Failed to score %s: %s", path, reason)
            rows.append(ImageScore(path=path, error=reason))
    return rows


def _score_file(model: Any, path: Path, output_dir: Path | None, used_names: set[str]) -> list[ImageScore]:
    data = path.read_bytes()
    output = model.predict({IMAGE_COLUMN: [data]}, params={INCLUDE_IMAGES_PARAM: output_dir is not None})

    rows = []
    for position, (score, slice_index) in enumerate(zip(output[SCORE], output[SLICE_INDEX])):
        heatmap = None
        if output_dir is not None:
            title = f"{path.name}{_slice_label(int(slice_index))}: score {score:.6f}"
            target = output_dir / _unique_name(f"{_safe_stem(path)}{_slice_suffix(int(slice_index))}", used_names)
            heatmap = save_heatmap(target, output[IMAGE][position, 0], output[ERROR_MAP][position, 0], title)
        rows.append(ImageScore(path=path, slice_index=int(slice_index), score=float(score), heatmap=heatmap))
    return rows


def write_scores_csv(rows: Sequence[ImageScore], path: Path) -> Path:
    """Write the rows as CSV with columns file, slice, score, heatmap and error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["file", "slice", "score", "heatmap", "error"])
        for row in rows:
            writer.writerow(
                [
                    str(row.path),
                    "" if row.slice_index < 0 else row.slice_index,
                    "" if row.score is None else repr(row.score),
                    "" if row.heatmap is None else str(row.heatmap),
                    row.error or "",
                ]
            )
    return path


def _unique_name(stem: str, used_names: set[str]) -> str:
    """Return stem.png, or stem-2.png and so on when files of the same name were scored before."""
    name, counter = f"{stem}.png", 1
    while name in used_names:
        counter += 1
        name = f"{stem}-{counter}.png"
    used_names.add(name)
    return name


def _safe_stem(path: Path) -> str:
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    else:
        name = path.stem
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "image"


def _slice_label(slice_index: int) -> str:
    return "" if slice_index < 0 else f" slice {slice_index}"


def _slice_suffix(slice_index: int) -> str:
    return "" if slice_index < 0 else f"_slice{slice_index:03d}"
