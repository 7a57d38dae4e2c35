"""The `aeplat k8s render` command: write the KubeRay RayJob that runs one `aeplat search` on a cluster."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rich.console import Console

from aeplat.data.errors import DatasetError
from aeplat.platform import k8s
from aeplat.platform.settings import SettingsError

logger = logging.getLogger(__name__)

AddOptions = Callable[[argparse.ArgumentParser], None]

S3_SCHEME = "s3://"
DATA_MOUNT = "/data"

# In `k8s render` these two default to values derived from --gpus (see _derive_trial_resources).
_DERIVED_HELP = {
    "gpus_per_trial": "GPUs per trial; fractions such as 0.25 share one GPU (default: 1)",
    "max_concurrent": "trials running at the same time (default: --gpus divided by --gpus-per-trial)",
}


def add_k8s_parser(commands: argparse._SubParsersAction, add_search_options: AddOptions) -> None:
    """Register `aeplat k8s render`, which takes every `aeplat search` option plus the cluster's shape."""
    k8s_parser = commands.add_parser("k8s", help="write Kubernetes manifests for running a search on a cluster")
    actions = k8s_parser.add_subparsers(dest="k8s_command", required=True)
    render = actions.add_parser(
        "render",
        help="write the KubeRay RayJob that runs `aeplat search` with these options",
        description=(
            "Write a RayJob that starts a Ray cluster with a CPU head and a GPU worker group scaled from 0, "
            "runs `aeplat search` with the given search options on it, and deletes the cluster afterwards. "
            "Paths such as --data-dir name locations inside the pods."
        ),
    )
    add_search_options(render)
    _adapt_search_options(render)
    _add_cluster_options(render)
    render.set_defaults(search_options=_search_options(add_search_options))


def run_k8s(args: argparse.Namespace, console: Console) -> int:
    """Run the chosen `aeplat k8s` subcommand and return the exit status."""
    try:
        manifest = render_job(args)
    except (k8s.RenderError, DatasetError, SettingsError) as error:
        console.print(f"[bold red]error:[/] {error}")
        return 2

    text = k8s.dump_manifest(manifest)
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text, encoding="utf-8")
        logger.info("Wrote RayJob %s to %s", manifest["metadata"]["name"], args.output)
    return 0


def _model_modality(args: argparse.Namespace) -> str:
    """Return the modality part of the registered model name, as `aeplat search` derives it."""
    from aeplat.platform.cli import settings_from_args

    return settings_from_args(args).model_modality


def render_job(args: argparse.Namespace) -> dict[str, Any]:
    """Build the RayJob from parsed `k8s render` options, raising RenderError for an invalid combination."""
    _check_cluster_options(args)
    _derive_trial_resources(args)
    _check_locations(args)
    # A retried job runs the same entrypoint, which then continues the interrupted search.
    args.resume = True

    name = args.name or k8s.job_name(args.dataset, _model_modality(args))
    k8s.validate_name("--name", name)
    k8s.validate_name("--namespace", args.namespace)

    cluster = k8s.ClusterOptions(
        image=args.image,
        head=k8s.PodSize(cpus=args.head_cpus, memory_gib=args.head_memory_gib),
        worker=k8s.PodSize(cpus=args.worker_cpus, memory_gib=args.worker_memory_gib),
        gpus_per_worker=args.gpus_per_worker,
        max_workers=args.gpus // args.gpus_per_worker,
        data_claim=args.data_claim,
    )
    job = k8s.JobOptions(
        name=name,
        namespace=args.namespace,
        entrypoint=k8s.search_entrypoint(search_arguments(args)),
        backoff_limit=args.backoff_limit,
        ttl_seconds_after_finished=args.ttl_seconds_after_finished,
        active_deadline_seconds=args.active_deadline_seconds,
        pre_running_deadline_seconds=args.pre_running_deadline_seconds,
    )
    return k8s.ray_job(job, cluster)


