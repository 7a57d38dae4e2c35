"""s3:// data folders against a real S3 protocol server (moto's standalone server on 127.0.0.1).

Every test runs with test credentials, no AWS config files, instance metadata switched off,
and AWS_ENDPOINT_URL on a closed local port, so a code path that ignores the test endpoint
fails at once instead of reaching AWS.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import pytest
from botocore.config import Config

from aeplat.data.cache import fingerprint_files
from aeplat.platform.cli import build_parser, settings_from_args
from aeplat.platform.storage import (
    MaterializedData,
    StorageError,
    is_s3_uri,
    materialize_data_dir,
    parse_s3_uri,
)

MOTO_SERVER = Path(sys.executable).parent / "moto_server"
BRATS_CASES = ("BraTS2021_00006", "Brats18_2013_3_1", "Brats18_CBICA_ABM_1")
# One more page than ListObjectsV2 returns at most (1,000 keys), and a few keys beyond it.
MANY_KEYS = 1_010
ERROR_DEADLINE_S = 15.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_answering(url: str, process: subprocess.Popen, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited with code {process.returncode} before answering on {url}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {url} within {timeout_s} s")


def _start_moto(extra_env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    if not MOTO_SERVER.is_file():
        pytest.skip(f"{MOTO_SERVER} is absent; install the test extras with pip install -e '.[test]'")
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **(extra_env or {})},
    )
    try:
        _wait_until_answering(endpoint, process)
    except BaseException:
        _stop(process)
        raise
    return process, endpoint


def _stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """Endpoint URL of a moto S3 server started for this module and stopped by its PID afterwards."""
    process, endpoint = _start_moto()
    yield endpoint
    _stop(process)


@pytest.fixture(autouse=True)
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> str:
    """Set test credentials and point every fallback at 127.0.0.1; return a closed local endpoint."""
    closed_endpoint = f"http://127.0.0.1:{_free_port()}"
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_ENDPOINT_URL", closed_endpoint)
    return closed_endpoint


def _client(endpoint: str):
    """Return a client for setting up buckets; module fixtures run before aws_env, so it takes its own keys."""
    session = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing", region_name="us-east-1")
    return session.client(
        "s3", endpoint_url=endpoint, config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2, "mode": "standard"})
    )


def _make_bucket(endpoint: str, bucket: str, objects: dict[str, bytes]) -> None:
    client = _client(endpoint)
    client.create_bucket(Bucket=bucket)
    for key, body in objects.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)


def _local_files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture(scope="module")
def many_keys_bucket(moto_endpoint: str) -> dict[str, bytes]:
    """A bucket 'many' whose prefix 'data/' contains more keys than one ListObjectsV2 page (1,000)."""
    objects = {f"data/part-{index % 7}/object-{index:05d}.txt": f"object {index}\n".encode() for index in range(MANY_KEYS)}
    decoys = {"data-other/outside.txt": b"not under the prefix\n", "data/empty-folder/": b""}
    client = _client(moto_endpoint)
    client.create_bucket(Bucket="many")
    with ThreadPoolExecutor(max_workers=4) as pool:
        list(pool.map(lambda item: client.put_object(Bucket="many", Key=item[0], Body=item[1]), {**objects, **decoys}.items()))
    return {key[len("data/") :]: body for key, body in objects.items()}


@pytest.fixture(scope="module")
def many_keys_first_run(many_keys_bucket: dict[str, bytes], moto_endpoint: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The first materialisation of s3://many/data into a fresh cache, shared because moto serves it slowly."""
    cache_dir = tmp_path_factory.mktemp("many-keys") / "cache"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", "testing")
        patch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        result = materialize_data_dir("s3://many/data", cache_dir, moto_endpoint)
    return {"result": result, "cache_dir": cache_dir}


