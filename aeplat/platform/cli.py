"""The `aeplat` command line. Each command parses its options and calls one library function."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.logging import RichHandler

from aeplat.data.brats import BRATS_MODALITIES
from aeplat.data.errors import DatasetError
from aeplat.platform.cli_data import add_data_parser, add_dataset_options, check_modality_option, data_options_from_args, run_data
from aeplat.platform.cli_k8s import add_k8s_parser, run_k8s
from aeplat.platform.cli_report import add_report_parser, run_report
from aeplat.platform.cli_score import add_score_parser, run_score
from aeplat.platform.cli_submit import add_submit_parser, run_submit
from aeplat.platform import signals
from aeplat.platform.signals import raise_keyboard_interrupt_on_sigterm
from aeplat.platform.settings import DATASETS, SearchSettings, SettingsError
from aeplat.search_spaces import SearchSpaceError

logger = logging.getLogger(__name__)

_NOISY_LOGGERS = ("ray", "mlflow", "alembic", "optuna", "botocore", "filelock")
# urllib3 logs a WARNING for every retry of a request to an unreachable MLflow server, and the
# search logs one line of its own for the whole outage.
_RETRY_LOGGERS = ("urllib3",)


def _add_search_options(parser: argparse.ArgumentParser) -> None:
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", required=True, choices=DATASETS, help="dataset layout to read (README: Datasets)")
    data.add_argument(
        "--data-dir",
        type=_data_dir_argument,
        required=True,
        help="folder of the dataset (brats: one subfolder per case), or an s3://BUCKET/PREFIX that is downloaded into --cache-dir first",
    )
    data.add_argument(
        "--s3-endpoint-url",
        default=None,
        help="S3 endpoint of an s3:// --data-dir, such as http://127.0.0.1:9000 for MinIO (default: $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL, else AWS)",
    )
    data.add_argument("--modality", default=None, choices=BRATS_MODALITIES, help="brats: MRI sequence to train on (default: flair)")
    data.add_argument("--image-size", type=int, default=64, help="side of the square slices in pixels, a multiple of 16 (default: %(default)s)")
    data.add_argument("--validation-fraction", type=float, default=0.2, help="share of patients in the validation split (default: %(default)s)")
    data.add_argument("--test-fraction", type=float, default=0.2, help="share of patients in the held-out test split (default: %(default)s)")
    data.add_argument("--max-train-images", type=int, default=None, help="train on a random subset of at most this many normal images (default: all)")
    data.add_argument("--cache-dir", type=Path, default=None, help="folder of prepared datasets (default: $AEPLAT_CACHE_DIR, else $XDG_CACHE_HOME/aeplat, else ~/.cache/aeplat)")
    add_dataset_options(data)

    search = parser.add_argument_group("search")
    search.add_argument("--trials", type=int, default=20, help="number of configurations to try (default: %(default)s)")
    search.add_argument("--epochs", type=int, default=30, help="maximum training epochs per trial (default: %(default)s)")
    search.add_argument("--grace-period", type=int, default=None, help="epochs every trial runs before ASHA may stop it (default: 5, or --epochs when smaller)")
    search.add_argument("--reduction-factor", type=int, default=3, help="ASHA keeps 1 in this many trials at each rung (default: %(default)s)")
    search.add_argument("--max-concurrent", type=int, default=2, help="trials running at the same time (default: %(default)s)")
    search.add_argument("--max-failures", type=int, default=0, help="retries of a failed trial from its last checkpoint (default: %(default)s)")
    search.add_argument(
        "--checkpoint-interval",
        type=float,
        default=SearchSettings.checkpoint_interval,
        metavar="SECONDS",
        help=(
            "seconds between a trial's periodic checkpoints. A trial also saves one after its last epoch and where ASHA "
            "may stop it, and 0 saves one after every epoch (default: %(default)s)"
        ),
    )
    search.add_argument("--seed", type=int, default=0, help="seed of the sampler, the split and every trial (default: %(default)s)")
    search.add_argument(
        "--repeats",
        type=int,
        default=1,
        help=(
            "training runs per configuration, with seeds SEED, SEED+1, ... inside the same trial; the trial reports "
            "the mean validation AUC over the runs as the optimized metric, its standard deviation as val_auc_std "
            "and each run's metrics as seed_<seed>/<metric>, and costs REPEATS times the compute (default: %(default)s)"
        ),
    )
    resume = search.add_mutually_exclusive_group()
    resume.add_argument(
        "--resume",
        dest="resume",
        action="store_const",
        const=True,
        default=None,
        help=(
            "continue the newest unfinished search with the same data, space and search settings, also one that failed "
            "(default: the same command continues an interrupted search by itself and starts a new one otherwise)"
        ),
    )
    resume.add_argument(
        "--no-resume",
        dest="resume",
        action="store_const",
        const=False,
        help="start a new search even when an interrupted one with the same settings exists",
    )
    search.add_argument("--search-space", type=Path, default=None, help="YAML search space to use instead of the shipped one (default: aeplat/search_spaces/<dataset>.yaml)")

    compute = parser.add_argument_group("compute")
    compute.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPU cores per trial; torch uses this many threads (default: %(default)s)")
    compute.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial; fractions such as 0.25 share one GPU (default: %(default)s)")
    compute.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="torch device; auto uses CUDA when the trial has a GPU (default: %(default)s)")
    compute.add_argument("--ray-address", default=None, help="address of a running Ray cluster (default: $RAY_ADDRESS, else an embedded Ray on 127.0.0.1)")
    compute.add_argument(
        "--storage",
        type=_data_dir_argument,
        default=Path("aeplat-runs"),
        help="folder or s3://BUCKET/PREFIX of Ray Tune's trial results and checkpoints; every node must reach it (default: %(default)s)",
    )

    tracking = parser.add_argument_group("tracking")
    tracking.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")
    tracking.add_argument("--experiment", default=None, help="MLflow experiment name (default: aeplat-<dataset>-<modality>)")


def _data_dir_argument(value: str) -> Path | str:
    """Keep an s3:// URI as text, because Path would collapse its '//'; make anything else a Path."""
    return value if value.startswith("s3://") else Path(value)


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
    search.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log debug messages, including Ray's and MLflow's")
    add_k8s_parser(commands, _add_search_options)
    add_data_parser(commands)
    add_score_parser(commands)
    add_report_parser(commands)
    add_submit_parser(commands, _add_search_options)
    return parser


