"""Dataset adapters: one module per dataset layout, all behind the DatasetAdapter interface.

To add a dataset, write a DatasetAdapter subclass in a new module and add an instance to ADAPTERS.
"""

from __future__ import annotations

from aeplat.data.adapters.base import (
    BAD_FILE_POLICIES,
    BadFile,
    BadFileReport,
    DataOptions,
    DatasetAdapter,
    Scan,
)
from aeplat.data.adapters.brain_tumor import BrainTumorAdapter, BrainTumorSettings
from aeplat.data.adapters.brats import BratsAdapter
from aeplat.data.adapters.folder import FolderAdapter, FolderSettings
from aeplat.data.adapters.records import Box, ImageRecord
from aeplat.data.adapters.rsna import RsnaAdapter, RsnaSettings
from aeplat.data.adapters.vindr import FINDING_VOTES, VindrAdapter, VindrSettings
from aeplat.data.errors import DatasetError

ADAPTERS: dict[str, DatasetAdapter] = {
    adapter.name: adapter
    for adapter in (BratsAdapter(), RsnaAdapter(), VindrAdapter(), BrainTumorAdapter(), FolderAdapter())
}

DATASET_NAMES = tuple(ADAPTERS)


def get_adapter(name: str) -> DatasetAdapter:
    """Return the adapter registered under name, raising DatasetError for an unknown name."""
    adapter = ADAPTERS.get(name)
    if adapter is None:
        raise DatasetError(f"--dataset {name!r} is not supported; choose one of: {', '.join(DATASET_NAMES)}.")
    return adapter


__all__ = [
    "ADAPTERS",
    "BAD_FILE_POLICIES",
    "DATASET_NAMES",
    "FINDING_VOTES",
    "BadFile",
    "BadFileReport",
    "Box",
    "BrainTumorAdapter",
    "BrainTumorSettings",
    "BratsAdapter",
    "DataOptions",
    "DatasetAdapter",
    "FolderAdapter",
    "FolderSettings",
    "ImageRecord",
    "RsnaAdapter",
    "RsnaSettings",
    "Scan",
    "VindrAdapter",
    "VindrSettings",
    "get_adapter",
]
