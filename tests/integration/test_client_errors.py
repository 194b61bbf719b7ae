"""A client with no broker behind its address: it fails fast and clearly, never hangs."""

from __future__ import annotations

import time

import _tasks
import pytest

import taskmesh
from taskmesh import Client

pytestmark = pytest.mark.timeout(30)


def test_submit_without_a_broker_fails_within_the_connect_timeout(dead_url: str) -> None:
    with Client(dead_url, connect_timeout_s=1.0) as client:
        started = time.monotonic()
        future = client.submit(_tasks.add, 1, 2)  # accepted locally, never acknowledged
        with pytest.raises(taskmesh.BrokerUnavailable, match=dead_url):
            future.result(timeout=15)
        elapsed = time.monotonic() - started
        assert 1.0 <= elapsed < 5.0, f"failed after {elapsed:.2f}s, expected about 1s"


def test_an_invalid_address_is_refused_at_construction() -> None:
    with pytest.raises(taskmesh.BrokerUnavailable, match="nonsense"):
        Client("nonsense")
    with pytest.raises(taskmesh.BrokerUnavailable):
        Client("tcp://127.0.0.1:99999")
