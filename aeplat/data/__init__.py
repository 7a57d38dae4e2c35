"""Dataset adapters, patient splits and the slice cache. Needs numpy, nibabel and torch only."""

from aeplat.data.brats import (
    BRATS_MODALITIES,
    NAMING_SCHEMES,
    BratsCase,
    BratsSettings,
    NamingScheme,
    find_brats_cases,
    load_brats,
    load_brats_case,
    load_brats_cases,
    parse_brats_file_name,
)
from aeplat.data.cache import (
    CACHE_FORMAT_VERSION,
    PreparedDataset,
    SliceCache,
    cache_key,
    default_cache_dir,
    fingerprint_files,
    prepare_brats,
)
from aeplat.data.errors import DatasetError, SplitError
from aeplat.data.preprocess import normalize_intensity
from aeplat.data.splits import SplitSettings, check_splits, describe_splits, minimum_patients, split_by_patient
from aeplat.data.types import ABNORMAL, NORMAL, DatasetSplits, SliceSet

__all__ = [
    "ABNORMAL",
    "BRATS_MODALITIES",
    "CACHE_FORMAT_VERSION",
    "NAMING_SCHEMES",
    "NORMAL",
    "BratsCase",
    "BratsSettings",
    "DatasetError",
    "DatasetSplits",
    "NamingScheme",
    "PreparedDataset",
    "SliceCache",
    "SliceSet",
    "SplitError",
    "SplitSettings",
    "cache_key",
    "check_splits",
    "default_cache_dir",
    "describe_splits",
    "find_brats_cases",
    "fingerprint_files",
    "load_brats",
    "load_brats_case",
    "load_brats_cases",
    "minimum_patients",
    "normalize_intensity",
    "parse_brats_file_name",
    "prepare_brats",
    "split_by_patient",
]
