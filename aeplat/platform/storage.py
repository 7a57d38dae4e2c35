"""Download an s3:// dataset prefix into the local cache, so that the dataset adapters read local files.

Layout under the cache folder:

- `s3/<bucket>/<prefix>/...`: one file per object, at the object's key below the prefix;
- `s3-manifests/<sha256 of bucket and prefix>.json`: the ETag and size of every local copy;
- `s3-staging/`: temporary files of downloads in progress.

A re-run lists the prefix again, downloads only objects whose ETag or size differs from the
manifest, and deletes local files whose keys are gone. Each object is written to a staging file
and renamed into place, so an interrupted download never leaves a partial file under its final
name. The manifest is written last, atomically, also when a download fails.

NOTE: a process killed with SIGKILL leaves its folder under `s3-staging/` behind, and nothing
removes it later. Two processes that sync the same prefix at once both download, and the manifest
written last is kept.

Credentials come from boto3's standard chain (environment, shared config files, instance
roles). aeplat takes none on its command line and logs none.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import ConnectionError as BotoConnectionError
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    IncompleteReadError,
    NoCredentialsError,
    ReadTimeoutError,
    ResponseStreamingError,
)

from aeplat.data.errors import DatasetError

logger = logging.getLogger(__name__)

S3_SCHEME = "s3://"

# Environment variables read, in this order, when no endpoint is given.
ENDPOINT_ENV_VARS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")

# An estimate: an endpoint that drops packets fails after about MAX_ATTEMPTS * CONNECT_TIMEOUT_S
# plus a few seconds of backoff. A refused connection fails at once.
CONNECT_TIMEOUT_S = 4
READ_TIMEOUT_S = 60
MAX_ATTEMPTS = 3

DOWNLOAD_WORKERS = 8
MANIFEST_VERSION = 1
ETAG_DIGEST_PREFIX = "s3-etag:"

_CHUNK_BYTES = 1 << 20
_ACCESS_DENIED_CODES = frozenset(
    {"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "403"}
)
_BUCKET_NOT_FOUND_CODES = frozenset({"NoSuchBucket", "404"})
_STREAM_ERRORS = (ResponseStreamingError, IncompleteReadError, ReadTimeoutError, ConnectionClosedError)

ChunkHook = Callable[[str, int], None]


class StorageError(DatasetError):
    """An s3:// data folder cannot be read. The message names the bucket or key and the fix."""


@dataclass(frozen=True)
class S3Location:
    """A bucket and a key prefix. A non-empty prefix ends with '/', so `data` never matches `data2/`."""

    bucket: str
    prefix: str

    @property
    def uri(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.prefix}"


@dataclass(frozen=True)
class RemoteObject:
    """One listed object. The etag has no surrounding quotes."""

    key: str
    etag: str
    size: int


@dataclass(frozen=True)
class MaterializedData:
    """A local data folder and, for an s3:// source, how it was filled.

    Attributes:
        local_dir: the folder the dataset adapters read.
        etags: S3 key to ETag of every object under the prefix, or empty for a local folder.
        prefix: the key prefix that local_dir mirrors, or empty for a local folder.
        downloaded: objects downloaded by this call.
        reused: objects whose local copy matched the manifest.
        removed: local files deleted because their keys are gone.
        bytes_downloaded: bytes downloaded by this call.
    """

    local_dir: Path
    etags: dict[str, str] = field(default_factory=dict)
    prefix: str = ""
    downloaded: int = 0
    reused: int = 0
    removed: int = 0
    bytes_downloaded: int = 0

    def source_digests(self) -> dict[Path, str]:
        """Map each downloaded file to its ETag, for `fingerprint_files(..., known_digests=...)`."""
        return {
            self.local_dir / key[len(self.prefix) :]: f"{ETAG_DIGEST_PREFIX}{etag}" for key, etag in self.etags.items()
        }


def is_s3_uri(value: str | os.PathLike[str]) -> bool:
    """Return whether value names an S3 location.

    A `Path("s3://b/p")` collapses to `s3:/b/p`, so a Path that starts with `s3:/` counts too.
    """
    if isinstance(value, str):
        return value.startswith(S3_SCHEME)
    return os.fspath(value).startswith("s3:/")


