"""Parallel speedup of aeplat searches and the platform overhead of each trial, on real BraTS slices.

Runs the same search of --trials identical trials (one fixed configuration, a search space
with a single choice) through aeplat's run_search, alternately with --max-concurrent 1 and
with --concurrent trials at once, each trial with --cpus-per-trial CPUs. With one CPU per
trial on a 2-core machine, the ratio shows whether two concurrent one-thread trials keep both
cores busy. Ray is started once, before the first search, so its start-up is in neither time.

Speedup: sequential ÷ concurrent time of the trial phase, from Tune's request for the first
trial's process to the end of the last trial's completion callback on the driver. The
script also gives the ratio for the whole run_search call, which adds data loading from the
cache, MLflow set-up, scoring the best trial on the test split and registering its model.

Control: before each pair, one plain process (no Ray) trains --control-epochs epochs with
aeplat's Trainer on one thread, then two such processes train at once. Two times the time
alone ÷ the slower of the two is the speedup that the machine offered at that moment. On a
machine shared with other jobs it is below 2, and two concurrent trials can be expected to
gain about as much, not more.

Overhead per trial: the trial's wall time (Tune's request for its process to the end of the
driver's completion callback, see perf_common.TrialTiming) minus the time the trial process
spent in Trainer.train_epoch and Trainer.evaluate, measured by trial_probe inside it.

    .venv/bin/python bench/parallel_trials.py --data-dir ../shared/data/brats --repeats 4
"""

from __future__ import annotations

import argparse
import multiprocessing
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from multiprocessing.pool import Pool
from pathlib import Path

import numpy as np

from aeplat.platform.search import prepare_data, prepare_splits, run_search
from aeplat.platform.settings import SearchSettings
from perf_common import (
    DEFAULT_DATA_DIR,
    Stopwatch,
    TrialTiming,
    child_runs,
    link_cases,
    load_average,
    machine_text,
    quiet_libraries,
    spread,
    start_probed_ray,
    stop_ray,
    trial_timings,
    write_fixed_space,
)
from trial_probe import read_records


@dataclass(frozen=True)
class SearchTiming:
    """One timed search: its concurrency, its wall times in seconds and its trials."""

    concurrency: int
    search_seconds: float
    trial_phase_seconds: float
    trials: list[TrialTiming]
    load: str


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of BraTS cases (default: %(default)s)")
    parser.add_argument("--cases", type=int, default=None, help="use the first CASES cases by name (default: all)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the slices in pixels (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of every trial; ASHA never stops one early (default: %(default)s)")
    parser.add_argument(
        "--checkpoint-interval",
        type=float,
        default=SearchSettings.checkpoint_interval,
        help="seconds between a trial's periodic checkpoints, as in aeplat search (default: %(default)s)",
    )
    parser.add_argument("--max-train-images", type=int, default=None, help="train on at most this many normal slices (default: all)")
    parser.add_argument("--trials", type=int, default=8, help="trials per search (default: %(default)s)")
    parser.add_argument("--concurrent", type=int, default=2, help="--max-concurrent of the parallel searches (default: %(default)s)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs and torch threads of every trial, in both modes (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="pairs of searches, sequential then concurrent (default: %(default)s)")
    parser.add_argument("--control-epochs", type=int, default=4, help="epochs of each control run, 0 to skip the control (default: %(default)s)")
    parser.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed search of 2 one-epoch trials that starts Ray's worker processes first")
    parser.add_argument("--work-dir", type=Path, default=None, help="folder for the cache, MLflow store and Tune results (default: a new temporary folder)")
    return parser.parse_args(argv)


def base_settings(arguments: argparse.Namespace, work_dir: Path) -> SearchSettings:
    data_dir = link_cases(arguments.data_dir, arguments.cases, work_dir)
    return SearchSettings(
        dataset="brats",
        data_dir=data_dir,
        image_size=arguments.image_size,
        trials=arguments.trials,
        epochs=arguments.epochs,
        # A grace period of all epochs gives ASHA no rung, so every trial runs to the end.
        grace_period=arguments.epochs,
        cpus_per_trial=arguments.cpus_per_trial,
        checkpoint_interval=arguments.checkpoint_interval,
        max_train_images=arguments.max_train_images,
        tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}",
        experiment="bench-parallel-trials",
        storage=work_dir / "runs",
        cache_dir=work_dir / "cache",
        search_space=write_fixed_space(work_dir),
    )


