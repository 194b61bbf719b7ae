"""Tasks that take other tasks' results: held by the broker until those succeed, failed with
DEPENDENCY_FAILED when one does not, and the dependencies' outcomes kept while needed."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from taskmesh.journal import FinishedTask, PendingTask, Recovery
from taskmesh.protocol import (
    PRODUCER,
    WORKER,
    Assignment,
    Cancel,
    Delivered,
    ErrorInfo,
    Hello,
    Outcome,
    Outcomes,
    Ready,
    Results,
    Status,
    Submit,
    Tasks,
    TaskSpec,
)
from taskmesh.scheduler import Route, Scheduler, SchedulerConfig, Send, TaskState

pytestmark = pytest.mark.timeout(30)

P = b"producer"
W = b"worker"


class Broker:
    def __init__(self, **config: object) -> None:
        self.s = Scheduler(SchedulerConfig(**config), rng=random.Random(3))  # type: ignore[arg-type]
        self.now = 0.0
        self.s.handle(P, PRODUCER, Hello("c1"), self.now)
        self.outcomes: dict[str, Outcome] = {}
        self.assigned: dict[str, Assignment] = {}

    def worker(self, credit: int = 10, address: bytes = W, name: str = "w1") -> None:
        ready = Ready(f"id-{name}", name, "host", 1, ["default"], credit, credit)
        self.s.handle(address, WORKER, ready, self.now)
        self.flush()

    def submit(self, *specs: TaskSpec) -> None:
        self.s.handle(P, PRODUCER, Submit(list(specs)), self.now)
        self.flush()

    def finish(self, *outcomes: Outcome, address: bytes = W) -> None:
        self.s.handle(address, WORKER, Results(list(outcomes), len(outcomes)), self.now)
        self.flush()

    def flush(self) -> list[Send]:
        sends = self.s.flush(self.now)
        for send in sends:
            if isinstance(send.message, Tasks):
                for a in send.message.assignments:
                    self.assigned[a.task_id] = a
                started = [a.task_id for a in send.message.assignments]  # as a worker says
                self.s.handle(send.address, WORKER, Results([], 0, started), self.now)
            if isinstance(send.message, Outcomes):
                for o in send.message.outcomes:
                    assert o.task_id not in self.outcomes, "a second outcome for one task"
                    self.outcomes[o.task_id] = o
        return sends

    def state(self, task_id: str) -> TaskState | None:
        record = self.s.tasks.get(task_id)
        return None if record is None else record.state


def task(task_id: str, *deps: str, route: str | None = None, key: str | None = None) -> TaskSpec:
    return TaskSpec(
        task_id, f"fn_{task_id}", "default", b"f", b"a", deps=deps, route=route, key=key
    )


def ok(task_id: str, value: bytes = b"v") -> Outcome:
    return Outcome(task_id, Status.OK, value + task_id.encode(), None, 0.01)


def error(task_id: str) -> Outcome:
    info = ErrorInfo("ZeroDivisionError", "division by zero", "tb", ("ZeroDivisionError",))
    return Outcome(task_id, Status.ERROR, b"exc", info, 0.01)


def test_a_dependent_waits_then_runs_with_the_results() -> None:
    b = Broker()
    b.worker()
    b.submit(task("a"), task("b"), task("sum", "a", "b"))
    assert set(b.assigned) == {"a", "b"}
    assert b.state("sum") is TaskState.WAITING
    assert b.s.snapshot(0.0)["queues"][0]["waiting"] == 1
    b.finish(ok("a"))
    assert "sum" not in b.assigned  # still one to go
    b.finish(ok("b"))
    assert b.assigned["sum"].deps == (("a", b"va"), ("b", b"vb"))
    assert b.s.snapshot(0.0)["queues"][0]["waiting"] == 0


def test_a_dependency_already_done_does_not_hold_the_task() -> None:
    b = Broker()
    b.worker()
    b.submit(task("a"))
    b.finish(ok("a"))
    b.submit(task("b", "a"))
    assert b.assigned["b"].deps == (("a", b"va"),)


def test_a_failed_dependency_fails_the_whole_chain_naming_the_cause() -> None:
    b = Broker()
    b.worker()
    # a long chain: failing it must not recurse once per link
    b.submit(task("root"), *(task(f"t{i}", "root" if i == 0 else f"t{i - 1}") for i in range(3000)))
    b.finish(error("root"))
    assert len(b.outcomes) == 3001
    first = b.outcomes["t0"]
    assert first.status is Status.DEPENDENCY_FAILED
    assert first.error is not None
    assert first.error.type_name == "taskmesh.errors.DependencyFailed"
    assert "fn_root [root] failed: ZeroDivisionError: division by zero" in first.error.message
    last = b.outcomes["t2999"].error
    assert last is not None and "fn_t2998 [t2998]" in last.message
    # the root cause travels down the chain; the message does not grow with it
    assert "root cause: fn_root [root] failed: ZeroDivisionError" in last.message
    assert len(last.message) < 400
    assert set(b.assigned) == {"root"}  # nothing behind it ever ran
    assert b.s.counters["failed"] == 3001


def test_a_cancelled_dependency_fails_its_dependents() -> None:
    b = Broker()  # no worker: everything stays pending
    b.submit(task("a"), task("b", "a"))
    b.s.handle(P, PRODUCER, Cancel(["a"]), b.now)
    b.flush()
    assert b.outcomes["a"].status is Status.CANCELLED
    err = b.outcomes["b"].error
    assert err is not None and "was cancelled" in err.message


def test_an_unknown_dependency_fails_at_once() -> None:
    b = Broker()
    b.submit(task("b", "nowhere"))
    err = b.outcomes["b"].error
    assert err is not None and "[nowhere] is unknown to the broker" in err.message


def test_a_task_that_depends_on_itself_fails_instead_of_waiting_forever() -> None:
    b = Broker()
    b.submit(task("loop", "loop"))
    assert b.outcomes["loop"].status is Status.DEPENDENCY_FAILED
    assert b.s.tasks["loop"].state is TaskState.FAILED


def test_a_waiting_task_can_be_cancelled_and_lets_its_dependency_go() -> None:
    b = Broker()
    b.worker()
    b.submit(task("a"), task("b", "a"))
    b.s.handle(P, PRODUCER, Cancel(["b"]), b.now)
    b.flush()
    assert b.outcomes["b"].status is Status.CANCELLED
    b.finish(ok("a"))
    b.s.handle(P, PRODUCER, Delivered(["a", "b"]), b.now)
    assert b.s.tasks == {}  # nothing pinned any more
    assert "b" not in b.assigned


def test_a_delivered_dependency_is_kept_until_its_dependents_have_run() -> None:
    b = Broker()
    b.worker(credit=1)
    b.submit(task("a"), task("slow"), task("b", "a", "slow"))
    seq_a = b.s.tasks["a"].seq
    b.finish(ok("a"))  # credit 1 -> slow is dispatched next
    b.s.handle(P, PRODUCER, Delivered(["a"]), b.now)
    assert b.state("a") is TaskState.DONE  # delivered, but b still needs its value
    b.finish(ok("slow"))
    assert b.assigned["b"].deps[0] == ("a", b"va")
    # the worker running b dies: the rerun needs the value again
    b.now = 100.0
    b.s.tick(b.now)
    b.worker(address=b"worker-2", name="w2")
    assert b.assigned["b"].attempt == 2 and b.assigned["b"].deps[0] == ("a", b"va")
    b.finish(ok("b"), address=b"worker-2")
    assert b.state("a") is None  # forgotten once nothing refers to it
    journal = b.s.take_journal()
    assert seq_a in journal.forgotten


def test_a_dependency_expiring_while_pinned_is_kept_until_released() -> None:
    b = Broker(result_ttl_s=10.0)
    b.worker(credit=1)
    b.submit(task("a"), task("slow"), task("b", "a", "slow"))
    b.finish(ok("a"))
    b.now = 50.0
    b.s.handle(W, WORKER, Ready("id-w1", "w1", "host", 1, ["default"], 1, 0, ["slow"]), b.now)
    b.s.tick(b.now)
    assert b.state("a") is TaskState.DONE
    b.finish(ok("slow"))
    b.finish(ok("b"))
    assert b.state("a") is None


def test_dependencies_survive_a_restart() -> None:
    b = Broker()
    b.worker()
    b.submit(task("a"), task("b"), task("c", "a", "b"))
    b.finish(ok("a"))
    journal = b.s.take_journal()
    done = {f.task_id: f for f in journal.finished}
    pending = [t for t in journal.submitted if t.spec.task_id not in done]
    recovery = Recovery(
        pending=[PendingTask(t.spec, t.client_id, t.seq) for t in pending],
        finished=[FinishedTask("a", "c1", "done", done["a"].outcome, 0.0, 0)],
    )
    again = Scheduler(SchedulerConfig())
    again.restore(recovery, 0.0)
    assert again.tasks["c"].state is TaskState.WAITING
    assert again.tasks["b"].state is TaskState.DELAYED
    again.handle(P, PRODUCER, Hello("c1"), 0.0)
    again.handle(W, WORKER, Ready("w", "w", "h", 1, ["default"], 5, 5, ["b"]), 0.0)
    again.handle(W, WORKER, Results([ok("b")], 1), 0.0)
    sends = again.flush(0.0)
    tasks = [a for s in sends if isinstance(s.message, Tasks) for a in s.message.assignments]
    assert [(a.task_id, a.deps) for a in tasks] == [("c", (("a", b"va"), ("b", b"vb")))]


def test_a_task_routes_by_its_own_strategy_within_its_queue() -> None:
    b = Broker()
    for name in ("w1", "w2", "w3"):
        b.worker(credit=100, address=name.encode(), name=name)
    sends: list[Send] = []
    for i in range(90):
        b.s.handle(P, PRODUCER, Submit([task(f"rr{i}", route="round-robin")]), b.now)
        sends += b.flush()
    where = Counter(
        s.address for s in sends if isinstance(s.message, Tasks) for _ in s.message.assignments
    )
    assert sorted(where.values()) == [30, 30, 30]
    # key affinity for some tasks of a least-loaded queue: one key, one worker
    placed = set()
    for i in range(20):
        b.s.handle(P, PRODUCER, Submit([task(f"k{i}", route="key", key="user-42")]), b.now)
        placed |= {s.address for s in b.flush() if isinstance(s.message, Tasks)}
    assert len(placed) == 1
    assert Route("key") in b.s.routes.values()


def test_a_key_routed_task_moves_on_when_its_worker_drains() -> None:
    from taskmesh.protocol import Release

    b = Broker()
    b.worker(credit=1, address=b"w-a", name="a")
    b.worker(credit=1, address=b"w-b", name="b")
    b.submit(task("busy-a"), task("busy-b"))  # both workers full
    b.submit(task("keyed", route="key", key="user-7"))
    assert "keyed" not in b.assigned
    owner = b.s._ring_lookup("default\0key", "user-7", list(b.s.workers.values()))
    assert owner is not None
    other = b"w-b" if owner.name == "a" else b"w-a"
    b.s.handle(owner.address, WORKER, Release([]), b.now)  # the owner drains
    b.flush()
    b.finish(ok("busy-b" if other == b"w-b" else "busy-a"), address=other)
    assert "keyed" in b.assigned  # went to the worker that stays


def test_an_outcome_a_task_waits_for_is_neither_sent_early_nor_held() -> None:
    """Its dependents are sent its value in the same loop iteration: were its row held back,
    a broker dying then would run it again and could record another value than theirs."""
    b = Broker()
    b.worker(credit=2)
    b.submit(task("a"), task("plain"), task("b", "a"))
    b.s.take_journal()
    b.s.handle(W, WORKER, Results([ok("a"), ok("plain")], 2), b.now)
    sends = b.flush()
    early = {o.task_id for s in sends if s.early for o in s.message.outcomes}
    assert early == {"plain"}
    held = {f.task_id: f.hold for f in b.s.take_journal().finished}
    assert held == {"a": False, "plain": True}
    assert b.assigned["b"].deps[0] == ("a", b"va")


def test_a_task_that_needs_a_finished_outcome_asks_for_it_to_be_durable() -> None:
    b = Broker()
    b.worker(credit=1)
    b.submit(task("a"))
    b.finish(ok("a"))
    seq_a = b.s.tasks["a"].seq
    b.s.take_journal()
    b.submit(task("b", "a"))  # its TASKS carry a's value: a's row must be written first
    assert b.s.take_journal().durable == [seq_a]
    assert b.assigned["b"].deps[0] == ("a", b"va")