def parse_s3_uri(value: str | os.PathLike[str]) -> S3Location:
    """Split `s3://bucket/prefix` into bucket and prefix.

    Raises:
        StorageError: the URI has no bucket, or the prefix has empty, '.' or '..' segments.
    """
    text = os.fspath(value)
    rest = text[len(S3_SCHEME) :] if text.startswith(S3_SCHEME) else text[len("s3:/") :]
    bucket, _, prefix = rest.partition("/")
    prefix = prefix.strip("/")

    if not bucket or bucket in (".", ".."):
        raise StorageError(f"--data-dir {text!r} names no bucket. Write it as s3://BUCKET/PREFIX.")
    if prefix and not _is_safe_relative_path(prefix):
        raise StorageError(
            f"--data-dir {text!r} has an empty, '.' or '..' segment in its prefix. Write it as s3://BUCKET/PREFIX."
        )
    return S3Location(bucket=bucket, prefix=f"{prefix}/" if prefix else "")


def resolve_endpoint_url(explicit: str | None) -> str | None:
    """Return the explicit endpoint, else $AWS_ENDPOINT_URL_S3, else $AWS_ENDPOINT_URL, else None (AWS)."""
    if explicit:
        return explicit
    for name in ENDPOINT_ENV_VARS:
        value = os.environ.get(name)
        if value:
            return value
    return None


def create_s3_client(endpoint_url: str | None) -> Any:
    """Create an S3 client with short connect timeouts and standard retries.

    A custom endpoint (MinIO, Ceph, moto) gets path-style addressing, because such stores
    often have no wildcard DNS for bucket subdomains. AWS itself keeps virtual-hosted style.
    """
    s3_options = {"addressing_style": "path"} if endpoint_url else {}
    config = Config(
        s3=s3_options,
        connect_timeout=CONNECT_TIMEOUT_S,
        read_timeout=READ_TIMEOUT_S,
        retries={"max_attempts": MAX_ATTEMPTS, "mode": "standard"},
        max_pool_connections=DOWNLOAD_WORKERS + 2,
    )
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, config=config)


def materialize_data_dir(
    uri: str | os.PathLike[str],
    cache_dir: Path,
    endpoint_url: str | None = None,
    *,
    client: Any = None,
    on_chunk_written: ChunkHook | None = None,
) -> MaterializedData:
    """Return a local folder with the data of uri, downloading an s3:// prefix into cache_dir first.

    A local path is returned unchanged, with empty etags. endpoint_url=None falls back to
    resolve_endpoint_url. on_chunk_written(key, bytes_so_far) is called after each chunk
    written to a staging file; an exception it raises aborts the download like a network
    error does.

    Raises:
        StorageError: the bucket is missing, the prefix is empty, access is denied, no
            credentials are found, the endpoint is unreachable, or a download fails.
    """
    if not is_s3_uri(uri):
        return MaterializedData(local_dir=Path(uri))

    location = parse_s3_uri(uri)
    endpoint = resolve_endpoint_url(endpoint_url)
    if client is None:
        client = create_s3_client(endpoint)

    cache_dir = Path(cache_dir)
    local_dir = cache_dir / "s3" / location.bucket / location.prefix
    result = _Mirror(client, location, endpoint, cache_dir, on_chunk_written).sync(local_dir)

    logger.info(
        "Data of %s in %s: %d objects downloaded (%d bytes), %d reused, %d stale files removed.",
        location.uri,
        local_dir,
        result.downloaded,
        result.bytes_downloaded,
        result.reused,
        result.removed,
    )
    return result


def list_objects(client: Any, location: S3Location, endpoint_url: str | None = None) -> list[RemoteObject]:
    """List every object under the prefix with the ListObjectsV2 paginator, skipping folder markers.

    Raises:
        StorageError: the listing fails or finds no object.
    """
    objects: list[RemoteObject] = []
    with _s3_errors(location, endpoint_url):
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=location.bucket, Prefix=location.prefix)
        for page in pages:
            for entry in page.get("Contents", []):
                if not entry["Key"].endswith("/"):
                    objects.append(RemoteObject(key=entry["Key"], etag=_strip_quotes(entry["ETag"]), size=entry["Size"]))

    if not objects:
        raise StorageError(
            f"There are no objects under {location.uri}; check the prefix (list it with `aws s3 ls {location.uri}`)."
        )
    return objects