def search_arguments(args: argparse.Namespace) -> list[str]:
    """Rebuild the `aeplat search` arguments: required options and every option that differs from its default."""
    arguments: list[str] = []
    for dest, options in args.search_options.items():
        value = getattr(args, dest)
        option = options[0]
        if value is None or (value == option.default and not option.required):
            continue
        if option.nargs == 0:
            # Flags that share a destination (--resume and --no-resume) differ in the value they store.
            arguments.append(next(flag.flag for flag in options if flag.const == value))
        elif option.nargs in ("+", "*"):
            arguments += [option.flag, *map(str, value)]
        else:
            arguments += [option.flag, str(value)]
    return arguments


@dataclass(frozen=True)
class _SearchOption:
    flag: str
    default: Any
    required: bool
    nargs: int | str | None
    const: Any = None


def _search_options(add_search_options: AddOptions) -> dict[str, list[_SearchOption]]:
    # A separate parser gives the defaults of `aeplat search` itself, before render changes any.
    probe = argparse.ArgumentParser(add_help=False)
    add_search_options(probe)
    options: dict[str, list[_SearchOption]] = {}
    for action in probe._actions:
        long_flags = [flag for flag in action.option_strings if flag.startswith("--")]
        if long_flags:
            option = _SearchOption(long_flags[0], action.default, action.required, action.nargs, action.const)
            options.setdefault(action.dest, []).append(option)
    return options


def _adapt_search_options(parser: argparse.ArgumentParser) -> None:
    for action in parser._actions:
        # Paths and URIs name locations inside the pods, so they stay text: no local resolution,
        # and s3:// URIs keep their double slash.
        if action.type not in (None, int, float):
            action.type = str
        if action.dest in _DERIVED_HELP:
            action.default = None
            action.help = _DERIVED_HELP[action.dest]


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    cluster = parser.add_argument_group("cluster")
    cluster.add_argument("--gpus", type=int, default=8, help="maximum GPUs the job uses at once, which sets the worker group's maxReplicas (default: %(default)s)")
    cluster.add_argument("--gpus-per-worker", type=int, default=1, help="GPUs of one worker pod (default: %(default)s)")
    cluster.add_argument("--worker-cpus", type=int, default=8, help="CPU cores of one worker pod (default: %(default)s)")
    cluster.add_argument("--worker-memory-gib", type=int, default=32, help="memory of one worker pod in GiB (default: %(default)s)")
    cluster.add_argument("--head-cpus", type=int, default=4, help="CPU cores of the head pod, which runs the search driver (default: %(default)s)")
    cluster.add_argument("--head-memory-gib", type=int, default=16, help="memory of the head pod in GiB (default: %(default)s)")
    cluster.add_argument("--image", default=k8s.DEFAULT_IMAGE, help="aeplat image for every Ray pod, pinned by tag or digest (default: %(default)s)")
    cluster.add_argument("--data-claim", default=None, help=f"PersistentVolumeClaim mounted read-only at {DATA_MOUNT} on every Ray pod (default: none)")

    job = parser.add_argument_group("job")
    job.add_argument("--name", default=None, help="RayJob name (default: aeplat-search-<dataset>-<modality>)")
    job.add_argument("--namespace", default="aeplat", help="namespace of the RayJob, where k8s/ deploys MLflow and the settings (default: %(default)s)")
    job.add_argument("--backoff-limit", type=int, default=2, help="retries of a failed job, each resuming from the trial results under --storage (default: %(default)s)")
    job.add_argument("--ttl-seconds-after-finished", type=int, default=3600, help="seconds the finished cluster is kept for inspection (default: %(default)s)")
    job.add_argument("--active-deadline-seconds", type=int, default=7 * 24 * 3600, help="seconds after which a running job is stopped (default: %(default)s)")
    job.add_argument("--pre-running-deadline-seconds", type=int, default=1800, help="seconds the job may wait for its cluster and submitter to start (default: %(default)s)")
    job.add_argument("-o", "--output", default="-", help="file to write the RayJob to, or '-' for standard output (default: %(default)s)")


