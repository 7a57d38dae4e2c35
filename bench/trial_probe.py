"""Timing probe for the Ray worker processes of a benchmark search.

``install`` is a Ray ``worker_process_setup_hook``: the benchmark driver passes
``"trial_probe.install"`` in the job's runtime environment, so every trial process wraps
``Trainer.train_epoch``, ``Trainer.evaluate_with_scores``, the checkpointing report of
``aeplat.platform.trainable`` and ``ray.tune.report`` with a timer. Each call appends one JSON
line to ``<folder>/probe-<pid>.jsonl``, where the folder comes from $AEPLAT_BENCH_PROBE_DIR.
Without that variable the hook changes nothing.

Each record contains the Tune trial id, the span name, the wall-clock start (``time.time()``,
comparable with MLflow run timestamps on the same machine), the duration in seconds and the
process's peak resident set size so far. Records of ``evaluate`` also contain ``val_auc``.
The library code stays as it is: the probe replaces attributes in the worker process only.

``install_driver_probe`` does the same on the driver for the MLflow callback's trial start,
result and completion calls, the artifact logging of the MLflow writer thread, and Tune's
request of a trial's process.
"""

from __future__ import annotations

import functools
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROBE_DIR_VARIABLE = "AEPLAT_BENCH_PROBE_DIR"
# Set to 1 to measure trial processes without the trim of freed memory at each trial's start.
NO_TRIM_VARIABLE = "AEPLAT_BENCH_NO_MALLOC_TRIM"


def install() -> None:
    """Wrap the trial's training, validation and report calls with timers (no-op without the variable)."""
    folder = os.environ.get(PROBE_DIR_VARIABLE)
    if not folder:
        return

    from ray import tune

    from aeplat.platform import trainable
    from aeplat.trainers.loop import Trainer

    Trainer.train_epoch = _timed(Trainer.train_epoch, "train_epoch", Path(folder))
    # Trainer.evaluate calls evaluate_with_scores, which trials call directly.
    Trainer.evaluate_with_scores = _timed(Trainer.evaluate_with_scores, "evaluate", Path(folder))
    trainable._report_with_checkpoint = _timed(trainable._report_with_checkpoint, "checkpoint_report", Path(folder))
    if os.environ.get(NO_TRIM_VARIABLE) == "1":
        trainable.release_freed_memory = lambda: False
    tune.report = _timed(tune.report, "report", Path(folder))


def install_driver_probe(folder: Path) -> None:
    """Wrap driver-side calls with timers, in this process.

    Wraps the MLflow trial callback's start, result and completion calls, its artifact logging,
    and the private TuneController._schedule_trial_actor and _schedule_trial_reset of Ray Tune
    2.60, which request a new process for a trial or hand it the process of a finished trial.
    A method that a version lacks is left out.
    """
    from ray.tune.execution.tune_controller import TuneController

    from aeplat.platform.tracking import MlflowTrialCallback

    targets = (
        (MlflowTrialCallback, "on_trial_start", "driver_trial_start"),
        (MlflowTrialCallback, "on_trial_result", "driver_trial_result"),
        (MlflowTrialCallback, "on_trial_complete", "driver_trial_complete"),
        (MlflowTrialCallback, "_log_trial_artifacts", "driver_artifacts"),
        (TuneController, "_schedule_trial_actor", "driver_request_actor"),
        (TuneController, "_schedule_trial_reset", "driver_reuse_actor"),
    )
    for owner, method, span in targets:
        original = getattr(owner, method, None)
        if original is None:
            continue
        setattr(owner, method, _timed(original, span, Path(folder), trial_id_from_arguments=True))


def read_records(folder: Path) -> list[dict[str, Any]]:
    """Return every record written under folder, sorted by start time."""
    records = []
    for path in sorted(Path(folder).glob("probe-*.jsonl")):
        with path.open(encoding="utf-8") as stream:
            records.extend(json.loads(line) for line in stream if line.strip())
    return sorted(records, key=lambda record: record["start"])


def current_rss_mib() -> float | None:
    """Return the resident set size of this process in MiB (VmRSS), or None without /proc."""
    return _status_mib("VmRSS")


def peak_rss_mib() -> float:
    """Return the peak resident set size of this process in MiB (VmHWM on Linux, else ru_maxrss)."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak

    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _status_mib(field: str) -> float | None:
    """Return a kB field of /proc/self/status in MiB, or None where the file or field is missing."""
    try:
        lines = Path("/proc/self/status").read_text(encoding="ascii").splitlines()
    except OSError:
        return None

    for line in lines:
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return None


def _timed(function: Callable[..., Any], span: str, folder: Path, trial_id_from_arguments: bool = False) -> Callable[..., Any]:
    """Wrap function so that each call appends a record. The trial id comes from the arguments or from Tune's context."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started_at = time.time()
        started = time.perf_counter()
        result = function(*args, **kwargs)
        record = {
            "trial_id": _trial_argument_id(args, kwargs) if trial_id_from_arguments else _trial_id(),
            "pid": os.getpid(),
            "span": span,
            "start": started_at,
            "seconds": time.perf_counter() - started,
            "peak_rss_mib": peak_rss_mib(),
            "rss_mib": current_rss_mib(),
        }
        if span == "evaluate":
            record["val_auc"] = float(result[0]["val_auc"])
        if span == "report":
            record["checkpoint"] = kwargs.get("checkpoint") is not None
        _append(folder, record)
        return result

    return wrapper


def _trial_id() -> str | None:
    from ray import tune

    try:
        return tune.get_context().get_trial_id()
    except Exception:  # noqa: BLE001 - outside a trial there is no id, whatever the context raises
        return None


def _trial_argument_id(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    """Return the id of a Trial argument, else the first str argument after self (a trial id)."""
    from ray.tune.experiment import Trial

    values = [*args[1:], *kwargs.values()]
    trial = next((value for value in values if isinstance(value, Trial)), None)
    if trial is not None:
        return trial.trial_id
    return next((value for value in values if isinstance(value, str)), None)


def _append(folder: Path, record: dict[str, Any]) -> None:
    with (folder / f"probe-{os.getpid()}.jsonl").open("a", encoding="utf-8") as stream:
        stream.write(json.dumps(record) + "\n")
