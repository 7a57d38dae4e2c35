"""Dataset adapters, image decoding, patient splits and the slice cache.

Needs numpy, nibabel, torch, pydicom and Pillow, and never imports Ray or MLflow.
"""

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
from aeplat.data.dicom import BadFileError, DecodedImage, decode_dicom, read_stored_pixels
from aeplat.data.errors import DatasetError, SplitError
from aeplat.data.images import read_image, resize_image
from aeplat.data.preprocess import normalize_intensity
from aeplat.data.privacy import PHI_ATTRIBUTES, load_or_create_salt, pseudonymize
from aeplat.data.adapters import ADAPTERS, DATASET_NAMES, BadFile, DataOptions, DatasetAdapter, get_adapter
from aeplat.data.prepare import prepare_dataset
from aeplat.data.splits import SplitSettings, check_splits, describe_splits, minimum_patients, split_by_patient
from aeplat.data.types import ABNORMAL, NORMAL, DatasetSplits, SliceSet

__all__ = [
    "ABNORMAL",
    "ADAPTERS",
    "DATASET_NAMES",
    "BRATS_MODALITIES",
    "CACHE_FORMAT_VERSION",
    "NAMING_SCHEMES",
    "NORMAL",
    "PHI_ATTRIBUTES",
    "BadFile",
    "BadFileError",
    "BratsCase",
    "BratsSettings",
    "DataOptions",
    "DatasetAdapter",
    "DatasetError",
    "DatasetSplits",
    "DecodedImage",
    "NamingScheme",
    "PreparedDataset",
    "SliceCache",
    "SliceSet",
    "SplitError",
    "SplitSettings",
    "cache_key",
    "check_splits",
    "decode_dicom",
    "default_cache_dir",
    "describe_splits",
    "find_brats_cases",
    "fingerprint_files",
    "get_adapter",
    "load_brats",
    "load_brats_case",
    "load_brats_cases",
    "load_or_create_salt",
    "minimum_patients",
    "normalize_intensity",
    "parse_brats_file_name",
    "prepare_brats",
    "prepare_dataset",
    "pseudonymize",
    "read_image",
    "read_stored_pixels",
    "resize_image",
    "split_by_patient",
]
