"""Futures as arguments: chains, fan-out/fan-in, failures down a chain, and a dependency that
outlives a broker restart, on real broker and worker processes."""

from __future__ import annotations

from pathlib import Path

import _tasks
import pytest

from taskmesh import DependencyFailed, TaskFuture
from taskmesh.testing import Mesh, wait_until

pytestmark = pytest.mark.timeout(90)

MESH_OPTIONS = {"workers": 2, "concurrency": 2}


def test_a_chain_passes_each_result_to_the_next(client) -> None:  # type: ignore[no-untyped-def]
    step: TaskFuture[int] = client.submit(_tasks.add, 1, 1)
    for i in range(10):
        step = client.submit(_tasks.add, step, i)
    assert step.result(timeout=30) == 2 + sum(range(10))


def test_fan_out_then_fan_in_with_futures_nested_in_containers(client) -> None:  # type: ignore[no-untyped-def]
    squares = [_tasks.square.submit(i, _client=client) for i in range(20)]
    nested = {"squares": squares, "pair": (squares[0], [squares[1]])}
    echoed = client.submit(_tasks.echo, nested).result(timeout=30)
    assert echoed["squares"] == [i * i for i in range(20)]
    assert echoed["pair"] == (0, [1])
    # in keyword arguments too
    fresh = _tasks.square.submit(7, _client=client)
    assert client.submit(_tasks.echo, value={"k": [fresh]}).result(timeout=30) == {"k": [49]}
    # a finished future travels as its value; an unfinished one as a reference: same answer
    assert client.submit(_tasks.add, squares[3], squares[4]).result(timeout=30) == 25


def test_dependents_submitted_while_their_dependency_finishes_never_lose_it(client) -> None:  # type: ignore[no-untyped-def]
    # dependents right behind their dependencies, some pickled as their outcome arrives (the
    # hold-back of DELIVERED that makes this safe is checked in tests/unit)
    pairs = []
    for i in range(300):
        first = client.submit(_tasks.add, i, 1)
        pairs.append(client.submit(_tasks.add, first, 1))
    assert [f.result(timeout=60) for f in pairs] == [i + 2 for i in range(300)]


def test_a_failed_dependency_fails_its_dependents_naming_it(client, mesh: Mesh) -> None:  # type: ignore[no-untyped-def]
    done_before = mesh.status()["counters"]["done"]
    bad = client.submit(_tasks.fail_with_value_error, "bad input")
    child = client.submit(_tasks.add, bad, 1)
    grandchild = client.submit(_tasks.add, child, 1)
    with pytest.raises(ValueError, match="bad input"):
        bad.result(timeout=30)
    with pytest.raises(DependencyFailed) as info:
        child.result(timeout=30)
    message = str(info.value)
    assert f"[{bad.task_id}]" in message and "ValueError: bad input" in message
    assert "fail_with_value_error" in message
    with pytest.raises(DependencyFailed, match=rf"\[{child.task_id}\]"):
        grandchild.result(timeout=30)
    # submitted after the failure is known here: fails at once, without a round trip
    late = client.submit(_tasks.add, bad, 2)
    with pytest.raises(DependencyFailed, match="ValueError: bad input"):
        late.result(timeout=1)
    assert mesh.status()["counters"]["done"] == done_before  # none of them ran


def test_cancelling_a_dependency_fails_the_tasks_waiting_for_it(make_mesh) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(workers=1, concurrency=1)
    with mesh.client() as client:
        parked = client.submit(_tasks.add, 1, 2, _queue="nobody")
        waiting = client.submit(_tasks.add, parked, 3)
        wait_until(
            lambda: any(q.get("waiting") == 1 for q in mesh.status()["queues"]),
            20,
            "the dependent to wait",
        )
        assert parked.cancel()
        with pytest.raises(DependencyFailed, match="was cancelled"):
            waiting.result(timeout=20)


def test_a_dependency_outlives_a_broker_restart(make_mesh, gate, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(
        workers=1, concurrency=1, heartbeat_interval_s=0.3, journal=str(tmp_path / "j.db")
    )
    with mesh.client() as client:
        first = _tasks.gated.submit(3, str(gate), _client=client)
        second = client.submit(_tasks.echo, first)
        wait_until(lambda: gate.started(), 20, "the dependency to start")
        assert mesh.broker is not None
        mesh.broker.kill()  # a crash: only the journal remembers the waiting task
        mesh.start_broker()
        gate.release()
        assert first.result(timeout=40)[0] == 9
        assert second.result(timeout=40)[0] == 9
    assert len(gate.started()) == 1  # the restart did not run the dependency twice
