"""Routing strategies per queue: the distribution each produces, and key affinity by
consistent hashing (stable while membership is stable, ~1/N of keys move when it changes)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from taskmesh.protocol import PRODUCER, WORKER, Hello, Ready, Submit, Tasks, TaskSpec
from taskmesh.scheduler import Route, Scheduler, SchedulerConfig

pytestmark = pytest.mark.timeout(30)

PRODUCER_ADDR = b"producer"


def make(route: Route, seed: int = 7) -> Scheduler:
    s = Scheduler(SchedulerConfig(routes=(("q", route),)), rng=random.Random(seed))
    s.handle(PRODUCER_ADDR, PRODUCER, Hello("c1"), 0.0)
    return s


def join(s: Scheduler, name: str, credit: int, weight: float = 1.0) -> None:
    ready = Ready(f"id-{name}", name, "host", 1, ["q"], 1, credit, [], weight)
    s.handle(name.encode(), WORKER, ready, 0.0)


def submit(s: Scheduler, ids: list[str], key: str | None = None) -> dict[str, str]:
    """Submit tasks and return where each was dispatched (task id -> worker name)."""
    specs = [TaskSpec(t, "fn", "q", b"f", b"a", key=key) for t in ids]
    s.handle(PRODUCER_ADDR, PRODUCER, Submit(specs), 0.0)
    where: dict[str, str] = {}
    for send in s.flush(0.0):
        if isinstance(send.message, Tasks):
            for a in send.message.assignments:
                where[a.task_id] = send.address.decode()
    return where


def test_round_robin_takes_turns() -> None:
    s = make(Route.ROUND_ROBIN)
    for name in ("a", "b", "c"):
        join(s, name, credit=100)
    where = submit(s, [f"t{i}" for i in range(30)])
    assert Counter(where.values()) == {"a": 10, "b": 10, "c": 10}
    assert [where[f"t{i}"] for i in range(6)] == ["a", "b", "c", "a", "b", "c"]


def test_round_robin_skips_a_worker_without_credit() -> None:
    s = make(Route.ROUND_ROBIN)
    join(s, "a", credit=1)
    join(s, "b", credit=100)
    where = submit(s, [f"t{i}" for i in range(5)])
    assert Counter(where.values()) == {"a": 1, "b": 4}


def test_random_spreads_evenly() -> None:
    s = make(Route.RANDOM)
    for name in ("a", "b", "c"):
        join(s, name, credit=10_000)
    counts = Counter(submit(s, [f"t{i}" for i in range(3000)]).values())
    assert set(counts) == {"a", "b", "c"}
    assert all(800 <= n <= 1200 for n in counts.values()), counts


def test_weighted_follows_the_weights() -> None:
    s = make(Route.WEIGHTED)
    for name, weight in (("a", 1.0), ("b", 2.0), ("c", 3.0)):
        join(s, name, credit=10_000, weight=weight)
    counts = Counter(submit(s, [f"t{i}" for i in range(6000)]).values())
    assert 800 <= counts["a"] <= 1200, counts
    assert 1700 <= counts["b"] <= 2300, counts
    assert 2600 <= counts["c"] <= 3400, counts


def test_a_key_always_lands_on_the_same_worker() -> None:
    s = make(Route.KEY)
    for name in ("a", "b", "c"):
        join(s, name, credit=10_000)
    for key in ("user-1", "user-2", "user-42"):
        where = submit(s, [f"{key}-{i}" for i in range(20)], key=key)
        assert len(set(where.values())) == 1, (key, where)


def _owner_of_keys(s: Scheduler, keys: list[str], tag: str) -> dict[str, str]:
    owners = {}
    for key in keys:
        (worker,) = submit(s, [f"{tag}-{key}"], key=key).values()
        owners[key] = worker
    return owners


def test_a_joining_worker_takes_about_a_quarter_of_the_keys() -> None:
    s = make(Route.KEY)
    for name in ("a", "b", "c"):
        join(s, name, credit=100_000)
    keys = [f"user-{i}" for i in range(2000)]
    before = _owner_of_keys(s, keys, "before")
    assert all(400 <= n <= 950 for n in Counter(before.values()).values())  # about 2000/3 each
    join(s, "d", credit=100_000)
    after = _owner_of_keys(s, keys, "after")
    moved = [k for k in keys if before[k] != after[k]]
    assert 0.15 * len(keys) <= len(moved) <= 0.35 * len(keys), len(moved)
    assert all(after[k] == "d" for k in moved)  # keys only move to the newcomer


def test_a_busy_owner_makes_its_keys_wait_not_the_others() -> None:
    s = make(Route.KEY)
    join(s, "a", credit=1000)
    join(s, "b", credit=1000)
    owners = _owner_of_keys(s, [f"k{i}" for i in range(50)], "probe")
    key_of_a = next(k for k, w in owners.items() if w == "a")
    key_of_b = next(k for k, w in owners.items() if w == "b")
    s.workers["id-a"].credit = 0  # a is full
    waiting = submit(s, ["w1"], key=key_of_a)
    assert waiting == {}  # it waits for a rather than running elsewhere
    assert submit(s, ["w2"], key=key_of_b) == {"w2": "b"}
    assert s.stats["q"].pending == 1
    s.workers["id-a"].credit = 1
    s._dirty = True
    dispatched = {
        a.task_id: send.address.decode()
        for send in s.flush(0.0)
        if isinstance(send.message, Tasks)
        for a in send.message.assignments
    }
    assert dispatched == {"w1": "a"}


def test_tasks_without_a_key_are_least_loaded() -> None:
    s = make(Route.KEY)
    join(s, "a", credit=1)
    join(s, "b", credit=5)
    where = submit(s, ["t1", "t2"])
    assert where == {"t1": "b", "t2": "b"}
