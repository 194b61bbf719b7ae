"""TaskFuture makes its Condition only when a thread needs one: it must still behave exactly
like a ``concurrent.futures.Future`` under every interleaving of settling and waiting."""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import threading
import time
from typing import Any

import pytest

from taskmesh import Client, TaskFuture

pytestmark = pytest.mark.timeout(60)


def future(client: Client, n: int = 0) -> TaskFuture[Any]:
    return TaskFuture(f"t-{n}", "f", client)


def test_a_future_settled_before_anyone_waits_makes_no_condition(client: Client) -> None:
    f = future(client)
    assert not f.done()
    f.set_result(41)
    assert f.done() and f.result() == 41 and f.exception() is None
    assert f._made_condition is None
    with pytest.raises(cf.InvalidStateError):
        f.set_result(42)
    assert f.result() == 41


def test_an_exception_is_raised_by_result_and_returned_by_exception(client: Client) -> None:
    f = future(client)
    f.set_exception(KeyError("k"))
    assert isinstance(f.exception(), KeyError)
    with pytest.raises(KeyError):
        f.result(timeout=0)
    with pytest.raises(cf.InvalidStateError):
        f.set_exception(ValueError())


def test_a_waiting_thread_is_woken_by_a_result_from_another_thread(client: Client) -> None:
    for n in range(300):  # many rounds, so that every interleaving of the two gets its turn
        f = future(client, n)
        got: list[Any] = []
        waiter = threading.Thread(target=lambda f=f, got=got: got.append(f.result(timeout=10)))
        waiter.start()
        if n % 2:
            threading.Event().wait(0.0005)  # sometimes let the waiter make its Condition first
        f.set_result(n)
        waiter.join(timeout=10)
        assert got == [n]


def test_wait_and_as_completed_see_futures_settled_before_and_after_they_start(
    client: Client,
) -> None:
    futures = [future(client, n) for n in range(200)]
    for f in futures[:100]:
        f.set_result(f.task_id)

    def settle_rest() -> None:
        for f in futures[100:]:
            f.set_result(f.task_id)

    settler = threading.Thread(target=settle_rest)
    settler.start()
    done = {f.result() for f in cf.as_completed(futures, timeout=10)}
    settler.join(timeout=10)
    assert done == {f.task_id for f in futures}
    finished, not_done = cf.wait(futures, timeout=10)
    assert len(finished) == 200 and not not_done


def test_cancel_and_a_result_racing_settle_the_future_once(client: Client) -> None:
    outcomes = {"cancelled": 0, "finished": 0}
    for n in range(300):
        f = future(client, n)
        settled = threading.Event()

        def settle(f: TaskFuture[Any] = f, settled: threading.Event = settled) -> None:
            try:
                f.set_result(1)
            except cf.InvalidStateError:
                pass  # cancelled first
            settled.set()

        t = threading.Thread(target=settle)
        t.start()
        cancelled = f.cancel()
        assert settled.wait(10)
        t.join(timeout=10)
        assert cancelled == f.cancelled()
        if cancelled:
            outcomes["cancelled"] += 1
            with pytest.raises(cf.CancelledError):
                f.result(timeout=0)
        else:
            outcomes["finished"] += 1
            assert f.result(timeout=0) == 1
    assert sum(outcomes.values()) == 300


def test_callbacks_run_once_whether_added_before_or_after_the_result(client: Client) -> None:
    calls: list[str] = []
    before = future(client, 1)
    before.add_done_callback(lambda f: calls.append("before"))
    before.set_result(None)
    after = future(client, 2)
    after.set_result(None)
    after.add_done_callback(lambda f: calls.append("after"))
    assert calls == ["before", "after"]


def test_a_timeout_still_raises_when_nothing_settles_the_future(client: Client) -> None:
    f = future(client)
    with pytest.raises(cf.TimeoutError):
        f.result(timeout=0.01)
    f.set_result("late")  # with a Condition made now, the full settling protocol runs
    assert f.result(timeout=0) == "late"


def test_asyncio_awaits_a_future_settled_from_another_thread(client: Client) -> None:
    f = future(client)

    async def main() -> Any:
        threading.Timer(0.01, f.set_result, args=("from a thread",)).start()
        return await asyncio.wait_for(f, timeout=10)

    assert asyncio.run(main()) == "from a thread"


def test_a_cancelled_future_counts_as_done_for_wait_and_as_completed(client: Client) -> None:
    f = future(client)
    assert f.cancel() and f.cancelled() and f.done()
    finished, not_done = cf.wait([f], timeout=5)
    assert finished == {f} and not not_done
    assert list(cf.as_completed([f], timeout=5)) == [f]
    with pytest.raises(cf.CancelledError):
        f.result(timeout=0)


def test_a_waiter_already_in_wait_is_told_of_a_cancel(client: Client) -> None:
    f = future(client)
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(cf.wait([f], timeout=10)))
    waiter.start()
    deadline = time.monotonic() + 10
    while not f._waiters and time.monotonic() < deadline:  # wait() has installed its waiter
        time.sleep(0.001)
    f.cancel()
    waiter.join(timeout=10)
    ((finished, _),) = got
    assert finished == {f}
