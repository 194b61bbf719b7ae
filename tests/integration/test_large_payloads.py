"""Large buffers end to end: each type comes back as itself through broker, supervisor and
executor, whichever way its memory crossed (read-only buffers into ``bytes``, writable ones into
fresh memory), and the mesh goes on serving small tasks."""

from __future__ import annotations

import os

import _tasks
import pytest

from taskmesh import Client
from taskmesh.testing import wait_until

MESH_OPTIONS = {"workers": 1, "concurrency": 2}

pytestmark = pytest.mark.timeout(60)

MB = 1 << 20


def test_a_large_bytearray_comes_back_a_bytearray(client: Client) -> None:
    data = bytearray(os.urandom(3 * MB))
    back = client.submit(_tasks.echo, data).result(timeout=30)
    assert type(back) is bytearray
    assert back == data


def test_a_large_memoryview_arrives_as_bytes(client: Client) -> None:
    data = os.urandom(3 * MB)
    back = client.submit(_tasks.echo, memoryview(data)[MB:]).result(timeout=30)
    assert type(back) is bytes
    assert back == data[MB:]


def test_several_large_buffers_in_one_call_and_one_result(client: Client) -> None:
    first, second = os.urandom(2 * MB), os.urandom(MB)
    value = {"first": first, "second": [second, first], "small": b"x"}
    back = client.submit(_tasks.echo, value).result(timeout=30)
    assert back == value
    assert back["second"][1] is back["first"]  # one buffer, referred to twice


def test_a_large_result_from_a_small_call(client: Client) -> None:
    future = client.submit(os.urandom, 4 * MB)
    back = future.result(timeout=30)
    # the received frame is not kept beside the value (dropped just after settling)
    wait_until(lambda: future._seen is None, 5.0, "the future to let go of its outcome")
    assert type(back) is bytes
    assert len(back) == 4 * MB
    assert client.submit(_tasks.add, 2, 3).result(timeout=30) == 5
