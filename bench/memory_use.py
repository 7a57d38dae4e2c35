"""Peak memory of the search driver and of a trial process on BraTS, for growing numbers of cases.

For each --case-counts value the script links the first cases by name into a folder and runs
two fresh Python processes of itself, so each peak belongs to one step:

1. prepare: aeplat's prepare_data with an empty cache (decoding every volume), peak RSS;
2. search: run_search with the cache filled by step 1 (--trials trials of --epochs epochs,
   --max-concurrent at once), peak RSS of the driver process, and the peak RSS of each trial
   process as trial_probe records it after each Trainer call. Ray Tune runs the next trial in
   the process of a finished one, so with more trials than --max-concurrent a process runs
   several. The table gives each process's peak after its first and after its last trial, and
   its resident memory at the first training epoch of its first and of its last trial.
   --no-trim measures without the trim of freed memory that each trial does at its start.

Peak RSS is VmHWM from /proc (Linux). It counts the pages of Ray's shared-memory object store
that a process has touched, so the driver and the trials both count the arrays that
tune.with_parameters stores there once. "after start-up" is the RSS of the search process once
torch, Ray, MLflow and aeplat are imported and Ray is started, before any data is read.

    .venv/bin/python bench/memory_use.py --data-dir ../shared/data/brats --case-counts 3 7 15
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from perf_common import DEFAULT_DATA_DIR, link_cases, load_average, machine_text, spread, write_fixed_space
from trial_probe import NO_TRIM_VARIABLE, peak_rss_mib, read_records


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of BraTS cases (default: %(default)s)")
    parser.add_argument("--case-counts", type=int, nargs="+", default=[3, 7, 15], help="numbers of cases to measure (default: 3 7 15)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the slices in pixels (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=2, help="trials of each search (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each trial (default: %(default)s)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="concurrent trials (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=None, help="folder for caches, MLflow stores and Tune results (default: a new temporary folder)")
    parser.add_argument("--no-trim", action="store_true", help="turn off the trim of freed memory at the start of each trial")
    parser.add_argument("--step", choices=("prepare", "search"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--cases-dir", type=Path, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def current_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("VmRSS is missing from /proc/self/status; this benchmark needs Linux")


def step_settings(arguments: argparse.Namespace, work_dir: Path) -> Any:
    from aeplat.platform.settings import SearchSettings

    return SearchSettings(
        dataset="brats",
        data_dir=arguments.cases_dir,
        image_size=arguments.image_size,
        trials=arguments.trials,
        epochs=arguments.epochs,
        grace_period=arguments.epochs,
        max_concurrent=arguments.max_concurrent,
        tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}",
        experiment="bench-memory",
        storage=work_dir / "runs",
        cache_dir=work_dir / "cache",
        search_space=write_fixed_space(work_dir),
    )


def prepare_step(arguments: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    from aeplat.platform.search import prepare_data

    settings = step_settings(arguments, work_dir)
    after_imports = current_rss_mib()
    prepared = prepare_data(settings)
    slices = prepared.slices
    dataset_mib = (slices.images.nbytes + (0 if slices.masks is None else slices.masks.nbytes)) / 2**20
    return {"after_imports": after_imports, "peak": peak_rss_mib(), "slices": len(slices), "dataset_mib": dataset_mib, "cache_hit": prepared.cache_hit}


def search_step(arguments: argparse.Namespace, work_dir: Path) -> dict[str, Any]:
    from perf_common import quiet_libraries, start_probed_ray, stop_ray

    quiet_libraries()
    probe_dir = work_dir / "probe"
    start_probed_ray(probe_dir)
    try:
        from aeplat.platform import runner  # noqa: F401 - imported for the baseline RSS
        from aeplat.platform.search import run_search

        after_imports = current_rss_mib()
        run_search(step_settings(arguments, work_dir))
        driver_peak = peak_rss_mib()
    finally:
        stop_ray()

    records = [record for record in read_records(probe_dir) if record["trial_id"] and not record["span"].startswith("driver_")]
    trial_peaks: dict[str, float] = {}
    for record in records:
        trial_peaks[record["trial_id"]] = max(trial_peaks.get(record["trial_id"], 0.0), record["peak_rss_mib"])
    return {
        "after_imports": after_imports,
        "driver_peak": driver_peak,
        "trial_peaks": list(trial_peaks.values()),
        "processes": process_peaks(records, trial_peaks),
    }


def process_peaks(records: list[dict[str, Any]], trial_peaks: dict[str, float]) -> list[dict[str, Any]]:
    """Return, per trial process, its number of trials and its peak RSS after its first and its last trial."""
    trials_by_process: dict[int, list[str]] = {}
    start_rss: dict[str, float | None] = {}
    for record in records:  # sorted by start time
        trials = trials_by_process.setdefault(record["pid"], [])
        if record["trial_id"] not in trials:
            trials.append(record["trial_id"])
            start_rss[record["trial_id"]] = record.get("rss_mib")
    return [
        {
            "pid": pid,
            "trials": len(trials),
            "first_peak": trial_peaks[trials[0]],
            "last_peak": trial_peaks[trials[-1]],
            "start_rss": [start_rss[trial] for trial in trials],
        }
        for pid, trials in trials_by_process.items()
    ]


def run_step(step: str, arguments: argparse.Namespace, cases_dir: Path, work_dir: Path) -> dict[str, Any]:
    command = [
        sys.executable, __file__, "--step", step, "--cases-dir", str(cases_dir), "--work-dir", str(work_dir),
        "--image-size", str(arguments.image_size), "--trials", str(arguments.trials), "--epochs", str(arguments.epochs),
        "--max-concurrent", str(arguments.max_concurrent),
    ]  # fmt: skip
    environment = {**os.environ, NO_TRIM_VARIABLE: "1" if arguments.no_trim else "0"}
    completed = subprocess.run(command, capture_output=True, text=True, check=False, env=environment)
    if completed.returncode != 0:
        raise RuntimeError(f"the {step} step failed with exit code {completed.returncode}:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def measure(arguments: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    rows = []
    for count in arguments.case_counts:
        work_dir = root / f"cases-{count}"
        work_dir.mkdir(parents=True, exist_ok=True)
        cases_dir = link_cases(arguments.data_dir, count, work_dir)
        load = load_average()
        prepare = run_step("prepare", arguments, cases_dir, work_dir)
        search = run_step("search", arguments, cases_dir, work_dir)
        rows.append({"cases": count, "load": load, "prepare": prepare, "search": search})
        print(f"{count} cases: {json.dumps(rows[-1])}", flush=True)
    return rows


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| cases | slices | images + masks MiB | prepare (cold) peak MiB | search driver after start-up MiB | search driver peak MiB | trial peak MiB, median (quartiles; min to max; n) | trial processes: trials, peak MiB after the first → after the last, resident MiB at the first → at the last | load before |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for row in rows:
        prepare, search = row["prepare"], row["search"]
        trials = spread(search["trial_peaks"]).format(0) if search["trial_peaks"] else "no record"
        processes = "; ".join(
            f"{process['trials']}, {process['first_peak']:.0f} → {process['last_peak']:.0f}, {_mib(process['start_rss'][0])} → {_mib(process['start_rss'][-1])}"
            for process in search.get("processes", [])
        )
        lines.append(
            f"| {row['cases']} | {prepare['slices']} | {prepare['dataset_mib']:.1f} | {prepare['peak']:.0f} | "
            f"{search['after_imports']:.0f} | {search['driver_peak']:.0f} | {trials} | {processes or 'no record'} | {row['load']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    if arguments.step is not None:
        work_dir = arguments.work_dir.resolve()
        result = prepare_step(arguments, work_dir) if arguments.step == "prepare" else search_step(arguments, work_dir)
        print(json.dumps(result))
        return 0

    with tempfile.TemporaryDirectory(prefix="aeplat-bench-memory-") as temporary:
        root = (arguments.work_dir or Path(temporary)).resolve()
        rows = measure(arguments, root)

    print()
    trim = "without" if arguments.no_trim else "with"
    print(
        f"{arguments.image_size}×{arguments.image_size}, {arguments.trials} trials of {arguments.epochs} epochs, "
        f"{arguments.max_concurrent} concurrent, {trim} the trim of freed memory; {machine_text()}; load average at the end {load_average()}"
    )
    print()
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
