"""Results, remote errors, ordering, big payloads, pickling errors and asyncio, on one shared mesh
of two workers."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

import _tasks
import pytest

import taskmesh
from taskmesh import Client
from taskmesh.testing import Mesh, wait_until

MESH_OPTIONS = {"workers": 2, "concurrency": 2}

pytestmark = pytest.mark.timeout(60)


# ------------------------------------------------------------------ results and remote errors


def test_local_call_runs_here_and_submit_runs_on_a_worker(client: Client, mesh: Mesh) -> None:
    assert _tasks.square(7) == 49  # a plain local call
    info = _tasks.whoami.submit(_client=client).result(timeout=20)
    worker_pids = {w.popen.pid for w in mesh.workers}
    assert info["pgid"] in worker_pids  # an executor in one of our worker nodes
    assert info["pid"] != os.getpid()
    assert info["worker"] in {w.name for w in mesh.workers}


def test_user_code_runs_with_pythons_own_garbage_collector_settings(client: Client) -> None:
    """The broker and worker supervisors tune their collector; executors must not inherit it."""
    import gc

    assert gc.get_threshold() == (700, 10, 10)  # the producer's process: untouched too
    assert client.submit(gc.get_threshold).result(timeout=20) == (700, 10, 10)


def test_outcomes_received_are_confirmed_to_the_broker_without_further_traffic(
    client: Client, mesh: Mesh
) -> None:
    """A producer confirms outcomes with its next message, or on its own within milliseconds
    when it sends nothing more: the broker must not keep them until the result TTL."""
    futures = [client.submit(_tasks.add, i, 1) for i in range(50)]
    assert [f.result(timeout=20) for f in futures] == [i + 1 for i in range(50)]
    wait_until(
        lambda: mesh.status()["undelivered_outcomes"] == 0, 10.0, "no outcome left undelivered"
    )


def test_remote_result_round_trips(client: Client) -> None:
    future = client.submit(_tasks.add, 2, 3)
    assert isinstance(future, taskmesh.TaskFuture)
    assert isinstance(future.task_id, str) and future.task_id
    assert future.result(timeout=20) == 5
    assert _tasks.square.submit(12, _client=client).result(timeout=20) == 144
    ids = {client.submit(_tasks.add, i, i).task_id for i in range(20)}
    assert len(ids) == 20


def test_remote_exception_is_reraised_as_its_own_type_with_remote_traceback(
    client: Client,
) -> None:
    future = client.submit(_tasks.fail_with_value_error, "boom-42")
    with pytest.raises(ValueError, match="boom-42") as info:
        future.result(timeout=20)
    exc = info.value
    assert type(exc) is ValueError
    assert not isinstance(exc, taskmesh.TaskmeshError)
    notes = "\n".join(getattr(exc, "__notes__", []))
    assert "Traceback (most recent call last)" in notes
    assert "fail_with_value_error" in notes  # the remote frame
    assert "ValueError: boom-42" in notes
    assert future.task_id in notes


def test_exception_that_cannot_be_unpickled_arrives_as_remote_error(client: Client) -> None:
    future = client.submit(_tasks.raise_remote_only, "only the worker knows this class")
    with pytest.raises(taskmesh.RemoteError) as info:
        future.result(timeout=20)
    err = info.value
    assert err.type_name == "tm_remote_only.RemoteOnlyError"
    assert err.message == "only the worker knows this class"
    assert "Traceback (most recent call last)" in err.traceback_text
    assert "raise_remote_only" in err.traceback_text
    assert "RemoteOnlyError: only the worker knows this class" in err.traceback_text
    assert "RemoteOnlyError" in str(err)


# ------------------------------------------------------------------ map


def test_task_map_returns_results_in_order(client: Client) -> None:
    results = list(_tasks.square.map(range(30), client=client, timeout=30))
    assert results == [x * x for x in range(30)]


def test_client_map_returns_results_in_order_even_when_they_finish_out_of_order(
    client: Client,
) -> None:
    # the first items take longest, so they complete after the later ones
    delays = [0.6, 0.4, 0.2, 0.0, 0.0, 0.0, 0.0, 0.0]
    results = list(client.map(_tasks.slow_identity, range(len(delays)), delays, timeout=30))
    assert results == list(range(len(delays)))
    assert list(client.map(_tasks.add, range(10), range(100, 110), timeout=30)) == [
        x + 100 + x for x in range(10)
    ]


# ------------------------------------------------------------------ payloads and pickling


def test_twenty_megabyte_argument_round_trips_intact(client: Client) -> None:
    data = os.urandom(20 * 1024 * 1024)
    expected = hashlib.sha256(data).hexdigest()
    assert client.submit(_tasks.digest, data).result(timeout=60) == (expected, len(data))
    back = client.submit(_tasks.echo, data).result(timeout=60)
    assert isinstance(back, bytes)
    assert len(back) == len(data)
    assert hashlib.sha256(back).hexdigest() == expected


def test_unpicklable_argument_raises_serialization_error_at_submit(client: Client) -> None:
    lock = threading.Lock()
    with pytest.raises(taskmesh.SerializationError, match=r"argument 0 \(a lock\)"):
        client.submit(_tasks.echo, lock)
    with pytest.raises(taskmesh.SerializationError, match=r"argument 1 \(a lock\)"):
        _tasks.gated.submit(1, lock, _client=client)
    with pytest.raises(taskmesh.SerializationError, match=r"keyword argument 'value'"):
        client.submit(_tasks.echo, value=lock)
    with pytest.raises(TypeError):  # SerializationError is also a TypeError
        client.submit(_tasks.echo, lock)
    # nothing half-sent: the client still works
    assert client.submit(_tasks.add, 1, 1).result(timeout=20) == 2


def test_unpicklable_task_function_raises_serialization_error_at_submit(client: Client) -> None:
    lock = threading.Lock()

    def uses_lock() -> bool:
        with lock:
            return True

    with pytest.raises(taskmesh.SerializationError, match="uses_lock"):
        client.submit(uses_lock)
    with pytest.raises(taskmesh.SerializationError, match="uses_lock"):
        taskmesh.task(uses_lock).submit(_client=client)
    assert client.submit(_tasks.add, 2, 2).result(timeout=20) == 4


def test_unpicklable_result_raises_serialization_error_from_result(client: Client) -> None:
    future = client.submit(_tasks.return_lock)  # submitting is fine
    with pytest.raises(taskmesh.SerializationError, match="cannot be pickled") as info:
        future.result(timeout=20)
    assert "lock" in str(info.value)


# ------------------------------------------------------------------ asyncio and as_completed


def test_a_task_future_is_awaitable(client: Client) -> None:
    async def main() -> list[int]:
        one = await _tasks.square.submit(9, _client=client)
        both = await asyncio.wait_for(
            asyncio.gather(client.submit(_tasks.add, 1, 2), client.submit(_tasks.add, 3, 4)), 30
        )
        return [one, *both]

    assert asyncio.run(main()) == [81, 3, 7]


def test_an_awaited_remote_exception_raises_in_the_coroutine(client: Client) -> None:
    async def main() -> None:
        await asyncio.wait_for(client.submit(_tasks.fail_with_value_error, "async-boom"), 30)

    with pytest.raises(ValueError, match="async-boom"):
        asyncio.run(main())


def test_as_completed_yields_futures_as_they_finish(client: Client, gate) -> None:
    # the quick tasks go first: an executor may hold a few short tasks at once, and one queued
    # behind the gated task in the same executor would wait for it
    fast = [client.submit(_tasks.add, i, 1) for i in range(3)]
    slow = _tasks.gated.submit(5, str(gate), _client=client)  # blocked until released
    finished = taskmesh.as_completed([slow, *fast], timeout=30)
    first_three = [next(finished) for _ in range(3)]
    assert set(first_three) == set(fast)
    assert not slow.done()
    assert sorted(f.result() for f in first_three) == [1, 2, 3]
    gate.release()
    assert next(finished) is slow
    assert slow.result()[0] == 25
    with pytest.raises(StopIteration):
        next(finished)
    done, not_done = taskmesh.wait([slow, *fast], timeout=5)
    assert not not_done and len(done) == 4