def _check_cluster_options(args: argparse.Namespace) -> None:
    _require_positive("--gpus", args.gpus)
    _require_positive("--gpus-per-worker", args.gpus_per_worker)
    for option in ("--worker-cpus", "--worker-memory-gib", "--head-cpus", "--head-memory-gib"):
        _require_positive(option, getattr(args, option[2:].replace("-", "_")))
    _require(args.backoff_limit >= 0, f"--backoff-limit must be >= 0, got {args.backoff_limit}.")
    for option in ("--ttl-seconds-after-finished", "--active-deadline-seconds", "--pre-running-deadline-seconds"):
        _require_positive(option, getattr(args, option[2:].replace("-", "_")))
    _require(
        args.gpus % args.gpus_per_worker == 0,
        f"--gpus {args.gpus} is not a multiple of --gpus-per-worker {args.gpus_per_worker}. "
        "Choose --gpus as a whole number of worker pods.",
    )
    _require(":" in args.image.rsplit("/", 1)[-1] or "@" in args.image, f"--image {args.image!r} has no tag. Pin a version tag or digest, such as {k8s.DEFAULT_IMAGE}.")
    _require(not args.image.endswith(":latest"), f"--image {args.image!r} uses the tag 'latest'. Pin a version tag or digest.")


def _derive_trial_resources(args: argparse.Namespace) -> None:
    if args.gpus_per_trial is None:
        args.gpus_per_trial = 1.0
    _require(
        0 < args.gpus_per_trial <= args.gpus_per_worker,
        f"--gpus-per-trial must lie in (0, --gpus-per-worker={args.gpus_per_worker}] so that a trial fits on one "
        f"worker pod, got {args.gpus_per_trial}.",
    )
    if args.max_concurrent is None:
        args.max_concurrent = max(1, math.floor(args.gpus / args.gpus_per_trial))

    trials_per_worker = math.floor(args.gpus_per_worker / args.gpus_per_trial)
    _require(
        trials_per_worker * args.cpus_per_trial <= args.worker_cpus,
        f"{trials_per_worker} trials of --cpus-per-trial {args.cpus_per_trial} need more than --worker-cpus "
        f"{args.worker_cpus}. Raise --worker-cpus or lower --cpus-per-trial.",
    )


def _check_locations(args: argparse.Namespace) -> None:
    _require(
        args.storage.startswith(S3_SCHEME),
        f"--storage {args.storage!r} is not an s3:// URI. Every Ray pod and a retried job must see the same trial "
        "results, so pass --storage s3://BUCKET/PREFIX.",
    )
    on_volume = args.data_claim is not None and args.data_dir.startswith(DATA_MOUNT + "/")
    _require(
        args.data_dir.startswith(S3_SCHEME) or on_volume,
        f"--data-dir {args.data_dir!r} is not readable in the pods. Pass --data-dir s3://BUCKET/PREFIX, or "
        f"--data-claim CLAIM with --data-dir {DATA_MOUNT}/FOLDER.",
    )
    _require(
        args.ray_address is None,
        "--ray-address does not apply to a RayJob: the job runs on the cluster that KubeRay creates for it.",
    )
    tracking_uri = getattr(args, "tracking_uri", None)
    _require(
        tracking_uri is None or tracking_uri.startswith(("http://", "https://")),
        f"--tracking-uri {tracking_uri!r} would keep the MLflow store inside the job's pod, which is deleted after the job. "
        "Omit it to use the in-cluster MLflow server from the aeplat-settings ConfigMap, or pass its http:// address.",
    )
    for option in ("search_space", "labels_csv", "image_dir", "patient_csv", "mask_dir", "cache_dir"):
        value = getattr(args, option, None)
        if value is None:
            continue
        text = str(value)
        flag = "--" + option.replace("_", "-")
        inside_pod = text.startswith(DATA_MOUNT + "/") and args.data_claim is not None
        _require(
            inside_pod or (option == "cache_dir" and text.startswith("/")),
            f"{flag} {text!r} is not readable in the pods. Put the file on the data volume "
            f"(--data-claim CLAIM with {flag} {DATA_MOUNT}/...).",
        )


def _require_positive(option: str, value: int) -> None:
    _require(value >= 1, f"{option} must be at least 1, got {value}.")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise k8s.RenderError(message)
