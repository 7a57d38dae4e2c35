"""Run `aeplat search` as a job on a running Ray cluster through its job server (the Ray Job Submission API).

Ray is imported inside the functions that talk to the job server, so that the command line
validates its options without loading Ray.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from aeplat.platform.k8s import search_entrypoint

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

logger = logging.getLogger(__name__)

# Environment variables that name the job server, in the order Ray's job client reads them.
API_SERVER_ADDRESS = "RAY_API_SERVER_ADDRESS"
RAY_ADDRESS = "RAY_ADDRESS"

# Names of environment variables that hold credentials. A runtime environment is stored with
# the job and shown on the Ray dashboard, so credentials must come from the cluster's own
# environment instead.
_CREDENTIAL_NAME = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|CREDENTIAL|SALT|ACCESS_KEY|(?:^|_)KEY(?:_|$)")

# Consecutive failed status requests after which a followed job counts as lost.
_MAX_STATUS_FAILURES = 5

# Terminal values of ray.job_submission.JobStatus.
SUCCEEDED = "SUCCEEDED"
_TERMINAL_STATUSES = frozenset({SUCCEEDED, "FAILED", "STOPPED"})


class SubmitError(Exception):
    """The job could not be submitted or followed. The message names the value and what to do."""


@dataclass(frozen=True)
class JobOutcome:
    """Terminal state of a followed job."""

    job_id: str
    status: str
    message: str
    logs_streamed: bool

    @property
    def succeeded(self) -> bool:
        return self.status == SUCCEEDED

    def summary(self) -> str:
        """Return the job's message, or only its first line when the logs were streamed, because Ray appends the last logs to it."""
        if not self.logs_streamed:
            return self.message
        first_line = self.message.split("\n", 1)[0]
        # Ray 2.60 ends the first line of a failed job's message with ", last available logs (...):".
        return first_line.split(", last available logs", 1)[0]


def job_server_address(option: str | None, environ: Mapping[str, str]) -> str:
    """Return the job server's http(s) URL: the option, else $RAY_API_SERVER_ADDRESS, else an http(s) $RAY_ADDRESS."""
    if option:
        return _checked_url("--address", option)
    if environ.get(API_SERVER_ADDRESS):
        return _checked_url(f"${API_SERVER_ADDRESS}", environ[API_SERVER_ADDRESS])

    ray_address = environ.get(RAY_ADDRESS, "")
    if ray_address.startswith(("http://", "https://")):
        return _checked_url(f"${RAY_ADDRESS}", ray_address)
    hint = f" ${RAY_ADDRESS}={ray_address!r} is a cluster address, not the job server's http:// URL." if ray_address else ""
    raise SubmitError(
        f"No job server address.{hint} Pass --address http://HEAD:8265 (the Ray dashboard's address), "
        f"or set ${API_SERVER_ADDRESS}."
    )