def settings_from_args(args: argparse.Namespace) -> SearchSettings:
    return SearchSettings(
        dataset=args.dataset,
        data_dir=args.data_dir,
        modality=check_modality_option(args.dataset, args.modality),
        image_size=args.image_size,
        trials=args.trials,
        max_concurrent=args.max_concurrent,
        epochs=args.epochs,
        grace_period=min(5, args.epochs) if args.grace_period is None else args.grace_period,
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
        s3_endpoint_url=args.s3_endpoint_url,
        search_space=args.search_space,
        max_failures=args.max_failures,
        checkpoint_interval=args.checkpoint_interval,
        device=args.device,
        repeats=args.repeats,
        resume=args.resume,
        data_options=data_options_from_args(args),
        on_bad_file=args.on_bad_file,
    )


def configure_logging(verbose: bool, console: Console) -> None:
    handler = RichHandler(console=console, show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", handlers=[handler], force=True)
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)
    for name in _RETRY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.ERROR)


def _search(args: argparse.Namespace, console: Console) -> int:
    from aeplat.platform.search import SearchError, run_search

    try:
        settings = settings_from_args(args)
        outcome = run_search(settings, console=console)
    except (SettingsError, DatasetError, SearchSpaceError, SearchError) as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2
    except KeyboardInterrupt:
        console.print("[bold red]interrupted:[/] the search stopped early; its MLflow runs are marked KILLED and no model was registered.")
        return 128 + (signals.received_signal or signal.SIGINT)

    console.print(
        f"Search finished in {outcome.wall_time_s:.0f} s: best validation AUC {outcome.best_val_auc:.4f}, "
        f"test AUC {outcome.test_metrics['auc']:.4f}, test AP {outcome.test_metrics['ap']:.4f}."
    )
    if "pixel_ap" in outcome.test_metrics:
        console.print(
            f"Test pixel AP {outcome.test_metrics['pixel_ap']:.4f}, best Dice {outcome.test_metrics['best_dice']:.4f}, "
            f"Dice at the validation threshold {outcome.test_metrics['dice_at_val_threshold']:.4f}."
        )
    champion = "champion" if outcome.is_champion else "not champion (the current champion's validation AUC is equal or higher)"
    console.print(f"Registered {settings.registered_model_name} version {outcome.registered_version}: {champion}.")
    if outcome.tracking_uri.startswith(("http://", "https://")):
        address = f"{outcome.tracking_uri.rstrip('/')}/#/experiments/{outcome.experiment_id}/runs/{outcome.parent_run_id}"
        console.print(f"Review it at {address}, or with: aeplat report {outcome.parent_run_id}")
        return 0
    mlflow_command = Path(sys.executable).parent / "mlflow"
    console.print(f"Review it with: {mlflow_command} ui --backend-store-uri {outcome.tracking_uri}  (parent run {outcome.parent_run_id})")
    console.print(f"or in the terminal with: aeplat report {outcome.parent_run_id} --tracking-uri {outcome.tracking_uri}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    configure_logging(args.verbose, console)
    raise_keyboard_interrupt_on_sigterm()

    if args.command == "search":
        return _search(args, console)
    if args.command == "k8s":
        return run_k8s(args, console)
    if args.command == "data":
        return run_data(args, console)
    if args.command == "score":
        return run_score(args, console)
    if args.command == "report":
        return run_report(args, console)
    if args.command == "submit":
        return run_submit(args, console)
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
