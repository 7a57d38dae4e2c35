"""On-disk cache of preprocessed slices, keyed by the source files and the preprocessing settings.

An entry is one uncompressed .npz file. It is written to a temporary file in the cache
folder and renamed into place, so a reader sees either the whole entry or none, also when
several processes build the same entry at once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from aeplat.data.brats import BratsSettings, ProgressCallback
from aeplat.data.errors import DatasetError
from aeplat.data.types import SliceSet

if TYPE_CHECKING:
    from aeplat.data.adapters.base import BadFile

logger = logging.getLogger(__name__)

# Bump whenever the preprocessing code changes its output, so that old entries are not reused.
CACHE_FORMAT_VERSION = 1

CACHE_KEY_LENGTH = 24
_HASH_CHUNK_BYTES = 1 << 20
_REQUIRED_ARRAYS = ("images", "labels", "patient_ids", "slice_indices")


def fingerprint_files(paths: Iterable[Path], known_digests: Mapping[Path, str] | None = None) -> str:
    """Return a sha256 hex digest over the name, size and content hash of every file.

    Names are taken relative to the deepest folder that contains all files, so the same
    data copied to another place has the same fingerprint. known_digests maps a file to a
    content digest computed elsewhere, such as its S3 ETag, so the file is not read. Its
    size still comes from the file.

    Raises:
        DatasetError: a path is not a readable file.
    """
    files = sorted(Path(path).absolute() for path in paths)
    base = _common_folder(files)
    known = {Path(path).absolute(): value for path, value in (known_digests or {}).items()}

    digest = hashlib.sha256()
    for path in files:
        size_and_digest = _size_and_known_digest(path, known[path]) if path in known else _size_and_sha256(path)
        record = json.dumps([path.relative_to(base).as_posix(), *size_and_digest])
        digest.update(record.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


def cache_key(source_fingerprint: str, settings: Mapping[str, Any]) -> str:
    """Return the cache key of a source fingerprint, preprocessing settings and CACHE_FORMAT_VERSION."""
    canonical = json.dumps(
        {"format": CACHE_FORMAT_VERSION, "source": source_fingerprint, "settings": dict(settings)},
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:CACHE_KEY_LENGTH]


def default_cache_dir() -> Path:
    """Return $AEPLAT_CACHE_DIR, else $XDG_CACHE_HOME/aeplat, else ~/.cache/aeplat."""
    explicit = os.environ.get("AEPLAT_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()

    xdg_cache = os.environ.get("XDG_CACHE_HOME")
    if xdg_cache:
        return Path(xdg_cache).expanduser() / "aeplat"
    return Path.home() / ".cache" / "aeplat"


class SliceCache:
    """A folder of cached SliceSets, one `<key>.npz` file per entry."""

    def __init__(self, cache_dir: Path) -> None:
        self.cache_dir = Path(cache_dir)

    def path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.npz"

    def load(self, key: str) -> SliceSet | None:
        """Return the cached entry, or None when it is missing.

        An unreadable entry, or one with wrong arrays, is logged as a WARNING and deleted,
        so the caller rebuilds it.
        """
        entry = self.load_entry(key)
        return None if entry is None else entry[0]

    def load_entry(self, key: str) -> tuple[SliceSet, list[tuple[str, str]]] | None:
        """Return the cached slices and skipped files (name, reason), or None as load does."""
        path = self.path(key)
        if not path.is_file():
            return None

        # Besides OSError and ValueError, zipfile raises BadZipFile, and RuntimeError or its
        # subclass NotImplementedError for damaged header flags.
        try:
            with np.load(path, allow_pickle=False) as archive:
                arrays = {name: archive[name] for name in archive.files}
            return _slice_set_from_arrays(arrays), _skipped_from_arrays(arrays)
        except (OSError, EOFError, ValueError, KeyError, RuntimeError, zipfile.BadZipFile) as error:
            logger.warning("Deleting corrupt cache entry %s so that it is rebuilt: %s", path, error)
            path.unlink(missing_ok=True)
            return None

    def save(self, key: str, slices: SliceSet, skipped: Sequence[tuple[str, str]] = ()) -> Path:
        """Write an entry, with the skipped files as (name, reason) pairs, atomically and return its path."""
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        arrays = {
            "images": slices.images,
            "labels": slices.labels,
            "patient_ids": np.asarray(slices.patient_ids, dtype=np.str_),
            "slice_indices": slices.slice_indices,
        }
        if slices.masks is not None:
            arrays["masks"] = slices.masks
        if slices.source_paths is not None:
            arrays["source_paths"] = np.asarray(slices.source_paths, dtype=np.str_)
        if skipped:
            arrays["skipped_files"] = np.array([name for name, _ in skipped], dtype=np.str_)
            arrays["skipped_reasons"] = np.array([reason for _, reason in skipped], dtype=np.str_)

        handle = tempfile.NamedTemporaryFile(dir=self.cache_dir, prefix=f".{key}.", suffix=".tmp", delete=False)
        temporary = Path(handle.name)
        try:
            with handle:
                np.savez(handle, **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.path(key))
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
        return self.path(key)


@dataclass(frozen=True)
class PreparedDataset:
    """Slices ready for splitting, and where they came from.

    Attributes:
        slices: the preprocessed slices of every case.
        cache_key: the key of the slices in the cache, also set when caching is off.
        cache_hit: whether the slices were read from the cache.
        source_files: the number of source files fingerprinted.
        skipped: the files left out under --on-bad-file skip, each with its reason.
    """

    slices: SliceSet
    cache_key: str
    cache_hit: bool
    source_files: int
    skipped: tuple[BadFile, ...] = ()


def prepare_brats(
    data_dir: Path,
    settings: BratsSettings,
    cache_dir: Path | None,
    progress: ProgressCallback | None = None,
    known_digests: Mapping[Path, str] | None = None,
) -> PreparedDataset:
    """Load the BraTS slices for the settings, from the cache when the sources and settings match.

    The image of the chosen modality and the segmentation of every case are fingerprinted.
    cache_dir=None turns caching off. On a cache hit, progress(total, total) is called
    once. A cache entry that cannot be written is logged as a WARNING and the loaded
    slices are returned. known_digests is passed to fingerprint_files. This is
    prepare_dataset with the brats adapter.
    """
    from aeplat.data.adapters.brats import BratsAdapter
    from aeplat.data.prepare import prepare_dataset

    return prepare_dataset(BratsAdapter(), data_dir, settings, cache_dir, progress=progress, known_digests=known_digests)


def save_or_warn(cache: SliceCache, key: str, slices: SliceSet, skipped: Sequence[tuple[str, str]] = ()) -> None:
    """Write a cache entry, logging a WARNING in place of raising when the folder is not writable."""
    try:
        path = cache.save(key, slices, skipped)
    except OSError as error:
        logger.warning("Failed to write cache entry %s, so the slices stay uncached: %s", cache.path(key), error)
        return
    logger.info("Saved %d slices to cache entry %s.", len(slices), path)


def _common_folder(files: list[Path]) -> Path:
    if not files:
        return Path("/")
    if len(files) == 1:
        return files[0].parent
    return Path(os.path.commonpath(files))


def _size_and_known_digest(path: Path, known_digest: str) -> tuple[int, str]:
    try:
        return path.stat().st_size, known_digest
    except OSError as error:
        raise DatasetError(
            f"Failed to read source file {path} for its fingerprint: {error}. Check that it exists and is readable."
        ) from error


def _size_and_sha256(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    try:
        size = path.stat().st_size
        with path.open("rb") as stream:
            while chunk := stream.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as error:
        raise DatasetError(
            f"Failed to read source file {path} for its fingerprint: {error}. Check that it exists and is readable."
        ) from error
    return size, digest.hexdigest()


def _slice_set_from_arrays(arrays: dict[str, np.ndarray]) -> SliceSet:
    """Build a SliceSet from cached arrays, raising ValueError when a shape or dtype is wrong."""
    missing = [name for name in _REQUIRED_ARRAYS if name not in arrays]
    if missing:
        raise ValueError(f"missing arrays {', '.join(missing)}")

    images = arrays["images"]
    count = images.shape[0] if images.ndim == 4 else -1
    _expect(images.dtype == np.float32 and images.ndim == 4 and images.shape[1] == 1, "images", images)
    _expect(arrays["labels"].dtype == np.int64 and arrays["labels"].shape == (count,), "labels", arrays["labels"])
    _expect(arrays["patient_ids"].dtype.kind == "U" and arrays["patient_ids"].shape == (count,), "patient_ids", arrays["patient_ids"])
    _expect(
        arrays["slice_indices"].dtype == np.int64 and arrays["slice_indices"].shape == (count,),
        "slice_indices",
        arrays["slice_indices"],
    )

    masks = arrays.get("masks")
    if masks is not None:
        _expect(masks.dtype == np.uint8 and masks.shape == images.shape, "masks", masks)
    source_paths = arrays.get("source_paths")
    if source_paths is not None:
        _expect(source_paths.dtype.kind == "U" and source_paths.shape == (count,), "source_paths", source_paths)

    return SliceSet(
        images=images,
        labels=arrays["labels"],
        masks=masks,
        patient_ids=arrays["patient_ids"],
        slice_indices=arrays["slice_indices"],
        source_paths=source_paths,
    )


def _skipped_from_arrays(arrays: dict[str, np.ndarray]) -> list[tuple[str, str]]:
    files = arrays.get("skipped_files", np.zeros(0, dtype=np.str_))
    reasons = arrays.get("skipped_reasons", np.zeros(0, dtype=np.str_))
    _expect(files.shape == reasons.shape and files.ndim == 1, "skipped_files", files)
    return list(zip(files.tolist(), reasons.tolist()))


def _expect(condition: bool, name: str, array: np.ndarray) -> None:
    if not condition:
        raise ValueError(f"array {name} has unexpected dtype {array.dtype} or shape {array.shape}")
