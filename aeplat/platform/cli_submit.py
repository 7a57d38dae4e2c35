"""`aeplat submit`: run `aeplat search` as a job on a running Ray cluster and follow its logs."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn
from urllib.parse import urlsplit

from rich.console import Console
from rich.markup import escape

from aeplat.data.errors import DatasetError
from aeplat.platform import env, signals, submit
from aeplat.platform.settings import SettingsError
from aeplat.platform.submit import SubmitError, job_server_address, parse_runtime_env

logger = logging.getLogger(__name__)

AddOptions = Callable[[argparse.ArgumentParser], None]

# Search options whose values name files or folders; the job reads them on the cluster.
_PATH_OPTIONS = ("data_dir", "storage", "cache_dir", "search_space", "labels_csv", "image_dir", "patient_csv", "mask_dir")

# Search options that may carry a URL with a password, which would be stored with the job.
_URL_OPTIONS = ("tracking_uri", "s3_endpoint_url")

_DESCRIPTION = """\
Submit `aeplat search SEARCH_OPTIONS` to the job server of a running Ray cluster and
stream the job's logs. The exit status is 0 when the job succeeded, 1 when it failed
or was stopped, and 2 when the options are invalid or the job could not be submitted.
The search runs with the environment of the cluster's nodes and connects to that
cluster, so paths and credentials are the cluster's. Ctrl-C stops following the job
and leaves it running.
"""

_EXAMPLE = """example:
  aeplat submit --address http://127.0.0.1:8265 -- \\
      --dataset brats --data-dir /data/brats --trials 20 \\
      --storage s3://bucket/aeplat-runs --tracking-uri http://mlflow:5000
