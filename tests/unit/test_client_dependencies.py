"""The producer's side of dependencies: how a TaskFuture pickles, and why a dependency's
DELIVERED is held back until the task referring to it is acknowledged."""

from __future__ import annotations

import pickle
from typing import Any

import cloudpickle
import pytest

from taskmesh import Client, DependencyFailed, TaskFuture
from taskmesh.protocol import ErrorInfo, Outcome, Status
from taskmesh.serialize import collecting_dependencies, dependency_values, dumps_call
from taskmesh.testing import wait_until

pytestmark = pytest.mark.timeout(30)


def pending(client: Client, task_id: str) -> TaskFuture[Any]:
    future: TaskFuture[Any] = TaskFuture(task_id, "dep", client)
    with client._lock:
        client._futures[task_id] = future
    return future


def test_an_unfinished_future_pickles_as_a_reference_and_is_pinned(client: Client) -> None:
    dep = pending(client, "dep-1")
    found: list[Any] = []
    blob = dumps_call("use", ([dep, {"x": dep}],), {}, found)
    assert found == [dep] and client._pins["dep-1"] == 1  # pickled once, memoized after
    with dependency_values({"dep-1": 42}):  # what the worker does with Assignment.deps
        assert pickle.loads(blob) == (([42, {"x": 42}],), {})
    with pytest.raises(LookupError, match=r"\[dep-1\] did not come with this call"):
        pickle.loads(blob)


def test_its_outcome_is_held_back_until_the_dependent_is_acknowledged(client: Client) -> None:
    dep = pending(client, "dep-1")
    other = pending(client, "other")
    found: list[Any] = []
    dumps_call("use", (dep,), {}, found)
    ok = Outcome("dep-1", Status.OK, pickle.dumps(7))
    arrived, delivered = client._claim_outcomes([ok, Outcome("other", Status.OK, pickle.dumps(1))])
    assert [f for f, _ in arrived] == [dep, other]
    assert delivered == ["other"]  # dep-1 is held: the broker must not forget it yet
    assert client._released_deliveries() == []
    client._unpin("dep-1")  # the dependent's ACK arrived: the I/O thread may send it now
    released = client._released_deliveries()  # (unless that thread got there first)
    wait_until(lambda: not client._held and not client._unpinned, 5, "dep-1 to be released")
    assert released in ([], ["dep-1"]) and client._pins == {}


def test_a_future_whose_outcome_arrived_travels_as_its_value(client: Client) -> None:
    dep = pending(client, "dep-1")
    client._claim_outcomes([Outcome("dep-1", Status.OK, pickle.dumps("ready"))])
    found: list[Any] = []
    blob = dumps_call("use", (dep,), {}, found)
    assert found == [] and client._pins == {}
    assert pickle.loads(blob) == (("ready",), {})


def test_a_failed_dependency_fails_the_submit_at_once(client: Client) -> None:
    dep = pending(client, "dep-1")
    info = ErrorInfo("ValueError", "bad", "", ("ValueError",))
    client._claim_outcomes([Outcome("dep-1", Status.ERROR, pickle.dumps(ValueError("bad")), info)])
    future = client.submit(print, dep)
    with pytest.raises(DependencyFailed, match=r"its dependency dep \[dep-1\] failed: ValueError"):
        future.result(timeout=1)
    assert client._pins == {}


def test_a_pin_is_released_when_the_call_cannot_be_pickled(client: Client) -> None:
    import threading

    dep = pending(client, "dep-1")
    with pytest.raises(TypeError, match=r"argument 1 \(a lock\) cannot be pickled"):
        client.submit(print, dep, threading.Lock())
    assert client._pins == {}


def test_a_future_cannot_be_pickled_outside_a_submit(client: Client) -> None:
    dep = pending(client, "dep-1")
    with pytest.raises(TypeError, match="only be pickled as an argument of a submitted task"):
        cloudpickle.dumps(dep)
    with collecting_dependencies([]):
        cloudpickle.dumps(dep)  # inside one: fine