def test_parse_s3_uri_variants() -> None:
    assert parse_s3_uri("s3://bucket/a/b").bucket == "bucket"
    assert parse_s3_uri("s3://bucket/a/b/").prefix == "a/b/"
    assert parse_s3_uri("s3://bucket").prefix == ""
    assert parse_s3_uri(Path("s3://bucket/a")).prefix == "a/"
    assert is_s3_uri(Path("s3://bucket/a"))
    assert not is_s3_uri(Path("data/brats"))


@pytest.mark.parametrize("uri", ["s3://", "s3:///prefix", "s3://bucket/a/../b", "s3://bucket/a//b"])
def test_parse_s3_uri_rejects_invalid(uri: str) -> None:
    with pytest.raises(StorageError, match="s3://BUCKET/PREFIX"):
        parse_s3_uri(uri)


def test_local_path_passes_through(tmp_path: Path) -> None:
    result = materialize_data_dir(tmp_path / "brats", tmp_path / "cache")

    assert result.local_dir == tmp_path / "brats"
    assert result.etags == {}
    assert result.source_digests() == {}
    assert not (tmp_path / "cache").exists()


def test_many_keys_download_completely(many_keys_bucket: dict[str, bytes], many_keys_first_run: dict) -> None:
    result = many_keys_first_run["result"]

    assert result.local_dir == many_keys_first_run["cache_dir"] / "s3" / "many" / "data"
    assert result.downloaded == MANY_KEYS
    assert result.reused == 0
    assert len(result.etags) == MANY_KEYS
    assert _local_files(result.local_dir) == many_keys_bucket
    assert not (many_keys_first_run["cache_dir"] / "s3" / "many" / "data-other").exists()


def test_second_run_downloads_nothing(many_keys_first_run: dict, moto_endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="aeplat.platform.storage"):
        second = materialize_data_dir("s3://many/data/", many_keys_first_run["cache_dir"], moto_endpoint)

    assert second.downloaded == 0
    assert second.reused == MANY_KEYS
    assert second.bytes_downloaded == 0
    assert second.etags == many_keys_first_run["result"].etags
    assert f"0 objects downloaded (0 bytes), {MANY_KEYS} reused, 0 stale files removed" in caplog.text


def test_changes_and_deletions_synced(moto_endpoint: str, tmp_path: Path) -> None:
    _make_bucket(moto_endpoint, "changes", {"set/a.txt": b"a1", "set/sub/b.txt": b"b1", "set/c.txt": b"c1"})
    first = materialize_data_dir("s3://changes/set", tmp_path / "cache", moto_endpoint)
    client = _client(moto_endpoint)
    client.put_object(Bucket="changes", Key="set/a.txt", Body=b"a2 changed")
    client.delete_object(Bucket="changes", Key="set/sub/b.txt")
    client.put_object(Bucket="changes", Key="set/d.txt", Body=b"d1")

    second = materialize_data_dir("s3://changes/set", tmp_path / "cache", moto_endpoint)

    assert first.downloaded == 3
    assert second.downloaded == 2
    assert second.reused == 1
    assert second.removed == 1
    assert _local_files(second.local_dir) == {"a.txt": b"a2 changed", "c.txt": b"c1", "d.txt": b"d1"}
    assert not (second.local_dir / "sub").exists()
    assert second.etags["set/a.txt"] != first.etags["set/a.txt"]
    assert second.etags["set/c.txt"] == first.etags["set/c.txt"]
    assert set(second.etags) == {"set/a.txt", "set/c.txt", "set/d.txt"}


def test_locally_damaged_file_downloaded_again(moto_endpoint: str, tmp_path: Path) -> None:
    _make_bucket(moto_endpoint, "damaged", {"set/a.txt": b"complete content"})
    first = materialize_data_dir("s3://damaged/set", tmp_path / "cache", moto_endpoint)
    (first.local_dir / "a.txt").write_bytes(b"cut")

    second = materialize_data_dir("s3://damaged/set", tmp_path / "cache", moto_endpoint)

    assert second.downloaded == 1
    assert (second.local_dir / "a.txt").read_bytes() == b"complete content"