def timed_search(settings: SearchSettings, probe_dir: Path) -> SearchTiming:
    load = load_average()
    with Stopwatch() as stopwatch:
        outcome = run_search(settings)
    children = child_runs(outcome.tracking_uri, outcome.parent_run_id)
    trials = trial_timings(children, read_records(probe_dir))
    # The phase ends when the last trial's model and plots are in MLflow, not when Tune is done with it.
    phase = max(trial.logged for trial in trials) - min(trial.requested for trial in trials)
    timing = SearchTiming(settings.max_concurrent, stopwatch.seconds, phase, trials, load)
    print(
        f"max_concurrent {settings.max_concurrent}: search {timing.search_seconds:.1f} s, trial phase {phase:.1f} s, "
        f"{len(trials)} trials with probe records, load before {load}",
        flush=True,
    )
    return timing


_CONTROL_DATA: dict[str, object] = {}


def _initialise_control_worker(images: np.ndarray, image_size: int) -> None:
    import torch

    torch.set_num_threads(1)
    _CONTROL_DATA.update(images=images, image_size=image_size)


def _train_control(epochs: int) -> float:
    """Train the default configuration for epochs epochs on one thread and return the seconds it took."""
    import torch

    from aeplat.trainers import Trainer, TrainingConfig

    trainer = Trainer(TrainingConfig(), image_size=int(_CONTROL_DATA["image_size"]), device=torch.device("cpu"))
    started = time.perf_counter()
    for _ in range(epochs):
        trainer.train_epoch(_CONTROL_DATA["images"])
    return time.perf_counter() - started


def control_speedup(pool: Pool, epochs: int) -> float:
    """Return 2 × the time of one control run alone ÷ the slower of two control runs at once."""
    alone = pool.apply(_train_control, (epochs,))
    together = pool.map(_train_control, [epochs, epochs], chunksize=1)
    return 2 * alone / max(together)


