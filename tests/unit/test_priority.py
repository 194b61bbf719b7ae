"""Priorities: strict by default; with aging, a long-waiting low priority is not starved."""

from __future__ import annotations

import pytest

from taskmesh.protocol import PRODUCER, WORKER, Credit, Hello, Ready, Submit, Tasks, TaskSpec
from taskmesh.scheduler import Scheduler, SchedulerConfig

pytestmark = pytest.mark.timeout(30)


def _order(aging_s: float) -> list[str]:
    s = Scheduler(SchedulerConfig(priority_aging_s=aging_s, heartbeat_interval_s=100.0))
    s.handle(b"p", PRODUCER, Hello("c1"), 0.0)
    s.handle(b"p", PRODUCER, Submit([TaskSpec("old-low", "f", "default", b"", b"")]), 0.0)
    # high-priority work keeps arriving later
    for t in range(1, 11):
        spec = TaskSpec(f"new-high-{t}", "f", "default", b"", b"", priority=5)
        s.handle(b"p", PRODUCER, Submit([spec]), float(t))
    s.handle(b"w", WORKER, Ready("w", "w", "h", 1, ["default"], 1, 0), 10.0)
    order = []
    for i in range(11):
        s.handle(b"w", WORKER, Credit(1), 10.0 + i)
        for send in s.flush(10.0 + i):
            if isinstance(send.message, Tasks):
                order += [a.task_id for a in send.message.assignments]
    return order


def test_strict_priorities_serve_the_high_ones_first() -> None:
    order = _order(aging_s=0.0)
    assert order[-1] == "old-low"
    assert order[:10] == [f"new-high-{t}" for t in range(1, 11)]


def test_aging_lets_a_long_wait_outrank_a_higher_priority() -> None:
    # one level per second: old-low (waiting since t=0) ties with priority 5 submitted at t=5
    # (the older wins a tie) and outranks everything submitted after
    order = _order(aging_s=1.0)
    assert order[:4] == [f"new-high-{t}" for t in range(1, 5)]
    assert order[4] == "old-low"
    assert order[5:] == [f"new-high-{t}" for t in range(5, 11)]
