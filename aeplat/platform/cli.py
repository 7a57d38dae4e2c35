"""The `aeplat` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.logging import RichHandler

from aeplat.data.brats import BRATS_MODALITIES
from aeplat.data.errors import DatasetError
from aeplat.platform.settings import DATASETS, SearchSettings, SettingsError
from aeplat.search_spaces import SearchSpaceError

logger = logging.getLogger(__name__)

_NOISY_LOGGERS = ("ray", "mlflow", "alembic", "optuna", "urllib3", "botocore", "filelock")


def _add_search_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, choices=DATASETS, help="dataset layout to read")
    data.add_argument("--data-dir", type=Path, required=True, help="folder of the dataset, one subfolder per BraTS case")
    data.add_argument("--modality", default="flair", choices=BRATS_MODALITIES, help="MRI sequence to train on (default: %(default)s)")
    data.add_argument("--image-size", type=int, default=64, help="side of the square slices in pixels, a multiple of 16 (default: %(default)s)")
    data.add_argument("--validation-fraction", type=float, default=0.2, help="share of patients in the validation split (default: %(default)s)")
    data.add_argument("--test-fraction", type=float, default=0.2, help="share of patients in the held-out test split (default: %(default)s)")
    data.add_argument("--max-train-images", type=int, default=None, help="train on a random subset of at most this many normal images (default: all)")
    data.add_argument("--cache-dir", type=Path, default=None, help="folder of prepared datasets (default: $AEPLAT_CACHE_DIR or ~/.cache/aeplat)")

    search = parser.add_argument_group("search")
    search.add_argument("--trials", type=int, default=20, help="number of configurations to try (default: %(default)s)")
    search.add_argument("--epochs", type=int, default=30, help="maximum training epochs per trial (default: %(default)s)")
    search.add_argument("--grace-period", type=int, default=5, help="epochs every trial runs before ASHA may stop it (default: %(default)s)")
    search.add_argument("--reduction-factor", type=int, default=3, help="ASHA keeps 1 in this many trials at each rung (default: %(default)s)")
    search.add_argument("--max-concurrent", type=int, default=2, help="trials running at the same time (default: %(default)s)")
    search.add_argument("--max-failures", type=int, default=0, help="retries of a failed trial from its last checkpoint (default: %(default)s)")
    search.add_argument("--seed", type=int, default=0, help="seed of the sampler, the split and every trial (default: %(default)s)")
    search.add_argument("--search-space", type=Path, default=None, help="YAML search space to use instead of the shipped one (default: aeplat/search_spaces/<dataset>.yaml)")

    compute = parser.add_argument_group("compute")
    compute.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPU cores per trial; torch uses this many threads (default: %(default)s)")
    compute.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial; fractions such as 0.25 share one GPU (default: %(default)s)")
    compute.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="torch device; auto uses CUDA when the trial has a GPU (default: %(default)s)")
    compute.add_argument("--ray-address", default=None, help="address of a running Ray cluster (default: $RAY_ADDRESS, else an embedded Ray on 127.0.0.1)")
    compute.add_argument("--storage", type=Path, default=Path("aeplat-runs"), help="folder of Ray Tune's trial results and checkpoints (default: %(default)s)")

    tracking = parser.add_argument_group("tracking")
    tracking.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")
    tracking.add_argument("--experiment", default=None, help="MLflow experiment name (default: aeplat-<dataset>-<modality>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aeplat", description="Search autoencoders for anomaly detection in medical images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages, including Ray's and MLflow's")
    commands = parser.add_subparsers(dest="command", required=True)

    search = commands.add_parser(
        "search",
        help="run a hyperparameter search and register the best model",
        description=(
            "Train autoencoders on normal images with Ray Tune, propose configurations with Optuna's TPE, "
            "stop weak trials with ASHA, track every trial in MLflow, and register the best model as "
            "<dataset>-<modality> with the alias 'champion' when it beats the current champion."
        ),
    )
    _add_search_options(search)
    return parser


def settings_from_args(args: argparse.Namespace) -> SearchSettings:
    return SearchSettings(
        dataset=args.dataset,
        data_dir=args.data_dir,
        modality=args.modality,
        image_size=args.image_size,
        trials=args.trials,
        max_concurrent=args.max_concurrent,
        epochs=args.epochs,
        grace_period=min(args.grace_period, args.epochs),
        reduction_factor=args.reduction_factor,
        cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial,
        seed=args.seed,
        validation_fraction=args.validation_fraction,
        test_fraction=args.test_fraction,
        max_train_images=args.max_train_images,
        ray_address=args.ray_address,
        tracking_uri=args.tracking_uri,
        experiment=args.experiment,
        storage=args.storage,
        cache_dir=args.cache_dir,
        search_space=args.search_space,
        max_failures=args.max_failures,
        device=args.device,
    )


def configure_logging(verbose: bool, console: Console) -> None:
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler], force=True)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


def _search(args: argparse.Namespace, console: Console) -> int:
    from aeplat.platform.search import SearchError, run_search

    settings = settings_from_args(args)
    try:
        outcome = run_search(settings, console=console)
    except (SettingsError, DatasetError, SearchSpaceError, SearchError) as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2

    console.print(
        f"Search finished in {outcome.wall_time_s:.0f} s: best validation AUC {outcome.best_val_auc:.4f}, "
        f"test AUC {outcome.test_metrics['auc']:.4f}, test AP {outcome.test_metrics['ap']:.4f}."
    )
    champion = "champion" if outcome.is_champion else "not champion (the current champion scored higher)"
    console.print(f"Registered {settings.registered_model_name} version {outcome.registered_version}: {champion}.")
    console.print(f"Review it with: mlflow ui --backend-store-uri {outcome.tracking_uri}  (parent run {outcome.parent_run_id})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    configure_logging(args.verbose, console)

    if args.command == "search":
        return _search(args, console)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
