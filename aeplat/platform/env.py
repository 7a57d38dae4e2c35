"""Environment variables that aeplat reads or sets, declared in one place."""

from __future__ import annotations

import os

# Read by aeplat.
TRACKING_URI = "MLFLOW_TRACKING_URI"
RAY_ADDRESS = "RAY_ADDRESS"

# Set by aeplat before Ray or MLflow is imported, unless the user has set them.
_PRIVACY_DEFAULTS = {
    # Ray sends usage statistics to its authors unless this is 0.
    "RAY_USAGE_STATS_ENABLED": "0",
    # MLflow 3 sends telemetry unless this is true.
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
}

# Set by aeplat unless the user has set them, to keep the terminal readable.
_QUIET_DEFAULTS = {
    # Trials checkpoint whenever their validation AUC improves, which makes Ray Tune 2.60 warn
    # about frequent experiment snapshots on every few checkpoints. Snapshots of a local or
    # shared-folder storage take milliseconds, so the warning is switched off.
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # Ray Tune 2.60 catches SIGINT, and fit() then returns as if the search had ended, so a
    # half-trained model would be registered. Without Tune's handler, Ctrl-C raises
    # KeyboardInterrupt, and the search ends its MLflow runs as KILLED.
    "TUNE_DISABLE_SIGINT_HANDLER": "1",
    # Ray prints a notice about token authentication at every start.
    "RAY_AIR_NEW_OUTPUT": "0",
}

# Set by aeplat unless the user has set them. By default MLflow's HTTP client retries an
# unreachable tracking server 7 times with exponential backoff, which stops the search's event
# loop for minutes per write. The trial callback queues writes and retries them itself instead.
_TRACKING_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}

# Set by aeplat unless the user has set them. Ray Tune 2.60 ends the whole search when one
# result lacks the metric of the scheduler or the searcher. With this set, ASHA lets such a
# trial continue, Optuna records it as failed, and the other trials go on.
_TUNE_DEFAULTS = {"TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}

# With this set to 0, Ray 2.60 treats the machine as a single-node setup: it advertises
# 127.0.0.1 instead of the routable address and every Ray process listens on loopback only.
_LOOPBACK_ONLY = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def apply_privacy_defaults() -> None:
    """Switch off Ray usage statistics, MLflow telemetry and noisy warnings unless the user chose otherwise."""
    for name, value in {**_PRIVACY_DEFAULTS, **_QUIET_DEFAULTS, **_TRACKING_DEFAULTS, **_TUNE_DEFAULTS}.items():
        os.environ.setdefault(name, value)


def bind_ray_to_loopback() -> None:
    """Make an embedded Ray started by this process listen on 127.0.0.1 only.

    Must run before `ray` is imported, because Ray reads the variable at import time.
    """
    for name, value in _LOOPBACK_ONLY.items():
        os.environ.setdefault(name, value)


def tracking_uri_from_env() -> str | None:
    return os.environ.get(TRACKING_URI) or None


def ray_address_from_env() -> str | None:
    return os.environ.get(RAY_ADDRESS) or None