class _Mirror:
    """Mirror of one prefix in one local folder, with a manifest of the complete local copies."""

    def __init__(
        self,
        client: Any,
        location: S3Location,
        endpoint_url: str | None,
        cache_dir: Path,
        on_chunk_written: ChunkHook | None,
    ) -> None:
        self.client = client
        self.location = location
        self.endpoint_url = endpoint_url
        self.manifest_path = cache_dir / "s3-manifests" / f"{_location_digest(location)}.json"
        self.staging_root = cache_dir / "s3-staging"
        self.on_chunk_written = on_chunk_written
        self._lock = threading.Lock()

    def sync(self, local_dir: Path) -> MaterializedData:
        listing = list_objects(self.client, self.location, self.endpoint_url)
        listed = {item.key: item for item in _downloadable(listing, self.location)}
        previous = _read_manifest(self.manifest_path, self.location)

        removed = _remove_stale_files(local_dir, {self._relative(key) for key in listed})
        local = {key: entry for key, entry in previous.items() if key in listed and self._is_intact(local_dir, entry)}
        pending = [item for key, item in sorted(listed.items()) if local.get(key) != item]
        reused = len(listed) - len(pending)

        # The manifest records only files that are complete on disk, so it is written also
        # after a failed or interrupted download.
        try:
            downloaded_bytes = self._download_all(pending, local_dir, local)
        finally:
            _write_manifest(self.manifest_path, self.location, self.endpoint_url, local)

        return MaterializedData(
            local_dir=local_dir,
            etags={key: entry.etag for key, entry in sorted(local.items())},
            prefix=self.location.prefix,
            downloaded=len(pending),
            reused=reused,
            removed=removed,
            bytes_downloaded=downloaded_bytes,
        )

    def _download_all(self, pending: list[RemoteObject], local_dir: Path, local: dict[str, RemoteObject]) -> int:
        """Download pending objects in parallel and return the bytes written. Each finished object is added to local."""
        if not pending:
            return 0

        self.staging_root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=self.staging_root, prefix="download-"))
        try:
            with ThreadPoolExecutor(max_workers=DOWNLOAD_WORKERS, thread_name_prefix="s3-download") as pool:
                futures = [pool.submit(self._download, item, local_dir, staging, local) for item in pending]
                _wait_or_cancel(futures)
            return sum(future.result() for future in futures)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _download(self, item: RemoteObject, local_dir: Path, staging: Path, local: dict[str, RemoteObject]) -> int:
        target = local_dir / self._relative(item.key)
        handle = tempfile.NamedTemporaryFile(dir=staging, prefix="object-", suffix=".part", delete=False)
        temporary = Path(handle.name)
        try:
            with handle:
                size = self._write_object(item, handle)
                handle.flush()
                os.fsync(handle.fileno())
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temporary, target)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

        with self._lock:
            local[item.key] = item
        return size

    def _write_object(self, item: RemoteObject, stream: Any) -> int:
        """Write the object to stream, retrying a broken body stream, and return its size.

        If-Match makes the store reject the request when the object changed after the
        listing, so the manifest never pairs a file with another version's ETag.
        """
        for attempt in range(1, MAX_ATTEMPTS + 1):
            stream.seek(0)
            stream.truncate()
            try:
                return self._stream_body(item, stream)
            except _STREAM_ERRORS as error:
                if attempt == MAX_ATTEMPTS:
                    raise StorageError(
                        f"Downloading {S3_SCHEME}{self.location.bucket}/{item.key} failed {MAX_ATTEMPTS} times: {error}. "
                        "Check the network and run the command again; finished objects are kept."
                    ) from error
                logger.warning("Retrying %s%s/%s after: %s", S3_SCHEME, self.location.bucket, item.key, error)
        raise AssertionError("unreachable")

    def _stream_body(self, item: RemoteObject, stream: Any) -> int:
        with _s3_errors(self.location, self.endpoint_url, key=item.key):
            response = self.client.get_object(Bucket=self.location.bucket, Key=item.key, IfMatch=f'"{item.etag}"')

        written = 0
        for chunk in response["Body"].iter_chunks(_CHUNK_BYTES):
            stream.write(chunk)
            written += len(chunk)
            if self.on_chunk_written is not None:
                self.on_chunk_written(item.key, written)

        if written != item.size:
            raise StorageError(
                f"Downloaded {written} bytes of {S3_SCHEME}{self.location.bucket}/{item.key}, expected {item.size}. "
                "Run the command again."
            )
        return written

    def _relative(self, key: str) -> str:
        return key[len(self.location.prefix) :]

    def _is_intact(self, local_dir: Path, entry: RemoteObject) -> bool:
        path = local_dir / self._relative(entry.key)
        try:
            return path.is_file() and path.stat().st_size == entry.size
        except OSError:
            return False


def _downloadable(objects: list[RemoteObject], location: S3Location) -> list[RemoteObject]:
    """Drop keys that cannot be a relative file path below the local folder, with one WARNING."""
    safe = [item for item in objects if _is_safe_relative_path(item.key[len(location.prefix) :])]
    unsafe = [item.key for item in objects if not _is_safe_relative_path(item.key[len(location.prefix) :])]
    if unsafe:
        logger.warning(
            "Skipping %d objects under %s whose keys have empty, '.' or '..' segments, such as %r.",
            len(unsafe),
            location.uri,
            unsafe[0],
        )
    return safe


