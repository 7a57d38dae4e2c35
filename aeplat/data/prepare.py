"""Prepare any dataset through its adapter: scan, look up the cache, decode and check the result."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from aeplat.data.adapters.base import BadFile, BadFileReport, DatasetAdapter, ProgressCallback, check_bad_file_policy
from aeplat.data.cache import PreparedDataset, SliceCache, cache_key, fingerprint_files, save_or_warn
from aeplat.data.errors import DatasetError
from aeplat.data.types import SliceSet

logger = logging.getLogger(__name__)


def prepare_dataset(
    adapter: DatasetAdapter,
    data_dir: Path,
    settings: Any,
    cache_dir: Path | None,
    on_bad_file: str = "fail",
    progress: ProgressCallback | None = None,
    known_digests: Mapping[Path, str] | None = None,
) -> PreparedDataset:
    """Return the dataset's slices, from the cache when the source files and settings match.

    The cache key covers the content of every source file the scan found, the adapter's
    name and settings, the bad-file policy and CACHE_FORMAT_VERSION. cache_dir=None turns
    caching off. On a cache hit, progress(total, total) is called once. known_digests maps
    source files to content digests computed elsewhere (see fingerprint_files).

    Raises:
        DatasetError: the layout or a label table is invalid, a file is bad under
            on_bad_file="fail", or no usable normal image remains.
    """
    settings.validate()
    check_bad_file_policy(on_bad_file)
    data_dir = Path(data_dir)

    scan = adapter.scan(data_dir, settings)
    report = BadFileReport(on_bad_file, data_dir)
    report.add_all(scan.bad_files)
    report.raise_if_failed()
    key = cache_key(
        fingerprint_files(scan.source_files, known_digests),
        {"dataset": adapter.name, "on_bad_file": on_bad_file, **settings.as_dict()},
    )

    cache = None if cache_dir is None else SliceCache(cache_dir)
    entry = None if cache is None else cache.load_entry(key)
    if entry is not None:
        slices, skipped = entry
        logger.info("Loaded %d %s images from cache entry %s.", len(slices), adapter.name, cache.path(key))
        if progress is not None:
            progress(len(scan.items), len(scan.items))
        return _prepared(slices, key, True, scan.source_files, [BadFile(name, reason) for name, reason in skipped])

    try:
        slices = adapter.load(scan, settings, report, progress)
    finally:
        # Under "fail", every file that failed to decode is listed at once, even when the
        # failures left nothing to load.
        report.raise_if_failed()
    check_usable(slices, adapter.name, data_dir, report.files)
    if cache is not None:
        save_or_warn(cache, key, slices, [(bad.name, bad.reason) for bad in report.files])
    return _prepared(slices, key, False, scan.source_files, report.files)


def check_usable(slices: SliceSet, dataset: str, data_dir: Path, skipped: list[BadFile]) -> None:
    """Raise DatasetError when no image, or no normal image, was loaded."""
    skipped_note = f" {len(skipped)} files were skipped as bad." if skipped else ""
    if len(slices) == 0:
        raise DatasetError(
            f"No image of --dataset {dataset} could be loaded from {data_dir}.{skipped_note} "
            "Check --data-dir and the dataset options against the layout that `aeplat search --help` describes."
        )
    if slices.class_counts()["normal"] == 0:
        raise DatasetError(
            f"--dataset {dataset} in {data_dir} has no normal image, so there is nothing to train the "
            f"autoencoder on.{skipped_note} Check which folders or label values mean normal."
        )


def _prepared(slices: SliceSet, key: str, hit: bool, sources: tuple[Path, ...], skipped: list[BadFile]) -> PreparedDataset:
    if skipped:
        logger.warning(
            "Skipped %d bad input files (--on-bad-file skip); `aeplat data inspect` lists them with reasons.",
            len(skipped),
        )
    return PreparedDataset(slices=slices, cache_key=key, cache_hit=hit, source_files=len(sources), skipped=tuple(skipped))