def test_interrupted_download_leaves_no_partial_file(moto_endpoint: str, tmp_path: Path) -> None:
    # Each object spans three 1 MiB chunks, so the hook fires while the object is half written.
    objects = {f"big/object-{index:02d}.bin": bytes([index]) * (2 * 1024 * 1024 + 100) for index in range(12)}
    _make_bucket(moto_endpoint, "interrupted", objects)
    started: list[str] = []
    lock = threading.Lock()

    def interrupt_fifth_object(key: str, written: int) -> None:
        with lock:
            if key not in started:
                started.append(key)
            position = started.index(key)
        if position == 4:
            raise RuntimeError(f"simulated interruption after {written} bytes of {key}")

    with pytest.raises(RuntimeError, match="simulated interruption"):
        materialize_data_dir("s3://interrupted/big", tmp_path / "cache", moto_endpoint, on_chunk_written=interrupt_fifth_object)

    local_dir = tmp_path / "cache" / "s3" / "interrupted" / "big"
    interrupted_key = started[4]
    survivors = _local_files(local_dir) if local_dir.exists() else {}
    assert not (local_dir / interrupted_key[len("big/") :]).exists()
    assert all(body == objects[f"big/{name}"] for name, body in survivors.items())
    assert [path for path in (tmp_path / "cache").rglob("*") if path.is_file() and path.suffix in (".part", ".tmp")] == []

    resumed = materialize_data_dir("s3://interrupted/big", tmp_path / "cache", moto_endpoint)

    assert resumed.reused == len(survivors)
    assert resumed.downloaded == len(objects) - len(survivors)
    assert _local_files(resumed.local_dir) == {key[len("big/") :]: body for key, body in objects.items()}


