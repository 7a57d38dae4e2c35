"""Helpers shared by the performance benchmarks in this folder.

Machine description, median and spread of repeated measurements, BraTS case subsets, an
embedded Ray whose trial processes load ``trial_probe``, and the per-trial timing that joins
MLflow child runs with probe records. The benchmark scripts import this module as a sibling,
so run them as ``.venv/bin/python bench/NAME.py``.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trial_probe import NO_TRIM_VARIABLE, PROBE_DIR_VARIABLE, install_driver_probe

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_DATA_DIR = Path("../shared/data/brats")

# A search space with one sampled value: every trial trains the same configuration, so the
# trials of a search and of two searches differ only in where and when they run.
# The learning rate varies in its fifth digit only, so the space is unbounded. The searcher ends
# a search early once every configuration of a finite space has been tried.
FIXED_SPACE_TEMPLATE = """\
dataset: brats
parameters:
  lr:
    type: float
    low: 0.001
    high: 0.0010001
constants:
  model: {model}
  latent_dim: {latent_dim}
  entropy_weight: 0.0
  hidden_dim: {hidden_dim}
  batch_size: {batch_size}
"""


@dataclass(frozen=True)
class Spread:
    """Median, quartiles, minimum and maximum of repeated measurements."""

    median: float
    first_quartile: float
    third_quartile: float
    low: float
    high: float
    count: int

    def format(self, digits: int = 2) -> str:
        """Return "median (quartiles q1 to q3; min to max; n = count)", or "value (n = 1)"."""
        if self.count == 1:
            return f"{self.median:.{digits}f} (n = 1)"
        return (
            f"{self.median:.{digits}f} (quartiles {self.first_quartile:.{digits}f} to {self.third_quartile:.{digits}f}; "
            f"{self.low:.{digits}f} to {self.high:.{digits}f}; n = {self.count})"
        )


def spread(values: Iterable[float]) -> Spread:
    items = [float(value) for value in values]
    if not items:
        raise ValueError("spread needs at least one value")
    first, _, third = statistics.quantiles(items, n=4, method="inclusive") if len(items) > 1 else (items[0],) * 3
    return Spread(statistics.median(items), first, third, min(items), max(items), len(items))


def load_average() -> str:
    """Return the 1, 5 and 15 minute load averages, as `uptime` prints them."""
    one_minute, five_minutes, fifteen_minutes = os.getloadavg()
    return f"{one_minute:.2f}, {five_minutes:.2f}, {fifteen_minutes:.2f}"


def machine_text() -> str:
    """Return the CPU count, architecture, GPU and torch version of this machine."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {gpu}, torch {torch.__version__}"


def write_fixed_space(folder: Path, latent_dim: int = 16, model: str = "ae", hidden_dim: int = 1024, batch_size: int = 64) -> Path:
    """Write a search space file whose trials train one configuration, with learning rates within 0.01 % of each other, and return its path."""
    path = Path(folder) / "fixed_space.yaml"
    text = FIXED_SPACE_TEMPLATE.format(latent_dim=latent_dim, model=model, hidden_dim=hidden_dim, batch_size=batch_size)
    path.write_text(text, encoding="utf-8")
    return path


def link_cases(data_dir: Path, count: int | None, folder: Path) -> Path:
    """Return data_dir itself when count is None, else a folder of symbolic links to its first count cases by name."""
    if count is None:
        return Path(data_dir)

    cases = sorted(path for path in Path(data_dir).iterdir() if path.is_dir())
    if count > len(cases):
        raise ValueError(f"--cases {count} exceeds the {len(cases)} cases in {data_dir}")

    subset = Path(folder) / f"brats-{count}-cases"
    subset.mkdir(parents=True, exist_ok=True)
    for case in cases[:count]:
        link = subset / case.name
        if not link.exists():
            link.symlink_to(case.resolve(), target_is_directory=True)
    return subset


def start_probed_ray(probe_dir: Path, num_cpus: int | None = None, num_gpus: int | None = None) -> None:
    """Start an embedded Ray on 127.0.0.1 whose worker processes run ``trial_probe.install``.

    Uses the options of aeplat's own embedded Ray (no dashboard, no log forwarding) and also
    installs trial_probe's driver probe in this process. A search started afterwards with
    run_search reuses this Ray and leaves it running, so several searches share one start-up.
    Call stop_ray when done.
    """
    from aeplat.platform import env

    env.apply_privacy_defaults()
    env.bind_ray_to_loopback()
    import ray

    python_path = os.pathsep.join(filter(None, [str(BENCH_DIR), os.environ.get("PYTHONPATH")]))
    runtime_env = {
        "worker_process_setup_hook": "trial_probe.install",
        "env_vars": {
            PROBE_DIR_VARIABLE: str(Path(probe_dir).resolve()),
            NO_TRIM_VARIABLE: os.environ.get(NO_TRIM_VARIABLE, "0"),
            "PYTHONPATH": python_path,
        },
    }
    Path(probe_dir).mkdir(parents=True, exist_ok=True)
    install_driver_probe(Path(probe_dir))
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        runtime_env=runtime_env,
    )


def stop_ray() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()


def quiet_libraries() -> None:
    """Keep Ray, MLflow and Optuna at WARNING, as `aeplat search` does without -v."""
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for name in ("ray", "mlflow", "optuna", "alembic", "aeplat"):
        logging.getLogger(name).setLevel(logging.WARNING)


