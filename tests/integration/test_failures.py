"""Tasks that kill or hang their executor, on one worker with one executor: the worker reports
them and replaces the executor, so it keeps serving."""

from __future__ import annotations

import time

import _tasks
import pytest

import taskmesh
from taskmesh import Client
from taskmesh.testing import Mesh

MESH_OPTIONS = {"workers": 1, "concurrency": 1}

pytestmark = pytest.mark.timeout(60)


def executor_of(client: Client) -> dict[str, object]:
    return _tasks.whoami.submit(_client=client).result(timeout=20)


def test_poison_task_fails_with_worker_lost_after_max_attempts(mesh: Mesh, client: Client) -> None:
    counters_before = mesh.status()["counters"]
    future = _tasks.poison.submit(_client=client)
    with pytest.raises(taskmesh.WorkerLost, match=r"lost 3 times \(max_attempts=3\)"):
        future.result(timeout=30)
    counters = mesh.status()["counters"]
    assert counters["requeued"] - counters_before["requeued"] == 2  # runs 2 and 3
    assert counters["failed"] - counters_before["failed"] == 1
    # the mesh still serves, on the same worker node
    later = [_tasks.square.submit(i, _client=client) for i in (2, 3)]
    assert [f.result(timeout=20) for f in later] == [4, 9]
    assert mesh.workers[0].alive()
    assert mesh.status()["workers_alive"] == 1


def test_poison_task_stops_early_with_a_smaller_max_attempts(client: Client, mesh: Mesh) -> None:
    counters_before = mesh.status()["counters"]
    with pytest.raises(taskmesh.WorkerLost, match=r"max_attempts=2"):
        _tasks.poison.submit(_client=client, _max_attempts=2).result(timeout=30)
    assert mesh.status()["counters"]["requeued"] - counters_before["requeued"] == 1
    assert _tasks.square.submit(5, _client=client).result(timeout=20) == 25


def test_time_limit_raises_task_timeout_quickly_and_the_worker_keeps_serving(
    mesh: Mesh, client: Client
) -> None:
    before = executor_of(client)
    started = time.monotonic()
    future = _tasks.sleep_long.submit(_client=client)  # @task(timeout=0.5), sleeps 30 s
    with pytest.raises(taskmesh.TaskTimeout, match=r"time limit of 0\.5s"):
        future.result(timeout=20)
    elapsed = time.monotonic() - started
    assert elapsed < 5.0, f"the time limit of 0.5s took {elapsed:.1f}s to fire"

    after = executor_of(client)
    assert after["worker"] == before["worker"]
    # the same worker node (its process group), but a fresh executor replaced the killed one
    assert after["pgid"] == before["pgid"] == mesh.workers[0].pid
    assert after["pid"] != before["pid"]
    assert mesh.workers[0].alive()


def test_per_call_timeout_overrides_the_task_default(client: Client) -> None:
    with pytest.raises(taskmesh.TaskTimeout):
        client.submit(_tasks.slow_identity, 1, 30.0, _timeout=0.3).result(timeout=20)
    assert client.submit(_tasks.slow_identity, 2, 0.0, _timeout=5.0).result(timeout=20) == 2


def test_executor_crash_fails_only_that_task_and_later_tasks_still_run(
    mesh: Mesh, client: Client
) -> None:
    before = executor_of(client)
    with pytest.raises(taskmesh.WorkerLost, match=r"max_attempts=1") as info:
        _tasks.crash_executor.submit(_client=client).result(timeout=20)  # os._exit(3)
    assert before["worker"] in str(info.value)
    assert not isinstance(info.value, taskmesh.TaskTimeout)

    later = [_tasks.square.submit(i, _client=client) for i in range(5)]
    assert [f.result(timeout=20) for f in later] == [0, 1, 4, 9, 16]
    after = executor_of(client)
    assert after["worker"] == before["worker"]
    assert after["pgid"] == before["pgid"] == mesh.workers[0].pid
    assert after["pid"] != before["pid"]
    snapshot = mesh.status()
    assert snapshot["workers_alive"] == 1
    assert snapshot["counters"]["workers_lost"] == 0  # an executor died, not the worker node
