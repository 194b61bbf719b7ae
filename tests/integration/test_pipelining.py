"""Pipelined executors: short tasks share pipe messages, yet a quick task's outcome never waits
for a slow task queued after it on the same executor, nor dies with it."""

from __future__ import annotations

from concurrent.futures import wait

import _tasks
import pytest

from taskmesh import Client, TaskTimeout
from taskmesh.testing import Mesh

MESH_OPTIONS = {"workers": 1, "concurrency": 1}


def _warm_up(client: Client) -> None:
    # many no-op tasks teach the worker that tasks are short: it starts batching them
    for f in [client.submit(_tasks.add, i, 1) for i in range(2000)]:
        f.result(timeout=60)


@pytest.mark.timeout(60)
def test_quick_outcomes_do_not_wait_behind_a_slow_neighbour(mesh: Mesh) -> None:
    with mesh.client() as client:
        _warm_up(client)
        quick = [client.submit(_tasks.add, i, 1) for i in range(20)]
        slow = client.submit(_tasks.slow_identity, 7, 3.0)
        done, _ = wait(quick, timeout=2.0)
        assert len(done) == len(quick)  # well before the slow task ends
        assert not slow.done()
        assert [f.result() for f in quick] == [i + 1 for i in range(20)]
        assert slow.result(timeout=30) == 7


@pytest.mark.timeout(60)
def test_a_timeout_after_quick_tasks_does_not_rerun_them(mesh: Mesh) -> None:
    with mesh.client() as client:
        _warm_up(client)
        done_before = mesh.status()["counters"]["done"]
        quick = [client.submit(_tasks.add, i, 1) for i in range(20)]
        hang = client.submit(_tasks.sleep_long, _timeout=1.0)
        assert [f.result(timeout=20) for f in quick] == [i + 1 for i in range(20)]
        with pytest.raises(TaskTimeout):
            hang.result(timeout=30)
        workers = mesh.status()["workers"]
        # each quick task finished exactly once: none was lost with the killed executor
        assert sum(w["done"] for w in workers) - done_before == len(quick)
