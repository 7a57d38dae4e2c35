"""Replay stored grid curves through aeplat's sampler and ASHA, to compare search settings in minutes.

`search_efficiency.py --grid-file FILE` stores the validation AUC of every grid configuration
after every epoch. Trials of a real search report exactly these AUCs (the benchmark checks it),
so a trial that looks its configuration up in the file, epoch by epoch, behaves as a real one
towards the sampler and the scheduler. This script runs such trials through Ray Tune with
aeplat's TolerantOptunaSearch (Optuna TPE, multivariate, seeded) or Ray Tune's plain
OptunaSearch (--allow-repeats), ASHA and a concurrency limit, as `aeplat search` sets them up.
Each replayed epoch takes --epoch-seconds, so concurrent trials interleave as real ones do.

For every stored seed it runs --search-seeds searches: the first with the seed itself (as the
real search of that seed), the others with sampler seeds 1001, 1002, ... Each search gets
--trials trials, enough that almost every search reaches the target, and the figure is the
epochs reported until the first AUC within --tolerance of the grid's best, ÷ the grid's epochs.

    .venv/bin/python bench/search_replay.py --grid-file grid.json
    .venv/bin/python bench/search_replay.py --grid-file grid.json --allow-repeats
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from perf_common import quiet_libraries, spread


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid-file", type=Path, required=True, help="JSON file of grid AUCs written by search_efficiency.py --grid-file")
    parser.add_argument("--trials", type=int, default=40, help="trials of each search (default: %(default)s)")
    parser.add_argument("--search-seeds", type=int, default=4, help="searches per stored seed (default: %(default)s)")
    parser.add_argument("--grace-period", type=int, default=5, help="ASHA grace period in epochs; 5 is the default of aeplat search (default: %(default)s)")
    parser.add_argument("--reduction-factor", type=int, default=3, help="ASHA reduction factor (default: %(default)s)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="concurrent trials (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="validation AUC below the grid's best that counts as reached (default: %(default)s)")
    parser.add_argument("--epoch-seconds", type=float, default=0.02, help="time each replayed epoch takes (default: %(default)s)")
    parser.add_argument("--allow-repeats", action="store_true", help="use Ray Tune's plain OptunaSearch, which trains a repeated configuration again")
    return parser.parse_args(argv)


def replay_trial(config: dict[str, Any], curves: dict[str, list[float]], epoch_seconds: float) -> None:
    """Report a stored configuration's AUCs epoch by epoch, with the keys that run_trial reports."""
    from ray import tune

    key = f"{int(config['latent_dim'])},{float(config['entropy_weight'])}"
    best = float("-inf")
    for epoch, auc in enumerate(curves[key], start=1):
        time.sleep(epoch_seconds)
        best = max(best, auc)
        tune.report({"epoch": epoch, "val_auc": auc, "best_val_auc": best})


def space_text(curves: dict[str, list[float]]) -> str:
    """Return a search space over the stored configurations' values, as search_efficiency.py writes it."""
    latent_dims = sorted({int(key.split(",")[0]) for key in curves})
    weights = sorted({float(key.split(",")[1]) for key in curves})
    return (
        "dataset: brats\nparameters:\n"
        f"  latent_dim:\n    type: power_of_two\n    low: {latent_dims[0]}\n    high: {latent_dims[-1]}\n"
        f"  entropy_weight:\n    type: categorical\n    choices: {weights}\n"
        "constants:\n  model: ae\n"
    )


def run_search(curves: dict[str, list[float]], sampler_seed: int, arguments: argparse.Namespace, storage: Path) -> list[float]:
    """Run one replayed search and return its validation AUCs in the order the trials reported them."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from aeplat.platform.runner import TolerantOptunaSearch
    from aeplat.platform.search import OPTIMIZED_METRIC, SCHEDULER_METRIC
    from aeplat.search_spaces import parse_search_space

    searcher_class = OptunaSearch if arguments.allow_repeats else TolerantOptunaSearch
    searcher = searcher_class(
        space=parse_search_space(space_text(curves)),
        metric=OPTIMIZED_METRIC,
        mode="max",
        sampler=optuna.samplers.TPESampler(seed=sampler_seed, multivariate=True),
    )
    epochs = max(len(aucs) for aucs in curves.values())
    scheduler = ASHAScheduler(
        metric=SCHEDULER_METRIC,
        mode="max",
        time_attr="training_iteration",
        max_t=epochs,
        grace_period=arguments.grace_period,
        reduction_factor=arguments.reduction_factor,
    )
    reported: list[float] = []

    class RecordOrder(tune.Callback):
        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            reported.append(float(result["val_auc"]))

    tuner = tune.Tuner(
        tune.with_parameters(replay_trial, curves=curves, epoch_seconds=arguments.epoch_seconds),
        tune_config=tune.TuneConfig(
            search_alg=ConcurrencyLimiter(searcher, max_concurrent=arguments.max_concurrent),
            scheduler=scheduler,
            num_samples=arguments.trials,
            reuse_actors=True,
        ),
        run_config=tune.RunConfig(storage_path=str(storage), callbacks=[RecordOrder()], verbose=0),
    )
    tuner.fit()
    return reported


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    quiet_libraries()
    from aeplat.platform import env

    env.apply_privacy_defaults()
    env.bind_ray_to_loopback()
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    import optuna
    import ray

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    logging.getLogger("ray").setLevel(logging.ERROR)
    entries = json.loads(arguments.grid_file.read_text(encoding="utf-8"))
    ray.init(num_cpus=arguments.max_concurrent, include_dashboard=False, log_to_driver=False, configure_logging=False)

    ratios, missed = [], 0
    lines = ["| stored seed | grid epochs | target AUC | epochs to target, one per search (ratio) |", "| ---: | ---: | ---: | --- |"]
    try:
        with tempfile.TemporaryDirectory(prefix="aeplat-bench-replay-") as storage:
            for entry in entries:
                curves = {f"{int(d)},{float(weight)}": aucs for d, weight, aucs in entry["grid"]}
                grid_epochs = sum(len(aucs) for aucs in curves.values())
                target = max(max(aucs) for aucs in curves.values()) - arguments.tolerance
                seed = int(entry["settings"]["seed"])
                cells = []
                for index in range(arguments.search_seeds):
                    sampler_seed = seed if index == 0 else 1000 + index
                    reported = run_search(curves, sampler_seed, arguments, Path(storage))
                    reached = next((epoch for epoch, auc in enumerate(reported, start=1) if auc >= target), None)
                    if reached is None:
                        missed += 1
                        cells.append(f"not reached in {len(reported)}")
                        continue
                    ratios.append(reached / grid_epochs)
                    cells.append(f"{reached} ({reached / grid_epochs:.3f})")
                lines.append(f"| {seed} | {grid_epochs} | {100 * target:.1f} | {'; '.join(cells)} |")
                print(lines[-1], flush=True)
    finally:
        ray.shutdown()

    sampler = "OptunaSearch (repeats allowed)" if arguments.allow_repeats else "TolerantOptunaSearch (no repeats)"
    print()
    print(
        f"{sampler}, {arguments.trials} trials per search, grace period {arguments.grace_period}, "
        f"reduction factor {arguments.reduction_factor}, {arguments.max_concurrent} concurrent, tolerance {arguments.tolerance}"
    )
    print()
    print("\n".join(lines))
    print()
    if ratios:
        print(f"Ratio over the searches that reached the target: mean {statistics.mean(ratios):.3f}, {spread(ratios).format(3)}")
    print(f"Searches that never reached the target: {missed} of {missed + len(ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
