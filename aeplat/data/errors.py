"""Errors raised for invalid input data. Each message names the file or value and the fix."""


class DatasetError(ValueError):
    """A dataset folder, file or setting cannot be used."""


class SplitError(DatasetError):
    """A split would leave a metric undefined or leak a patient between splits."""
