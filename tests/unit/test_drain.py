"""A draining worker (RELEASE): what it hands back is requeued for free, and it gets no more."""

from __future__ import annotations

import pytest

from taskmesh.protocol import (
    PRODUCER,
    WORKER,
    Credit,
    Hello,
    Ready,
    Release,
    Submit,
    Tasks,
    TaskSpec,
)
from taskmesh.scheduler import Scheduler

pytestmark = pytest.mark.timeout(30)


def _assigned(sends: list, address: bytes) -> list[str]:
    return [
        a.task_id
        for s in sends
        if s.address == address and isinstance(s.message, Tasks)
        for a in s.message.assignments
    ]


def test_released_tasks_go_elsewhere_uncharged_and_the_worker_gets_nothing_more() -> None:
    s = Scheduler()
    s.handle(b"p", PRODUCER, Hello("c1"), 0.0)
    s.handle(b"w1", WORKER, Ready("w1", "w1", "h", 1, ["default"], 1, 3), 0.0)
    s.handle(
        b"p", PRODUCER, Submit([TaskSpec(f"t{i}", "f", "default", b"", b"") for i in range(3)]), 0.0
    )
    assert _assigned(s.flush(0.0), b"w1") == ["t0", "t1", "t2"]
    s.handle(b"w1", WORKER, Release(["t1", "t2"]), 1.0)
    assert s.tasks["t1"].attempt == 1 and s.tasks["t1"].lost == 0  # not charged
    s.handle(b"w1", WORKER, Credit(5), 1.0)  # a draining worker's credit is ignored
    assert _assigned(s.flush(1.0), b"w1") == []
    s.handle(b"w2", WORKER, Ready("w2", "w2", "h", 2, ["default"], 1, 5), 1.0)
    assert sorted(_assigned(s.flush(1.0), b"w2")) == ["t1", "t2"]
    states = {w["name"]: w["state"] for w in s.snapshot(1.0)["workers"]}
    assert states == {"w1": "draining", "w2": "alive"}
    assert s.workers["w1"].running == {"t0"}  # it still finishes what it runs
    queue = next(q for q in s.snapshot(1.0)["queues"] if q["name"] == "default")
    assert (queue["submitted"], queue["requeued"]) == (3, 2)