@dataclass(frozen=True)
class ChildRun:
    """The MLflow child run of one trial: its Tune trial id, parameters and start and end times in seconds."""

    trial_id: str
    run_id: str
    start: float
    end: float
    params: dict[str, str]


def child_runs(tracking_uri: str, parent_run_id: str) -> list[ChildRun]:
    """Return the finished child runs of a search run, by start time."""
    from mlflow.tracking import MlflowClient

    from aeplat.platform.tracking import SEARCH_RUN_TAG, TRIAL_ID_TAG

    client = MlflowClient(tracking_uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{SEARCH_RUN_TAG}` = '{parent_run_id}'",
        max_results=1000,
    )
    children = [
        ChildRun(
            trial_id=run.data.tags[TRIAL_ID_TAG],
            run_id=run.info.run_id,
            start=run.info.start_time / 1000,
            end=run.info.end_time / 1000,
            params=dict(run.data.params),
        )
        for run in runs
        if run.info.end_time
    ]
    return sorted(children, key=lambda child: child.start)


@dataclass(frozen=True)
class TrialTiming:
    """Breakdown of one trial's wall time, in seconds. requested, started and ended are time.time() values.

    wall runs from Tune's request for the trial's process (a new Ray actor, or the process of a
    finished trial that Tune reuses) to the end of the driver's completion callback, where Tune
    is done with the trial. logged is when the MLflow writer thread of the driver finished
    logging the trial's model and plots, which it does while the next trial runs; without
    artifacts it equals ended. process_start runs to Tune's
    trial start callback, where MLflow's child run starts, and setup from there to the first
    train_epoch call (reading the arrays from Ray's object store, building the model). train
    and evaluate are the time inside Trainer.train_epoch and Trainer.evaluate in the trial
    process, checkpoint the time inside the checkpointing reports that returned and checkpoints
    their number. finish
    runs from the end of the trial process's last recorded call to the end of the completion
    callback: the last report (Tune stops the trial inside it, so it never returns), trial
    shutdown and the completion callback. artifacts is the writer thread's time writing and
    logging the best model and plots, and mlflow the time of the MLflow callback's calls for the
    trial inside Tune's control loop.
    Where the probe could not wrap Tune's request, requested equals started. MLflow's end
    time of the best trial's child run moves later when the search logs the registered model
    into it, so it is not used.
    """

    trial_id: str
    requested: float
    started: float
    ended: float
    logged: float
    train: float
    evaluate: float
    setup: float
    checkpoint: float
    checkpoints: int
    finish: float
    artifacts: float
    mlflow: float
    epochs: int
    peak_rss_mib: float

    @property
    def wall(self) -> float:
        return self.ended - self.requested

    @property
    def logging_lag(self) -> float:
        """Seconds from the end of the completion callback until the model and plots were in MLflow."""
        return self.logged - self.ended

    @property
    def process_start(self) -> float:
        return self.started - self.requested

    @property
    def training(self) -> float:
        return self.train + self.evaluate

    @property
    def overhead(self) -> float:
        return self.wall - self.training


def trial_timings(children: Sequence[ChildRun], records: Sequence[dict[str, Any]]) -> list[TrialTiming]:
    """Join child runs with probe records by trial id. Trials without trial-process records are left out."""
    timings = []
    for child in children:
        own = [record for record in records if record["trial_id"] == child.trial_id]
        worker = [record for record in own if not record["span"].startswith("driver_")]
        if not worker:
            continue

        seconds = {span: sum(record["seconds"] for record in own if record["span"] == span) for span in _SPANS}
        driver_callbacks = seconds["driver_trial_start"] + seconds["driver_trial_result"] + seconds["driver_trial_complete"]
        last_end = max(record["start"] + record["seconds"] for record in worker)
        started = min((record["start"] for record in own if record["span"] == "driver_trial_start"), default=child.start)
        requests = [record["start"] for record in own if record["span"] in ("driver_request_actor", "driver_reuse_actor")]
        requested = min(requests, default=started)
        ended = max((record["start"] + record["seconds"] for record in own if record["span"] == "driver_trial_complete"), default=child.end)
        logged = max((record["start"] + record["seconds"] for record in own if record["span"] == "driver_artifacts"), default=ended)
        timings.append(
            TrialTiming(
                trial_id=child.trial_id,
                requested=requested,
                started=started,
                ended=ended,
                logged=max(logged, ended),
                train=seconds["train_epoch"],
                evaluate=seconds["evaluate"],
                setup=min(record["start"] for record in worker if record["span"] == "train_epoch") - started,
                checkpoint=seconds["checkpoint_report"],
                checkpoints=sum(1 for record in worker if record["span"] == "checkpoint_report"),
                finish=ended - last_end,
                artifacts=seconds["driver_artifacts"],
                mlflow=driver_callbacks,
                epochs=sum(1 for record in worker if record["span"] == "train_epoch"),
                peak_rss_mib=max(record["peak_rss_mib"] for record in worker),
            )
        )
    return timings


_SPANS = (
    "train_epoch",
    "evaluate",
    "checkpoint_report",
    "driver_trial_start",
    "driver_trial_result",
    "driver_trial_complete",
    "driver_artifacts",
)


class Stopwatch:
    """Context manager that stores the seconds its block took in ``seconds``."""

    def __enter__(self) -> Stopwatch:
        self._started = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.seconds = time.perf_counter() - self._started
