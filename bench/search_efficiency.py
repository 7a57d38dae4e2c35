"""Epochs that aeplat's TPE + ASHA search spends to come within a tolerance of a full grid's best, on BraTS.

For each seed, the script builds the split of `aeplat search --seed SEED` (the seed also
fixes the patient split and the weight initialisation), then:

1. trains every configuration of the grid --latent-dims × --entropy-weights (model ae, the
   other settings fixed) for --epochs epochs with aeplat's Trainer on that split. It trains
   as run_trial does, on one torch thread after seed_everything(SEED), and keeps each
   configuration's best validation AUC over its epochs;
2. runs aeplat's real search (run_search: Optuna TPE, ASHA, Ray Tune, MLflow) over a search
   space with the same values, on the same split;
3. lists the search's validation AUCs in the order the trials reported them (by the end time
   of each Trainer.evaluate call, recorded by trial_probe) and counts the epochs up to the
   first AUC that lies within --tolerance of the grid's best.

The figure of a seed is those epochs ÷ the grid's epochs (configurations × --epochs); the
result is the mean over the seeds. A search that never comes within the tolerance counts all
of its epochs and is marked "not reached". For scale, the script also gives the expected
epochs until a configuration comes within the tolerance when the grid's configurations are
trained to the end in a random order, without early stopping. It also checks that search
trials and grid runs of the same configuration reported the same AUC at each epoch.

    .venv/bin/python bench/search_efficiency.py --data-dir ../shared/data/brats --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import statistics
import sys
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from aeplat.platform.search import prepare_splits, run_search
from aeplat.platform.settings import SearchSettings
from perf_common import (
    DEFAULT_DATA_DIR,
    Stopwatch,
    child_runs,
    link_cases,
    load_average,
    machine_text,
    quiet_libraries,
    start_probed_ray,
    stop_ray,
)
from trial_probe import read_records

GridKey = tuple[int, float]


@dataclass(frozen=True)
class SeedResult:
    """Outcome of one seed: the grid, the search's reported AUCs and the epochs to the target."""

    seed: int
    grid: dict[GridKey, list[float]]
    reported: list[tuple[str, GridKey, float]]
    best: float
    target: float
    epochs_to_target: int | None
    trials: int
    unreported_epochs: int
    random_order_epochs: float
    max_mismatch: float
    grid_seconds: float
    search_seconds: float
    load: str

    @property
    def grid_epochs(self) -> int:
        return sum(len(aucs) for aucs in self.grid.values())

    @property
    def ratio(self) -> float:
        spent = self.epochs_to_target if self.epochs_to_target is not None else len(self.reported)
        return spent / self.grid_epochs


