"""Trials per hour per GPU when several aeplat trials share one GPU (fractional --gpus-per-trial).

For each fraction in --fractions (default 1, 0.5, 0.25, 0.125, that is 1, 2, 4 and 8 trials
per GPU) the script runs aeplat's run_search with --gpus-per-trial FRACTION, --device cuda,
--max-concurrent (GPUs ÷ FRACTION) and --rounds × that many identical trials (one fixed
configuration, no early stopping), so every search runs full waves of concurrent trials.
The fractions are interleaved over --repeats rounds, their order reversed every other round.
Ray is started once, before the first search.

Trials per hour per GPU = trials ÷ trial phase (Tune's request for the first trial's process to
the end of the last trial's completion callback, on the driver) in hours ÷ GPUs. The table
goes to standard output and, with --output, to a markdown file.

The script stops at once with exit code 2 when torch finds no CUDA device, before any data
is read or Ray is started.

    .venv/bin/python bench/gpu_packing.py --data-dir ../shared/data/brats --output gpu_packing.md
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

NO_CUDA_EXIT_CODE = 2


@dataclass(frozen=True)
class PackingRun:
    """One search at one GPU fraction."""

    fraction: float
    concurrency: int
    trials: int
    phase_seconds: float
    trial_seconds: list[float]
    load: str


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data/brats"), help="folder of BraTS cases (default: %(default)s)")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.25, 0.125], help="--gpus-per-trial values (default: 1 0.5 0.25 0.125)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the slices in pixels (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=10, help="epochs of every trial (default: %(default)s)")
    parser.add_argument("--max-train-images", type=int, default=None, help="train on at most this many normal slices (default: all)")
    parser.add_argument("--rounds", type=int, default=2, help="waves of concurrent trials per search (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=2, help="searches per fraction, interleaved (default: %(default)s)")
    parser.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs of every trial (default: %(default)s)")
    parser.add_argument("--output", type=Path, default=None, help="markdown file to write the table to (default: standard output only)")
    parser.add_argument("--work-dir", type=Path, default=None, help="folder for the cache, MLflow store and Tune results (default: a new temporary folder)")
    return parser.parse_args(argv)


def require_cuda() -> int:
    """Return the number of CUDA devices that torch finds, or exit with NO_CUDA_EXIT_CODE and a message when there is none."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 0:
        return torch.cuda.device_count()
    print(
        f"error: no CUDA device found (torch {torch.__version__}, CUDA build {torch.version.cuda or 'none'}, "
        f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). This benchmark measures GPU "
        "packing and needs a machine with an NVIDIA GPU and a CUDA build of torch.",
        file=sys.stderr,
    )
    raise SystemExit(NO_CUDA_EXIT_CODE)


def check_fractions(fractions: list[float], gpus: int, cpus_per_trial: float) -> None:
    """Raise SystemExit with a message when a fraction is not 1/k or the concurrent trials need more CPUs than exist."""
    for fraction in fractions:
        per_gpu = round(1 / fraction) if fraction > 0 else 0
        if not 0 < fraction <= 1 or abs(per_gpu * fraction - 1) > 1e-9:
            raise SystemExit(f"error: --fractions {fraction:g} is not 1/k for a whole k; use values such as 1, 0.5, 0.25, 0.125.")
        needed = per_gpu * gpus * cpus_per_trial
        if needed > (os.cpu_count() or 1):
            raise SystemExit(
                f"error: {per_gpu * gpus} concurrent trials at --gpus-per-trial {fraction:g} need {needed:g} CPUs but the "
                f"machine has {os.cpu_count()}. Lower --cpus-per-trial or drop that fraction."
            )


def run_packing(fraction: float, gpus: int, base, probe_dir: Path) -> PackingRun:  # noqa: ANN001 - SearchSettings
    from aeplat.platform.search import run_search
    from perf_common import child_runs, load_average, trial_timings
    from trial_probe import read_records

    concurrency = round(gpus / fraction)
    settings = replace(base, gpus_per_trial=fraction, max_concurrent=concurrency, trials=concurrency * base.trials)
    load = load_average()
    outcome = run_search(settings)
    timings = trial_timings(child_runs(outcome.tracking_uri, outcome.parent_run_id), read_records(probe_dir))
    phase = max(timing.ended for timing in timings) - min(timing.requested for timing in timings)
    run = PackingRun(fraction, concurrency, len(timings), phase, [timing.wall for timing in timings], load)
    print(f"gpus per trial {fraction:g}: {run.trials} trials in {phase:.1f} s, {trials_per_hour(run, gpus):.0f} trials/h/GPU", flush=True)
    return run


def trials_per_hour(run: PackingRun, gpus: int) -> float:
    return run.trials / (run.phase_seconds / 3600) / gpus


def table(runs: list[PackingRun], gpus: int) -> str:
    from perf_common import spread

    lines = [
        "| GPUs per trial | trials per GPU | trials/h/GPU, median (quartiles; min to max; n) | ratio to 1 trial per GPU | trial wall s (median) |",
        "| ---: | ---: | --- | ---: | ---: |",
    ]
    fractions = sorted({run.fraction for run in runs}, reverse=True)
    baseline = None
    for fraction in fractions:
        own = [run for run in runs if run.fraction == fraction]
        rate = spread(trials_per_hour(run, gpus) for run in own)
        baseline = baseline or rate.median
        walls = spread(wall for run in own for wall in run.trial_seconds)
        lines.append(
            f"| {fraction:g} | {round(1 / fraction)} | {rate.format(0)} | {rate.median / baseline:.2f} | {walls.median:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    gpus = require_cuda()
    check_fractions(arguments.fractions, gpus, arguments.cpus_per_trial)

    from aeplat.platform.settings import SearchSettings
    from perf_common import load_average, machine_text, quiet_libraries, start_probed_ray, stop_ray, write_fixed_space

    quiet_libraries()
    runs = []
    with tempfile.TemporaryDirectory(prefix="aeplat-bench-gpu-") as temporary:
        work_dir = (arguments.work_dir or Path(temporary)).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        base = SearchSettings(
            dataset="brats",
            data_dir=arguments.data_dir,
            image_size=arguments.image_size,
            trials=arguments.rounds,
            epochs=arguments.epochs,
            grace_period=arguments.epochs,
            cpus_per_trial=arguments.cpus_per_trial,
            device="cuda",
            max_train_images=arguments.max_train_images,
            tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}",
            experiment="bench-gpu-packing",
            storage=work_dir / "runs",
            cache_dir=work_dir / "cache",
            search_space=write_fixed_space(work_dir),
        )
        probe_dir = work_dir / "probe"
        start_probed_ray(probe_dir, num_gpus=gpus)
        try:
            for repeat in range(arguments.repeats):
                order = arguments.fractions if repeat % 2 == 0 else list(reversed(arguments.fractions))
                runs += [run_packing(fraction, gpus, base, probe_dir) for fraction in order]
        finally:
            stop_ray()

    text = (
        f"{arguments.image_size}×{arguments.image_size}, {arguments.epochs} epochs per trial, {arguments.rounds} waves of "
        f"trials per search, {arguments.cpus_per_trial:g} CPU(s) per trial, {gpus} GPU(s); {machine_text()}; "
        f"load average at the end {load_average()}\n\n{table(runs, gpus)}\n"
    )
    print()
    print(text)
    if arguments.output is not None:
        arguments.output.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