"""


def add_submit_parser(commands: Any, add_search_options: AddOptions) -> None:
    """Add the `submit` command, which takes `aeplat search` options after '--'."""
    parser = commands.add_parser(
        "submit",
        help="run `aeplat search` as a job on a running Ray cluster and stream its logs",
        usage="aeplat submit [-h] [--address URL] [--job-id ID] [--runtime-env-json JSON] [--no-wait] -- SEARCH_OPTIONS",
        description=_DESCRIPTION,
        epilog=_EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--address",
        default=None,
        help="URL of the cluster's job server, which is the Ray dashboard's address, such as http://HEAD:8265 "
        "(default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS when it is an http:// or https:// URL)",
    )
    parser.add_argument(
        "--job-id",
        "--submission-id",
        dest="job_id",
        default=None,
        help="id of the job, unique on the cluster (default: an id that Ray generates, raysubmit_...)",
    )
    parser.add_argument(
        "--runtime-env-json",
        default=None,
        metavar="JSON",
        help="Ray runtime environment of the job, such as '{\"env_vars\": {\"MLFLOW_TRACKING_URI\": \"http://mlflow:5000\"}}'. "
        "Ray stores it with the job, so env_vars that look like credentials are rejected (default: none)",
    )
    parser.add_argument("--no-wait", action="store_true", help="print the job id and exit after submitting instead of streaming the logs")
    parser.add_argument(
        "search_args",
        nargs=argparse.REMAINDER,
        metavar="-- SEARCH_OPTIONS",
        help="options of `aeplat search` (see aeplat search --help), after '--'",
    )
    parser.set_defaults(add_search_options=add_search_options)


def run_submit(args: argparse.Namespace, console: Console) -> int:
    """Submit the search, follow it unless --no-wait, and return the exit status."""
    try:
        search_args = _search_arguments(args.search_args)
        search = parse_search_options(search_args, args.add_search_options)
        check_search_options(search)
        address = job_server_address(args.address, os.environ)
        runtime_env = parse_runtime_env(args.runtime_env_json)
    except SubmitError as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}")
        return 2

    _warn_about_cluster_paths(search)
    # Ray reads these when connect() imports it, so they are set first.
    env.apply_privacy_defaults()

    try:
        client = submit.connect(address)
        _quiet_ray_logger()
        job_id = submit.submit_job(client, search_args, args.job_id, runtime_env)
    except SubmitError as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}")
        return 2
    except KeyboardInterrupt:
        console.print(
            f"Interrupted before the job server confirmed the job. Check whether it was submitted with "
            f"`ray job list --address {escape(address)}`."
        )
        return 128 + (signals.received_signal or signal.SIGINT)

    console.print(f"Submitted job {escape(job_id)} to {escape(address)}: {escape(submit.search_entrypoint(search_args))}")
    if args.no_wait:
        sys.stdout.write(job_id + "\n")
        console.print(f"Follow it with: ray job logs {escape(job_id)} --address {escape(address)} --follow")
        console.print(f"Stop it with:   ray job stop {escape(job_id)} --address {escape(address)}")
        return 0

    return _follow(client, job_id, address, console)


def _follow(client: Any, job_id: str, address: str, console: Console) -> int:
    try:
        outcome = submit.follow_job(client, job_id, _write_stdout)
    except KeyboardInterrupt:
        console.print(
            f"Stopped following job {escape(job_id)}. It keeps running on the cluster. "
            f"Follow it again with `ray job logs {escape(job_id)} --address {escape(address)} --follow`, "
            f"or stop it with `ray job stop {escape(job_id)} --address {escape(address)}`."
        )
        return 128 + (signals.received_signal or signal.SIGINT)
    except SubmitError as error:
        console.print(
            f"[bold red]error:[/] {escape(str(error))} The job may still be running: check it with "
            f"`ray job status {escape(job_id)} --address {escape(address)}`."
        )
        return 1

    if outcome.succeeded:
        console.print(f"Job {escape(job_id)} {outcome.status}.")
        return 0
    console.print(f"[bold red]Job {escape(job_id)} {outcome.status}:[/] {escape(outcome.summary())}")
    return 1


def _quiet_ray_logger() -> None:
    # Ray 2.60's job client sets its own logger to INFO when imported, and it then prints lines
    # such as "WebSocket closed" between the job's logs. With -v they are kept.
    if logging.getLogger("aeplat").getEffectiveLevel() > logging.DEBUG:
        logging.getLogger("ray.dashboard.modules.job.sdk").setLevel(logging.WARNING)


def _write_stdout(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def _search_arguments(remainder: list[str]) -> list[str]:
    """Return the search options after '--', which argparse keeps at the start of a REMAINDER argument."""
    search_args = remainder[1:] if remainder[:1] == ["--"] else list(remainder)
    if not search_args:
        raise SubmitError(
            "No search options. Put the options of `aeplat search` after '--', for example: "
            "aeplat submit --address http://127.0.0.1:8265 -- --dataset brats --data-dir /data/brats"
        )
    return search_args


class _SearchOptionsParser(argparse.ArgumentParser):
    """A parser of `aeplat search` options that raises SubmitError instead of exiting."""

    def error(self, message: str) -> NoReturn:
        raise SubmitError(f"Invalid search options after '--': {message}. See `aeplat search --help`.")


def parse_search_options(search_args: list[str], add_search_options: AddOptions) -> argparse.Namespace:
    """Parse search_args as `aeplat search` would, so that a typo fails here instead of on the cluster."""
    parser = _SearchOptionsParser(prog="aeplat search", add_help=False)
    add_search_options(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser.parse_args(search_args)


def check_search_options(search: argparse.Namespace) -> None:
    """Raise SubmitError for search options that cannot work in a job or that put a password on the command line."""
    from aeplat.platform.cli import settings_from_args

    if search.ray_address is not None:
        raise SubmitError(
            f"--ray-address {search.ray_address!r} does not apply to a submitted search: the job connects to the "
            "cluster it runs on. Remove it."
        )
    for dest in _URL_OPTIONS:
        value = getattr(search, dest, None)
        if value is not None and urlsplit(value).password is not None:
            raise SubmitError(
                f"--{dest.replace('_', '-')} contains a password. Ray stores the job's command line and shows it on "
                "the dashboard; set the credentials in the environment of the cluster's nodes instead "
                "(MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD for an MLflow server)."
            )

    try:
        settings = settings_from_args(search)
        settings.validate()
        settings.model_modality  # noqa: B018 - the dataset adapter checks its options here
    except (SettingsError, DatasetError) as error:
        raise SubmitError(str(error)) from error


def cluster_paths(search: argparse.Namespace) -> list[str]:
    """Return the search options that name local files or folders, as `--option value`.

    A relative value is marked, because it resolves against the job's working directory.
    """
    found = []
    for dest in _PATH_OPTIONS:
        value = getattr(search, dest, None)
        if value is None or str(value).startswith("s3://"):
            continue
        relative = "" if Path(value).is_absolute() else " (relative)"
        found.append(f"--{dest.replace('_', '-')} {value}{relative}")

    tracking_uri = search.tracking_uri
    if tracking_uri is not None and urlsplit(tracking_uri).scheme in ("", "file", "sqlite"):
        found.append(f"--tracking-uri {tracking_uri}")
    return found


def _warn_about_cluster_paths(search: argparse.Namespace) -> None:
    paths = cluster_paths(search)
    if paths:
        logger.warning(
            "The job reads and writes these paths on the Ray cluster, not on this machine: %s. They must exist there, "
            "for example on a shared filesystem. Relative paths resolve against the job's working directory: the runtime environment's working_dir, else the folder where `ray start` ran. "
            "On a remote cluster, use s3:// locations and an http:// MLflow server.",
            ", ".join(paths),
        )
    if search.tracking_uri is None:
        logger.info("Without --tracking-uri, the job logs to the cluster's $MLFLOW_TRACKING_URI, else to sqlite:///mlflow.db in its working directory.")