def _checked_url(source: str, value: str) -> str:
    parts = urlsplit(value)
    try:
        parts.port  # noqa: B018 - urllib checks the port only when it is read
    except ValueError as error:
        raise SubmitError(f"{source} {value!r} has an invalid port ({error}). Use http://HOST:PORT, such as http://127.0.0.1:8265.") from error
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise SubmitError(
            f"{source} {value!r} is not an http:// or https:// URL. Pass the job server's address, which is the "
            "Ray dashboard's, such as http://127.0.0.1:8265."
        )
    if parts.username is not None or parts.password is not None:
        raise SubmitError(
            f"{source} contains credentials. Remove them from the URL. With token authentication, "
            "set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN in the environment instead."
        )
    return value.rstrip("/")


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Raise SubmitError within timeout_s when the job server at address does not accept connections."""
    parts = urlsplit(address)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            pass
    except OSError as error:
        raise SubmitError(
            f"The job server at {address} does not accept connections ({error}). Check --address: it is the "
            "Ray dashboard's address (port 8265 by default), and the head node must run the dashboard "
            "(ray start --head --include-dashboard=true)."
        ) from error


def parse_runtime_env(text: str | None) -> dict[str, Any] | None:
    """Return the runtime environment from --runtime-env-json, rejecting credentials in its env_vars."""
    if text is None:
        return None
    try:
        runtime_env = json.loads(text)
    except json.JSONDecodeError as error:
        raise SubmitError(f"--runtime-env-json is not valid JSON ({error}). Pass an object such as '{{\"env_vars\": {{\"OMP_NUM_THREADS\": \"4\"}}}}'.") from error
    if not isinstance(runtime_env, dict):
        raise SubmitError(f"--runtime-env-json must be a JSON object, got {type(runtime_env).__name__}.")

    env_vars = runtime_env.get("env_vars", {})
    if not isinstance(env_vars, dict):
        raise SubmitError(f"env_vars in --runtime-env-json must be an object of names to strings, got {type(env_vars).__name__}.")
    secret_names = sorted(name for name in env_vars if _CREDENTIAL_NAME.search(name.upper()))
    if secret_names:
        raise SubmitError(
            f"--runtime-env-json sets credentials {secret_names}. Ray stores the runtime environment with the job "
            "and shows it on the dashboard. Set these variables in the environment of the cluster's nodes instead."
        )
    return runtime_env


@contextlib.contextmanager
def _address_variables_removed() -> Iterator[None]:
    """Hide $RAY_API_SERVER_ADDRESS and $RAY_ADDRESS, which override the address given to Ray 2.60's JobSubmissionClient."""
    saved = {name: os.environ.pop(name) for name in (API_SERVER_ADDRESS, RAY_ADDRESS) if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def connect(address: str, timeout_s: float = 5.0) -> JobSubmissionClient:
    """Return a client of the job server at address, after checking that it accepts connections and reports its Ray version.

    NOTE: the client's HTTP requests have no timeout, so a server that accepts connections but
    never responds still blocks here.
    """
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    check_reachable(address, timeout_s)
    try:
        with _address_variables_removed():
            return JobSubmissionClient(address)
    except AuthenticationError as error:
        raise SubmitError(
            f"The job server at {address} rejected the request: {error} Set RAY_AUTH_MODE=token and the cluster's "
            "RAY_AUTH_TOKEN in this shell's environment."
        ) from error
    except (OSError, RuntimeError) as error:
        raise SubmitError(f"The job server at {address} did not respond as a Ray job server: {error} Check --address.") from error


def submit_job(
    client: JobSubmissionClient,
    search_args: list[str],
    job_id: str | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> str:
    """Submit `aeplat search SEARCH_ARGS` as a job and return its id (Ray calls it the submission id)."""
    from ray.exceptions import AuthenticationError

    entrypoint = search_entrypoint(search_args)
    logger.debug("Submitting entrypoint %s", entrypoint)
    try:
        return client.submit_job(
            entrypoint=entrypoint,
            submission_id=job_id,
            runtime_env=runtime_env,
            metadata={"aeplat.command": "search"},
        )
    except (OSError, RuntimeError, ValueError, AuthenticationError) as error:
        raise SubmitError(f"Submitting the job failed: {error}") from error


def follow_job(
    client: JobSubmissionClient,
    job_id: str,
    write: Callable[[str], None],
    poll_interval_s: float = 1.0,
) -> JobOutcome:
    """Write the job's logs through write while it runs, then return its terminal status.

    When the log stream breaks (a restarted dashboard, a dropped connection), the status is
    polled without logs. KeyboardInterrupt leaves the job running.
    """
    import aiohttp

    logs_streamed = True
    try:
        asyncio.run(_stream_logs(client, job_id, write))
    except (OSError, RuntimeError, aiohttp.ClientError) as error:
        logs_streamed = False
        logger.warning("Streaming the logs of job %s stopped (%s); waiting for its status without logs.", job_id, error)

    info = _wait_for_terminal_status(client, job_id, poll_interval_s)
    return JobOutcome(
        job_id=job_id,
        status=str(info.status),
        message=info.message or "",
        logs_streamed=logs_streamed,
    )


async def _stream_logs(client: JobSubmissionClient, job_id: str, write: Callable[[str], None]) -> None:
    # The job server closes the stream once the job has reached a terminal status.
    async for chunk in client.tail_job_logs(job_id):
        write(chunk)


def _wait_for_terminal_status(client: JobSubmissionClient, job_id: str, poll_interval_s: float) -> Any:
    failures = 0
    while True:
        try:
            info = client.get_job_info(job_id)
        except (OSError, RuntimeError) as error:
            failures += 1
            if failures >= _MAX_STATUS_FAILURES:
                raise SubmitError(f"Reading the status of job {job_id} failed {failures} times in a row ({error}).") from error
            logger.warning("Reading the status of job %s failed (%s); retrying.", job_id, error)
        else:
            failures = 0
            if str(info.status) in _TERMINAL_STATUSES:
                return info
        time.sleep(poll_interval_s)
