"""The supervisor's side of its executors, with real executor processes (no broker needed)."""

from __future__ import annotations

import multiprocessing
import os
import select
import time
from collections.abc import Iterator

import pytest

from taskmesh import protocol as p
from taskmesh.executor_pool import ExecutorPool
from taskmesh.serialize import dumps_call, dumps_function

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def pool() -> Iterator[ExecutorPool]:
    pool = ExecutorPool(1, "unit", mp_context=multiprocessing.get_context("fork"))
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()


def sleeping(task_id: str, seconds: float) -> p.Assignment:
    fn = dumps_function(time.sleep)
    return p.Assignment(task_id, "sleep", fn, dumps_call("sleep", (seconds,), {}), 1, None)


def outcomes_until(pool: ExecutorPool, n: int, timeout_s: float) -> dict[str, p.Status]:
    """Drive the pool as the supervisor's loop does until ``n`` outcomes are in."""
    found: dict[str, p.Status] = {}
    deadline = time.monotonic() + timeout_s
    while len(found) < n:
        assert time.monotonic() < deadline, f"only {found} after {timeout_s}s"
        fds = pool.poll_fds()
        ready, _, _ = select.select(list(fds), [], [], 0.05)
        if ready:
            pool.on_readable([fds[fd] for fd in ready], time.monotonic())
        pool.pump()
        found.update((o.task_id, o.status) for o in pool.take_outcomes())
    return found


def test_tasks_are_announced_before_they_are_handed_over(
    pool: ExecutorPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import taskmesh.executor_pool as executor_pool

    events: list[object] = []
    write = executor_pool.send_message

    def recorded_write(conn: object, batch: list[tuple[object, ...]]) -> None:
        events.append(("write", [item[1] for item in batch]))
        write(conn, batch)  # type: ignore[arg-type]

    monkeypatch.setattr(executor_pool, "send_message", recorded_write)
    pool.avg_run_s = 1e-5  # short tasks: one executor takes several at once
    pool.offer([sleeping("a", 0.0), sleeping("b", 0.0)])
    pool.pump(announce=lambda ids: events.append(("announce", ids)))
    assert events == [("announce", ["a", "b"]), ("write", ["a", "b"])]
    assert outcomes_until(pool, 2, 20) == {"a": p.Status.OK, "b": p.Status.OK}


def test_a_task_cancelled_behind_a_killed_one_is_not_run_again(pool: ExecutorPool) -> None:
    pool.avg_run_s = 1e-5
    pool.offer([sleeping("A", 30.0), sleeping("B", 0.0)])
    pool.pump()
    executor = pool._executors[0]
    deadline = time.monotonic() + 20
    while executor.running() is None:
        assert time.monotonic() < deadline, "A never started"
        time.sleep(0.01)
    assert pool.handed() == ["A", "B"]
    pool.abort({"A", "B"}, terminate=True)  # kills A's executor; B waits behind it
    assert outcomes_until(pool, 2, 20) == {"A": p.Status.CANCELLED, "B": p.Status.CANCELLED}


def test_the_pool_counts_the_tasks_with_a_time_limit_it_holds(pool: ExecutorPool) -> None:
    """The supervisor polls often while such a task is held; the count must follow every way
    a task leaves an executor: finished, or with its executor dead."""
    pool.avg_run_s = 1e-5
    sleep_args = dumps_call("sleep", (0.0,), {})
    timed = p.Assignment("timed", "sleep", dumps_function(time.sleep), sleep_args, 1, 5.0)
    pool.offer([sleeping("plain", 0.0), timed])
    assert not pool.has_timed_tasks()  # in the backlog, not with an executor
    pool.pump()
    assert pool.has_timed_tasks()
    assert outcomes_until(pool, 2, 20) == {"plain": p.Status.OK, "timed": p.Status.OK}
    assert not pool.has_timed_tasks()
    exits = dumps_function(os._exit)
    pool.offer([p.Assignment("dies", "exit", exits, dumps_call("exit", (3,), {}), 1, 5.0)])
    pool.pump()
    assert pool.has_timed_tasks()
    assert outcomes_until(pool, 1, 20) == {"dies": p.Status.LOST}
    assert not pool.has_timed_tasks()
