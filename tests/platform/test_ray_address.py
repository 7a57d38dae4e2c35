from __future__ import annotations

import socket
import time

import pytest

from aeplat.platform.runner import _check_reachable
from aeplat.platform.search import SearchError


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_unreachable_address_fails_within_seconds() -> None:
    address = f"127.0.0.1:{_closed_port()}"

    started = time.monotonic()
    with pytest.raises(SearchError, match="does not accept connections"):
        _check_reachable(address)

    assert time.monotonic() - started < 10


@pytest.mark.parametrize("address", ["nohost", "host:port", "ray://:10001"])
def test_malformed_address_rejected(address: str) -> None:
    with pytest.raises(SearchError, match="invalid"):
        _check_reachable(address)


def test_listening_address_accepted() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]

        _check_reachable(f"ray://127.0.0.1:{port}")
