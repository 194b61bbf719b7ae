"""Large buffers end to end: each type comes back as itself through broker, supervisor and
executor, whichever way its memory crossed (read-only buffers into ``bytes``, writable ones into
fresh memory), and the mesh goes on serving small tasks."""

from __future__ import annotations

import hashlib
import os
import platform
from collections.abc import Callable

import _tasks
import pytest

from taskmesh import Client
from taskmesh.heap import KEEPER
from taskmesh.testing import Mesh, wait_until

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


GLIBC = platform.libc_ver()[0] == "glibc"


@pytest.mark.skipif(not GLIBC, reason="the broker and supervisor switch glibc's allocator only")
def test_broker_and_supervisor_keep_a_large_payloads_memory_then_give_it_back(
    make_mesh: Callable[..., Mesh],
) -> None:
    """While large payloads flow they land in memory the broker and the supervisor kept from the
    last one (no page faults); a heartbeat interval after the last one, it goes back."""
    # the round trip must end before the second tick after the argument came: 3 to 6 s
    mesh = make_mesh(workers=1, concurrency=1, heartbeat_interval_s=3.0)
    assert mesh.broker is not None
    broker, supervisor = mesh.broker.pid, mesh.workers[0].pid
    data = os.urandom(48 * MB)
    with mesh.client() as client:
        assert client.submit(_tasks.add, 1, 2).result(timeout=30) == 3  # everything up
        before = {pid: _tasks.heap_rss_kb(pid) for pid in (broker, supervisor)}
        # a large argument and a large result: both processes receive 48 MB each way
        back = client.submit(_tasks.echo, data).result(timeout=30)
        kept = {pid: _tasks.heap_rss_kb(pid) for pid in (broker, supervisor)}
    assert hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
    for pid in (broker, supervisor):
        assert kept[pid] - before[pid] >= 40 * 1024, (pid, before, kept)
    wait_until(
        lambda: all(_tasks.heap_rss_kb(pid) - before[pid] < 16 * 1024 for pid in kept),
        30.0,
        "the kept memory to go back after a quiet interval",
    )


@pytest.mark.skipif(not GLIBC, reason="the allocator is switched on glibc only")
def test_user_code_and_the_producer_keep_glibcs_own_allocator_settings(client: Client) -> None:
    assert not KEEPER.active  # the producer's process: untouched
    # with glibc's defaults a 64 MB buffer gets a mapping of its own, outside the heap
    assert client.submit(_tasks.heap_rss_kb_holding, 64 * MB).result(timeout=30) < 32 * 1024
