"""Queues: a task waits in its queue until a worker that serves that queue joins."""

from __future__ import annotations

import _tasks
import pytest

from taskmesh.testing import wait_until

pytestmark = pytest.mark.timeout(60)


def queue_stats(mesh, name: str) -> dict[str, int]:
    for q in mesh.status()["queues"]:
        if q["name"] == name:
            return q
    return {}


def test_queue_without_a_worker_keeps_tasks_pending_until_one_joins(make_mesh) -> None:
    mesh = make_mesh(workers=1, concurrency=2)  # serves "default" only
    client = mesh.client()
    special = [_tasks.whoami.submit(_client=client, _queue="special") for _ in range(3)]
    wait_until(
        lambda: queue_stats(mesh, "special").get("pending") == 3, 20, "3 pending in 'special'"
    )
    # the mesh is working: a later task on "default" finishes while "special" waits
    assert _tasks.square.submit(6, _client=client).result(timeout=20) == 36
    assert not any(f.done() for f in special)
    stats = queue_stats(mesh, "special")
    assert (stats["pending"], stats["running"], stats["done"]) == (3, 0, 0)

    joined = mesh.add_worker(queues=["special"])
    results = [f.result(timeout=30) for f in special]
    assert {r["worker"] for r in results} == {joined.name}
    assert {r["pgid"] for r in results} == {joined.pid}
    stats = queue_stats(mesh, "special")
    assert (stats["pending"], stats["running"], stats["done"]) == (0, 0, 3)


def test_task_decorator_queue_routes_to_the_worker_that_serves_it(make_mesh) -> None:
    mesh = make_mesh(workers=1, concurrency=1)
    cpu = mesh.add_worker(queues=["cpu"], concurrency=1)
    mesh.wait_for_workers(2)
    client = mesh.client()
    on_cpu = _tasks.whoami.with_options(queue="cpu")
    results = [f.result(timeout=20) for f in [on_cpu.submit(_client=client) for _ in range(4)]]
    assert {r["worker"] for r in results} == {cpu.name}
    plain = [_tasks.whoami.submit(_client=client) for _ in range(4)]
    default = [f.result(timeout=20) for f in plain]
    assert {r["worker"] for r in default} == {mesh.workers[0].name}