def parse_arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR, help="folder of BraTS cases (default: %(default)s)")
    parser.add_argument("--cases", type=int, default=None, help="use the first CASES cases by name (default: all)")
    parser.add_argument("--image-size", type=int, default=32, help="side of the slices in pixels (default: %(default)s)")
    parser.add_argument("--epochs", type=int, default=27, help="epochs of a grid run and the maximum epochs of a search trial (default: %(default)s)")
    parser.add_argument("--max-train-images", type=int, default=None, help="train on at most this many normal slices (default: all)")
    parser.add_argument("--latent-dims", type=int, nargs="+", default=[2, 4, 8, 16, 32, 64], help="latent sizes d of the grid and the search space")
    parser.add_argument("--entropy-weights", type=float, nargs="+", default=[0.0, 0.01, 0.1, 1.0], help="entropy weights λ of the grid and the search space")
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate of every run (default: %(default)s)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds, each of which also fixes the split and the grid (default: 0 1 2)")
    parser.add_argument("--trials", type=int, default=40, help="trials of each search, enough that a search seldom ends before the target (default: %(default)s)")
    parser.add_argument("--grace-period", type=int, default=5, help="ASHA grace period in epochs; 5 is the default of aeplat search (default: %(default)s)")
    parser.add_argument("--reduction-factor", type=int, default=3, help="ASHA reduction factor (default: %(default)s)")
    parser.add_argument("--max-concurrent", type=int, default=2, help="concurrent trials of each search (default: %(default)s)")
    parser.add_argument("--tolerance", type=float, default=0.01, help="validation AUC below the grid's best that counts as reached (default: %(default)s)")
    parser.add_argument("--grid-workers", type=int, default=2, help="processes that train grid configurations, one torch thread each (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=None, help="folder for the cache, MLflow store and Tune results (default: a new temporary folder)")
    parser.add_argument(
        "--grid-file",
        type=Path,
        default=None,
        help="JSON file of grid AUCs per seed and epoch: a seed found there with the same grid settings is not trained again, and new seeds are added (default: train every grid)",
    )
    return parser.parse_args(argv)


def search_space_text(latent_dims: list[int], entropy_weights: list[float], lr: float) -> str:
    """Return a search space over exactly the grid's values. Consecutive powers of two become a power_of_two parameter."""
    dims = sorted(latent_dims)
    powers = [2**exponent for exponent in range(int(np.log2(dims[0])), int(np.log2(dims[-1])) + 1)]
    if dims == powers:
        latent = f"    type: power_of_two\n    low: {dims[0]}\n    high: {dims[-1]}\n"
    else:
        latent = f"    type: categorical\n    choices: {dims}\n"
    weights = ", ".join(repr(float(weight)) for weight in entropy_weights)
    return (
        "dataset: brats\nparameters:\n  latent_dim:\n" + latent
        + f"  entropy_weight:\n    type: categorical\n    choices: [{weights}]\n"
        + f"constants:\n  model: ae\n  lr: {lr}\n  hidden_dim: 1024\n  batch_size: 64\n"
    )


_WORKER_DATA: dict[str, object] = {}


def _initialise_grid_worker(data: dict[str, object]) -> None:
    import torch

    torch.set_num_threads(1)
    _WORKER_DATA.update(data)


def _train_grid_configuration(key: GridKey) -> tuple[GridKey, list[float]]:
    """Train one grid configuration as run_trial does and return its validation AUC after each epoch."""
    import torch

    from aeplat.trainers import Trainer, TrainingConfig, seed_everything

    data = _WORKER_DATA
    latent_dim, entropy_weight = key
    seed = int(data["seed"])
    seed_everything(seed)
    config = TrainingConfig(model="ae", latent_dim=latent_dim, entropy_weight=entropy_weight, lr=float(data["lr"]), seed=seed)
    trainer = Trainer(config, image_size=int(data["image_size"]), device=torch.device("cpu"))

    aucs = []
    for _ in range(int(data["epochs"])):
        trainer.train_epoch(data["train_images"])
        aucs.append(trainer.evaluate(data["validation_images"], data["validation_labels"])["val_auc"])
    return key, aucs


def run_grid(settings: SearchSettings, arguments: argparse.Namespace) -> dict[GridKey, list[float]]:
    splits, _ = prepare_splits(settings)
    data = {
        "seed": settings.seed,
        "lr": arguments.lr,
        "image_size": settings.image_size,
        "epochs": arguments.epochs,
        "train_images": splits.train.images,
        "validation_images": splits.validation.images,
        "validation_labels": splits.validation.labels,
    }
    keys = list(itertools.product(sorted(arguments.latent_dims), [float(weight) for weight in arguments.entropy_weights]))
    context = multiprocessing.get_context("spawn")
    with context.Pool(arguments.grid_workers, initializer=_initialise_grid_worker, initargs=(data,)) as pool:
        return dict(pool.map(_train_grid_configuration, keys))


def reported_aucs(settings: SearchSettings, parent_run_id: str, tracking_uri: str, probe_dir: Path) -> tuple[list[tuple[str, GridKey, float]], int, int]:
    """Return (trial id, configuration, validation AUC) of every reported epoch of a search in report order, its trial count, and its unreported epochs.

    A trial's reported epochs are its val_auc steps in MLflow, and the probe's evaluate records
    of the trial give their order. An epoch that a trial trained after its last report, before
    Tune stopped it, is counted as unreported.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    records = [record for record in read_records(probe_dir) if record["span"] == "evaluate"]
    events = []
    unreported = 0
    children = child_runs(tracking_uri, parent_run_id)
    for child in children:
        key = (int(child.params["latent_dim"]), float(child.params["entropy_weight"]))
        reported = len(client.get_metric_history(child.run_id, "val_auc"))
        own = [record for record in records if record["trial_id"] == child.trial_id]
        unreported += max(0, len(own) - reported)
        own = own[:reported]
        events += [(record["start"] + record["seconds"], child.trial_id, key, record["val_auc"]) for record in own]
    events.sort()
    return [(trial_id, key, auc) for _, trial_id, key, auc in events], len(children), unreported


def random_order_epochs(grid: dict[GridKey, list[float]], target: float, samples: int = 20_000, seed: int = 0) -> float:
    """Return the expected epochs until a grid configuration reaches target, training configurations fully in random order."""
    costs = []
    for aucs in grid.values():
        reached = next((epoch for epoch, auc in enumerate(aucs, start=1) if auc >= target), None)
        costs.append((len(aucs), reached))

    generator = np.random.default_rng(seed)
    totals = []
    for _ in range(samples):
        spent = 0
        for index in generator.permutation(len(costs)):
            epochs, reached = costs[index]
            if reached is not None:
                spent += reached
                break
            spent += epochs
        totals.append(spent)
    return float(np.mean(totals))


def largest_mismatch(grid: dict[GridKey, list[float]], reported: list[tuple[str, GridKey, float]]) -> float:
    """Return the largest |AUC difference| between an epoch of a search trial and the same epoch of the grid run of its configuration."""
    epochs_seen: dict[str, int] = {}
    largest = 0.0
    for trial_id, key, auc in reported:
        epoch = epochs_seen.get(trial_id, 0)
        epochs_seen[trial_id] = epoch + 1
        grid_aucs = grid.get(key)
        if grid_aucs is not None and epoch < len(grid_aucs):
            largest = max(largest, abs(grid_aucs[epoch] - auc))
    return largest


def grid_settings(arguments: argparse.Namespace, settings: SearchSettings) -> dict[str, object]:
    """Return what determines a seed's grid, to check that a stored grid still applies."""
    return {
        "data_dir": str(Path(arguments.data_dir).resolve()),
        "cases": arguments.cases,
        "image_size": arguments.image_size,
        "epochs": arguments.epochs,
        "max_train_images": arguments.max_train_images,
        "latent_dims": sorted(arguments.latent_dims),
        "entropy_weights": sorted(float(weight) for weight in arguments.entropy_weights),
        "lr": arguments.lr,
        "seed": settings.seed,
    }


def stored_grid(path: Path | None, expected: dict[str, object]) -> dict[GridKey, list[float]] | None:
    if path is None or not path.is_file():
        return None
    for entry in json.loads(path.read_text(encoding="utf-8")):
        if entry["settings"] == expected:
            return {(int(d), float(weight)): aucs for d, weight, aucs in entry["grid"]}
    return None


def store_grid(path: Path | None, settings: dict[str, object], grid: dict[GridKey, list[float]]) -> None:
    if path is None:
        return
    entries = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []
    entries = [entry for entry in entries if entry["settings"] != settings]
    entries.append({"settings": settings, "grid": [[d, weight, aucs] for (d, weight), aucs in sorted(grid.items())]})
    path.write_text(json.dumps(entries, indent=1), encoding="utf-8")


def run_seed(seed: int, base: SearchSettings, arguments: argparse.Namespace, probe_dir: Path) -> SeedResult:
    settings = replace(base, seed=seed)
    load = load_average()
    expected = grid_settings(arguments, settings)
    with Stopwatch() as grid_time:
        grid = stored_grid(arguments.grid_file, expected)
        if grid is None:
            grid = run_grid(settings, arguments)
            store_grid(arguments.grid_file, expected, grid)
    with Stopwatch() as search_time:
        outcome = run_search(settings)
    reported, trials, unreported = reported_aucs(settings, outcome.parent_run_id, outcome.tracking_uri, probe_dir)

    best = max(max(aucs) for aucs in grid.values())
    target = best - arguments.tolerance
    epochs_to_target = next((index for index, (_, _, auc) in enumerate(reported, start=1) if auc >= target), None)
    result = SeedResult(
        seed=seed,
        grid=grid,
        reported=reported,
        best=best,
        target=target,
        epochs_to_target=epochs_to_target,
        trials=trials,
        unreported_epochs=unreported,
        random_order_epochs=random_order_epochs(grid, target),
        max_mismatch=largest_mismatch(grid, reported),
        grid_seconds=grid_time.seconds,
        search_seconds=search_time.seconds,
        load=load,
    )
    reached = "not reached" if epochs_to_target is None else f"{epochs_to_target} epochs"
    print(
        f"seed {seed}: grid best {best:.4f} in {grid_time.seconds:.0f} s, search {reached} of {len(reported)} "
        f"({trials} trials, {search_time.seconds:.0f} s), ratio {result.ratio:.3f}, load before {load}",
        flush=True,
    )
    return result


def rank_correlation_table(results: list[SeedResult]) -> str:
    """Return, per seed and epoch, Spearman's correlation between the grid's AUC at that epoch and each configuration's best AUC.

    It shows from which epoch on a scheduler that compares AUCs can tell the good
    configurations from the others.
    """
    from scipy.stats import spearmanr

    epochs = min(len(aucs) for result in results for aucs in result.grid.values())
    # Every epoch up to 12, else the first ones, ASHA's rungs (1, 3, 9, 27) and the last.
    if epochs <= 12:
        shown_epochs = list(range(1, epochs + 1))
    else:
        shown_epochs = sorted({1, 2, 3, 5, 9, 15, 21, 27, epochs} & set(range(1, epochs + 1)))

    lines = [
        "| seed | " + " | ".join(f"epoch {epoch}" for epoch in shown_epochs) + " |",
        "| ---: | " + " | ".join("---:" for _ in shown_epochs) + " |",
    ]
    for result in results:
        curves = list(result.grid.values())
        best = [max(aucs) for aucs in curves]
        cells = [f"{spearmanr([aucs[epoch - 1] for aucs in curves], best)[0]:+.2f}" for epoch in shown_epochs]
        lines.append(f"| {result.seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(result: SeedResult) -> str:
    weights = sorted({key[1] for key in result.grid})
    lines = [
        "| d | " + " | ".join(f"λ = {weight:g}" for weight in weights) + " |",
        "| ---: | " + " | ".join("---:" for _ in weights) + " |",
    ]
    for latent_dim in sorted({key[0] for key in result.grid}):
        cells = [f"{100 * max(result.grid[(latent_dim, weight)]):.1f}" for weight in weights]
        lines.append(f"| {latent_dim} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_table(results: list[SeedResult]) -> str:
    lines = [
        "| seed | grid best val AUC | configs within tolerance | grid epochs | search best val AUC | search epochs to target | search epochs in all | epochs trained after a trial's last report | trials (distinct configs) | ratio | random order, expected epochs | largest AUC mismatch | load before |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for result in results:
        within = sum(1 for aucs in result.grid.values() if max(aucs) >= result.target)
        reached = "not reached" if result.epochs_to_target is None else str(result.epochs_to_target)
        ratio = f"{result.ratio:.3f}" if result.epochs_to_target is not None else f"not reached (> {result.ratio:.3f})"
        search_best = max(auc for _, _, auc in result.reported)
        distinct = len({key for _, key, _ in result.reported})
        lines.append(
            f"| {result.seed} | {100 * result.best:.1f} | {within} of {len(result.grid)} | {result.grid_epochs} | "
            f"{100 * search_best:.1f} | {reached} | {len(result.reported)} | {result.unreported_epochs} | {result.trials} ({distinct}) | {ratio} | {result.random_order_epochs:.1f} | "
            f"{result.max_mismatch:.2g} | {result.load} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    quiet_libraries()
    results = []
    with Stopwatch() as total, tempfile.TemporaryDirectory(prefix="aeplat-bench-search-") as temporary:
        work_dir = (arguments.work_dir or Path(temporary)).resolve()
        work_dir.mkdir(parents=True, exist_ok=True)
        space_path = work_dir / "grid_space.yaml"
        space_path.write_text(search_space_text(arguments.latent_dims, arguments.entropy_weights, arguments.lr), encoding="utf-8")
        base = SearchSettings(
            dataset="brats",
            data_dir=link_cases(arguments.data_dir, arguments.cases, work_dir),
            image_size=arguments.image_size,
            trials=arguments.trials,
            epochs=arguments.epochs,
            grace_period=arguments.grace_period,
            reduction_factor=arguments.reduction_factor,
            max_concurrent=arguments.max_concurrent,
            max_train_images=arguments.max_train_images,
            tracking_uri=f"sqlite:///{work_dir / 'mlflow.db'}",
            experiment="bench-search-efficiency",
            storage=work_dir / "runs",
            cache_dir=work_dir / "cache",
            search_space=space_path,
        )

        probe_dir = work_dir / "probe"
        start_probed_ray(probe_dir)
        try:
            results = [run_seed(seed, base, arguments, probe_dir) for seed in arguments.seeds]
        finally:
            stop_ray()

    print()
    print(
        f"{len(results[0].grid)} configurations × {arguments.epochs} epochs at {arguments.image_size}×{arguments.image_size}, "
        f"search {arguments.trials} trials, grace period {arguments.grace_period}, reduction factor {arguments.reduction_factor}, "
        f"{arguments.max_concurrent} concurrent, tolerance {arguments.tolerance}; {machine_text()}; "
        f"{total.seconds / 60:.1f} minutes in all; load average at the end {load_average()}"
    )
    print()
    print(summary_table(results))
    print()
    mean = statistics.mean(result.ratio for result in results)
    missed = sum(1 for result in results if result.epochs_to_target is None)
    note = f" ({missed} search(es) never reached the target and count all their epochs, so the mean is a lower bound)" if missed else ""
    print(f"Mean ratio over {len(results)} seeds: {mean:.3f}{note}")
    print()
    print("Rank correlation (Spearman) of each configuration's validation AUC at an epoch with its best AUC over all epochs:")
    print()
    print(rank_correlation_table(results))
    for result in results:
        print()
        print(f"Grid of seed {result.seed}, best validation AUC (%) over {arguments.epochs} epochs:")
        print()
        print(grid_table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