def speedup_table(pairs: list[tuple[SearchTiming, SearchTiming]], controls: list[float]) -> str:
    lines = [
        "| pair | control speedup | sequential trial phase s | concurrent trial phase s | speedup | sequential search s | concurrent search s | speedup | load before (seq.; conc.) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for number, (sequential, concurrent) in enumerate(pairs, start=1):
        control = f"{controls[number - 1]:.2f}" if controls else "not run"
        lines.append(
            f"| {number} | {control} | {sequential.trial_phase_seconds:.1f} | {concurrent.trial_phase_seconds:.1f} | "
            f"{sequential.trial_phase_seconds / concurrent.trial_phase_seconds:.2f} | {sequential.search_seconds:.1f} | "
            f"{concurrent.search_seconds:.1f} | {sequential.search_seconds / concurrent.search_seconds:.2f} | "
            f"{sequential.load}; {concurrent.load} |"
        )
    phase = spread(s.trial_phase_seconds / c.trial_phase_seconds for s, c in pairs)
    whole = spread(s.search_seconds / c.search_seconds for s, c in pairs)
    # Ideally 1: each concurrent trial trains on a core of its own. Near 2 means that the
    # concurrent trials shared one core's worth of CPU, for example with other jobs.
    slowdown = spread(_median_training(c) / _median_training(s) for s, c in pairs)
    control_text = f" Control speedup of two plain processes: {spread(controls).format()}." if controls else ""
    return "\n".join(lines) + (
        f"\n\nSpeedup of the trial phase: {phase.format()}. Speedup of the whole search: {whole.format()}. "
        f"Median train_epoch + evaluate time of a trial, concurrent ÷ sequential: {slowdown.format()}.{control_text}"
    )


def _median_training(search: SearchTiming) -> float:
    return spread(trial.training for trial in search.trials).median


def overhead_table(searches: list[SearchTiming]) -> str:
    lines = [
        "| max_concurrent | trials | wall s | train_epoch + evaluate s | overhead s | overhead share | process start s | set-up s | checkpoints | checkpoint reports s | finish s | MLflow callbacks s | rest s | model and plots: writer s | logged after the callback s |",
        "| ---: | ---: | --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for concurrency in sorted({search.concurrency for search in searches}):
        trials = [trial for search in searches if search.concurrency == concurrency for trial in search.trials]
        if not trials:
            continue
        wall = spread(trial.wall for trial in trials)
        training = spread(trial.training for trial in trials)
        overhead = spread(trial.overhead for trial in trials)
        share = spread(trial.overhead / trial.wall for trial in trials)
        process_start = spread(trial.process_start for trial in trials).median
        setup = spread(trial.setup for trial in trials).median
        checkpoint = spread(trial.checkpoint for trial in trials).median
        checkpoints = spread(trial.checkpoints for trial in trials).median
        finish = spread(trial.finish for trial in trials).median
        artifacts = spread(trial.artifacts for trial in trials).median
        mlflow_seconds = spread(trial.mlflow for trial in trials).median
        rest = spread(trial.overhead - trial.process_start - trial.setup - trial.checkpoint - trial.finish for trial in trials).median
        lag = spread(trial.logging_lag for trial in trials).median
        lines.append(
            f"| {concurrency} | {len(trials)} | {wall.format()} | {training.format()} | {overhead.format()} | "
            f"{share.format()} | {process_start:.2f} | {setup:.2f} | {checkpoints:.0f} | {checkpoint:.2f} | {finish:.2f} | {mlflow_seconds:.2f} | {rest:.2f} | "
            f"{artifacts:.2f} | {lag:.2f} |"
        )
    return "\n".join(lines)


def sequential_overhead(searches: list[SearchTiming]) -> str:
    """Return the trial phase of each sequential search minus its training time, per trial.

    Unlike the per-trial wall times, this also counts the time between one trial's completion
    callback and Tune's request for the next trial's process.
    """
    sequential = [search for search in searches if search.concurrency == 1 and search.trials]
    if not sequential:
        return "No sequential search to measure."
    values = [
        (search.trial_phase_seconds - sum(trial.training for trial in search.trials)) / len(search.trials)
        for search in sequential
    ]
    shares = [
        1 - sum(trial.training for trial in search.trials) / search.trial_phase_seconds
        for search in sequential
    ]
    waits, process_starts = [], []
    for search in sequential:
        trials = sorted(search.trials, key=lambda trial: trial.started)
        process_starts += [trial.started - trial.requested for trial in trials]
        waits += [following.requested - previous.ended for previous, following in zip(trials, trials[1:])]
    return (
        f"Sequential searches: trial phase minus training time, per trial: {spread(values).format()} s; "
        f"share of the trial phase not spent in train_epoch or evaluate: {spread(shares).format()}. "
        f"Between two trials: end of the completion callback to Tune's request for the next trial's process "
        f"{spread(waits).format()} s, then that request to the trial start callback (process start) "
        f"{spread(process_starts).format()} s."
    )


def run(arguments: argparse.Namespace, work_dir: Path) -> tuple[list[tuple[SearchTiming, SearchTiming]], list[float]]:
    settings = base_settings(arguments, work_dir)
    prepared = prepare_data(settings)
    print(f"{len(prepared.slices)} slices ready (cache {'hit' if prepared.cache_hit else 'miss'})", flush=True)
    splits, _ = prepare_splits(settings)

    probe_dir = work_dir / "probe"
    context = multiprocessing.get_context("spawn")
    start_probed_ray(probe_dir)
    pairs, controls = [], []
    try:
        with context.Pool(2, initializer=_initialise_control_worker, initargs=(splits.train.images, settings.image_size)) as pool:
            if arguments.warmup:
                run_search(replace(settings, trials=2, epochs=1, grace_period=1, max_concurrent=arguments.concurrent))
            for _ in range(arguments.repeats):
                if arguments.control_epochs > 0:
                    controls.append(control_speedup(pool, arguments.control_epochs))
                    print(f"control speedup {controls[-1]:.2f}, load {load_average()}", flush=True)
                sequential = timed_search(replace(settings, max_concurrent=1), probe_dir)
                concurrent = timed_search(replace(settings, max_concurrent=arguments.concurrent), probe_dir)
                pairs.append((sequential, concurrent))
    finally:
        stop_ray()
    return pairs, controls


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    quiet_libraries()
    with tempfile.TemporaryDirectory(prefix="aeplat-bench-parallel-") as temporary:
        work_dir = (arguments.work_dir or Path(temporary)).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        pairs, controls = run(arguments, work_dir)

    searches = [search for pair in pairs for search in pair]
    print()
    print(
        f"{arguments.trials} trials of {arguments.epochs} epochs at {arguments.image_size}×{arguments.image_size}, "
        f"{arguments.cpus_per_trial:g} CPU(s) per trial, sequential against {arguments.concurrent} concurrent; "
        f"{machine_text()}; load average at the end {load_average()}"
    )
    print()
    print(speedup_table(pairs, controls))
    print()
    print(overhead_table(searches))
    print()
    print(sequential_overhead(searches))
    return 0


if __name__ == "__main__":
    sys.exit(main())
