"""Rate limits are enforced by the broker across all workers: a token bucket per task name."""

from __future__ import annotations

import pytest

from taskmesh.protocol import PRODUCER, WORKER, Hello, Ready, Submit, Tasks, TaskSpec
from taskmesh.scheduler import Scheduler, SchedulerConfig

pytestmark = pytest.mark.timeout(30)


def _dispatched(sends: list) -> list[str]:
    return [a.task_id for s in sends if isinstance(s.message, Tasks) for a in s.message.assignments]


def _mesh() -> Scheduler:
    s = Scheduler(SchedulerConfig())
    s.handle(b"p", PRODUCER, Hello("c1"), 0.0)
    for name in ("a", "b"):  # two workers: the limit holds across both
        s.handle(name.encode(), WORKER, Ready(name, name, "h", 1, ["default"], 1, 1000), 0.0)
    return s


def test_a_rate_limited_task_runs_no_faster_than_its_limit() -> None:
    s = _mesh()
    specs = [TaskSpec(f"t{i}", "fetch", "default", b"f", b"a", rate_limit=10.0) for i in range(35)]
    s.handle(b"p", PRODUCER, Submit(specs), 0.0)
    per_second = []
    now = 0.0
    total = _dispatched(s.flush(now))
    per_second.append(len(total))
    for _ in range(3):
        now += 1.0
        s.tick(now)
        batch = _dispatched(s.flush(now))
        per_second.append(len(batch))
        total += batch
    assert per_second[0] == 10  # a full bucket: one second's worth at once
    assert all(n <= 10 for n in per_second[1:]) and sum(per_second) == 35, per_second
    assert sorted(total) == sorted(f"t{i}" for i in range(35))
    assert s.counters["rate_limited"] > 0


def test_other_tasks_are_not_held_back_by_a_limited_one() -> None:
    s = _mesh()
    limited = [
        TaskSpec(f"slow{i}", "fetch", "default", b"f", b"a", rate_limit=1.0) for i in range(5)
    ]
    free = [TaskSpec(f"free{i}", "other", "default", b"f", b"a") for i in range(5)]
    s.handle(b"p", PRODUCER, Submit(limited + free), 0.0)
    sent = _dispatched(s.flush(0.0))
    assert sorted(sent) == sorted(["slow0"] + [f"free{i}" for i in range(5)])
    assert s.snapshot(0.0)["delayed"] == 4