def test_missing_bucket_fails_with_fix(moto_endpoint: str, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        materialize_data_dir("s3://absent-bucket/brats", tmp_path / "cache", moto_endpoint)

    assert "'absent-bucket' was not found" in str(caught.value)
    assert "check the bucket name" in str(caught.value)
    assert time.monotonic() - started < ERROR_DEADLINE_S


def test_empty_prefix_fails_with_fix(moto_endpoint: str, tmp_path: Path) -> None:
    _make_bucket(moto_endpoint, "prefixes", {"present/a.txt": b"a"})

    with pytest.raises(StorageError) as caught:
        materialize_data_dir("s3://prefixes/absent", tmp_path / "cache", moto_endpoint)

    assert "no objects under s3://prefixes/absent/" in str(caught.value)
    assert "check the prefix" in str(caught.value)


def test_unreachable_endpoint_fails_fast(aws_env: str, tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(StorageError) as caught:
        materialize_data_dir("s3://bucket/brats", tmp_path / "cache", aws_env)

    assert "Failed to connect" in str(caught.value)
    assert aws_env in str(caught.value)
    assert "--s3-endpoint-url" in str(caught.value)
    assert time.monotonic() - started < ERROR_DEADLINE_S


def test_missing_credentials_fail_with_fix(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")

    with pytest.raises(StorageError) as caught:
        materialize_data_dir("s3://many/data", tmp_path / "cache", moto_endpoint)

    assert "No AWS credentials" in str(caught.value)
    assert "AWS_PROFILE" in str(caught.value)


def test_rejected_credentials_fail_with_fix(tmp_path: Path) -> None:
    # With INITIAL_NO_AUTH_ACTION_COUNT=0 moto checks every request against its IAM users,
    # so the unknown test key is rejected as a real store would reject it.
    process, endpoint = _start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "0"})
    try:
        with pytest.raises(StorageError) as caught:
            materialize_data_dir("s3://locked/data", tmp_path / "cache", endpoint)
    finally:
        _stop(process)

    assert "s3://locked/data/" in str(caught.value)
    assert "check AWS_ACCESS_KEY_ID/AWS_PROFILE" in str(caught.value)
    assert "testing" not in str(caught.value)


def test_aws_endpoint_url_used_without_option(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _make_bucket(moto_endpoint, "from-env", {"set/a.txt": b"a"})
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)

    result = materialize_data_dir("s3://from-env/set", tmp_path / "cache", None)

    assert _local_files(result.local_dir) == {"a.txt": b"a"}


def test_aws_endpoint_url_s3_preferred(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _make_bucket(moto_endpoint, "from-s3-env", {"set/a.txt": b"a"})
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", moto_endpoint)

    result = materialize_data_dir("s3://from-s3-env/set", tmp_path / "cache", None)

    assert _local_files(result.local_dir) == {"a.txt": b"a"}


def test_explicit_endpoint_overrides_environment(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _make_bucket(moto_endpoint, "explicit", {"set/a.txt": b"a"})
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", os.environ["AWS_ENDPOINT_URL"])

    result = materialize_data_dir("s3://explicit/set", tmp_path / "cache", moto_endpoint)

    assert result.downloaded == 1


def test_etags_replace_content_hash_in_fingerprint(tmp_path: Path) -> None:
    (tmp_path / "case").mkdir()
    image = tmp_path / "case" / "image.nii.gz"
    image.write_bytes(b"12345")
    data = MaterializedData(local_dir=tmp_path, etags={"p/case/image.nii.gz": "etag-1"}, prefix="p/")

    with_etag = fingerprint_files([image], data.source_digests())
    image.write_bytes(b"54321")
    same_etag_other_content = fingerprint_files([image], data.source_digests())
    other_etag = fingerprint_files([image], {image: "s3-etag:etag-2"})

    assert data.source_digests() == {image: "s3-etag:etag-1"}
    assert with_etag == same_etag_other_content
    assert with_etag != other_etag
    assert with_etag != fingerprint_files([image])


def test_cli_keeps_s3_data_dir_as_uri() -> None:
    args = build_parser().parse_args(
        ["search", "--dataset", "brats", "--data-dir", "s3://bucket/brats", "--s3-endpoint-url", "http://127.0.0.1:9000"]
    )

    settings = settings_from_args(args)

    assert settings.data_dir == "s3://bucket/brats"
    assert settings.s3_endpoint_url == "http://127.0.0.1:9000"


@pytest.mark.slow
def test_search_reads_brats_from_s3(brats_dir: Path, moto_endpoint: str, tmp_path: Path) -> None:
    objects = {
        f"brats/{case}/{path.name}": path.read_bytes()
        for case in BRATS_CASES
        for path in sorted((brats_dir / case).iterdir())
        if path.is_file()
    }
    _make_bucket(moto_endpoint, "scans", objects)
    command = [
        sys.executable, "-m", "aeplat.platform.cli", "search",
        "--dataset", "brats", "--data-dir", "s3://scans/brats", "--s3-endpoint-url", moto_endpoint,
        "--modality", "flair", "--image-size", "32", "--trials", "2", "--epochs", "2", "--grace-period", "1",
        "--max-concurrent", "2",
        "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
        "--cache-dir", str(tmp_path / "cache"), "--storage", "s3://scans/tune-runs",
    ]  # fmt: skip

    completed = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ})

    assert completed.returncode == 0, completed.stderr[-4000:]
    assert f"{len(objects)} objects downloaded" in " ".join(completed.stderr.split())
    stored = _client(moto_endpoint).list_objects_v2(Bucket="scans", Prefix="tune-runs/")
    stored_keys = [item["Key"] for item in stored.get("Contents", [])]
    assert any(key.endswith("/checkpoint_000000/best_model.pt") or "/checkpoint_" in key for key in stored_keys), stored_keys[:20]
    manifests = list((tmp_path / "cache" / "s3-manifests").glob("*.json"))
    assert len(manifests) == 1
    assert set(json.loads(manifests[0].read_text())["objects"]) == set(objects)
    assert _local_files(tmp_path / "cache" / "s3" / "scans" / "brats") == {key[len("brats/") :]: body for key, body in objects.items()}