def _is_safe_relative_path(relative: str) -> bool:
    parts = relative.split("/")
    return all(part not in ("", ".", "..") for part in parts)


def _remove_stale_files(local_dir: Path, expected_paths: set[str]) -> int:
    """Delete files under local_dir whose relative path is not expected, then empty folders, and return the file count."""
    if not local_dir.is_dir():
        return 0

    removed = 0
    for path in sorted(local_dir.rglob("*")):
        if (path.is_file() or path.is_symlink()) and path.relative_to(local_dir).as_posix() not in expected_paths:
            path.unlink()
            removed += 1

    for folder in sorted((path for path in local_dir.rglob("*") if path.is_dir()), reverse=True):
        if not any(folder.iterdir()):
            folder.rmdir()
    return removed


def _wait_or_cancel(futures: list[Future[int]]) -> None:
    """Wait until all downloads finish or one fails, then cancel those not started and raise the first error.

    Downloads already running finish first, so their files are complete and enter the manifest.
    """
    try:
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        errors = [future.exception() for future in futures if future in done and future.exception() is not None]
        if errors:
            raise errors[0]
    finally:
        for future in futures:
            future.cancel()


def _read_manifest(path: Path, location: S3Location) -> dict[str, RemoteObject]:
    """Return key to object of the manifest, or {} when it is missing, unreadable or for another location."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        logger.warning("Ignoring unreadable manifest %s, so every object is downloaded again: %s", path, error)
        return {}

    if document.get("version") != MANIFEST_VERSION or document.get("uri") != location.uri:
        return {}
    return {
        key: RemoteObject(key=key, etag=entry["etag"], size=entry["size"]) for key, entry in document.get("objects", {}).items()
    }


def _write_manifest(path: Path, location: S3Location, endpoint_url: str | None, objects: dict[str, RemoteObject]) -> None:
    document = {
        "version": MANIFEST_VERSION,
        "uri": location.uri,
        "endpoint_url": endpoint_url,
        "objects": {key: {"etag": item.etag, "size": item.size} for key, item in sorted(objects.items())},
    }
    path.parent.mkdir(parents=True, exist_ok=True)

    handle = tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp", delete=False)
    temporary = Path(handle.name)
    try:
        with handle:
            json.dump(document, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _location_digest(location: S3Location) -> str:
    return hashlib.sha256(location.uri.encode("utf-8")).hexdigest()[:24]


def _strip_quotes(etag: str) -> str:
    return etag.strip('"')


@contextmanager
def _s3_errors(location: S3Location, endpoint_url: str | None, key: str | None = None) -> Iterator[None]:
    """Translate botocore errors into StorageError messages that name the location and the fix."""
    try:
        yield
    except NoCredentialsError as error:
        raise StorageError(
            f"No AWS credentials were found for {location.uri}. Set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or AWS_PROFILE, in the environment."
        ) from error
    except BotoConnectionError as error:
        raise StorageError(
            f"Failed to connect to the S3 endpoint {endpoint_url or 'of AWS'} for {location.uri}: {error}. "
            "Check --s3-endpoint-url (or AWS_ENDPOINT_URL) and that the store is running."
        ) from error
    except ClientError as error:
        raise _client_error_message(error, location, endpoint_url, key) from error
    except BotoCoreError as error:
        # The caller retries a broken object download, so that error passes through unchanged.
        if key is not None and isinstance(error, _STREAM_ERRORS):
            raise
        raise StorageError(
            f"The S3 request for {location.uri} failed: {error}. Check --s3-endpoint-url and the network."
        ) from error


def _client_error_message(error: ClientError, location: S3Location, endpoint_url: str | None, key: str | None) -> StorageError:
    code = str(error.response.get("Error", {}).get("Code", ""))
    target = f"{S3_SCHEME}{location.bucket}/{key}" if key else location.uri
    where = f" at {endpoint_url}" if endpoint_url else ""

    if code in _BUCKET_NOT_FOUND_CODES and key is None:
        return StorageError(
            f"Bucket {location.bucket!r} was not found{where} (from {location.uri}); check the bucket name and --s3-endpoint-url."
        )
    if code in _ACCESS_DENIED_CODES:
        return StorageError(
            f"Access to {target}{where} was denied ({code}); check AWS_ACCESS_KEY_ID/AWS_PROFILE and the bucket policy."
        )
    if code in ("PreconditionFailed", "412"):
        return StorageError(f"{target} changed while it was downloaded; run the command again.")
    return StorageError(f"The S3 request for {target}{where} failed: {error}.")
