"""The broker's state machine, driven message by message with an explicit clock."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmesh.journal import PendingTask, Recovery
from taskmesh.protocol import (
    PRODUCER,
    WORKER,
    Abort,
    Ack,
    Bye,
    Cancel,
    Credit,
    Delivered,
    Disconnect,
    Error,
    ErrorInfo,
    Heartbeat,
    Hello,
    Message,
    Outcome,
    Outcomes,
    Ready,
    Reconnect,
    Release,
    Results,
    ResultsAck,
    Status,
    StatusReply,
    StatusRequest,
    Submit,
    Tasks,
    TaskSpec,
    Watch,
    Welcome,
)
from taskmesh.scheduler import Scheduler, SchedulerConfig, Send

pytestmark = pytest.mark.timeout(30)

P1 = b"addr-producer-1"
P2 = b"addr-producer-2"
W1 = b"addr-worker-1"
W2 = b"addr-worker-2"
W3 = b"addr-worker-3"


def spec(
    task_id: str,
    *,
    queue: str = "default",
    priority: int = 0,
    retries: int = 0,
    max_attempts: int = 3,
    countdown_s: float = 0.0,
    timeout_s: float | None = None,
) -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        name=f"fn_{task_id}",
        queue=queue,
        fn=b"fn-" + task_id.encode(),
        args=b"args-" + task_id.encode(),
        priority=priority,
        timeout_s=timeout_s,
        retries=retries,
        max_attempts=max_attempts,
        countdown_s=countdown_s,
    )


def ok(task_id: str, value: bytes = b"result") -> Outcome:
    return Outcome(task_id, Status.OK, value, None, 0.1)


def failed(task_id: str, status: Status = Status.ERROR) -> Outcome:
    info = ErrorInfo("ValueError", f"{task_id} failed", "Traceback...", ("ValueError",))
    return Outcome(task_id, status, b"pickled-exc", info, 0.1)


class Mesh:
    """A scheduler plus a clock, with one method per thing a peer can say.

    Every send the scheduler emits is recorded in ``self.sent`` so a test can look at the whole
    history (for example: a producer never receives two outcomes for one task).
    """

    def __init__(self, **config: Any) -> None:
        self.s = Scheduler(SchedulerConfig(**config), broker_id="broker-test")
        self.now = 0.0
        self.sent: list[Send] = []

    def _record(self, sends: list[Send]) -> list[Send]:
        self.sent.extend(sends)
        return sends

    def producer(self, msg: Message, address: bytes = P1) -> list[Send]:
        return self._record(self.s.handle(address, PRODUCER, msg, self.now))

    def worker(self, msg: Message, address: bytes = W1) -> list[Send]:
        return self._record(self.s.handle(address, WORKER, msg, self.now))

    def hello(self, address: bytes = P1, client_id: str = "client-1") -> list[Send]:
        return self.producer(Hello(client_id, "prod", "host", 1), address)

    def ready(
        self,
        address: bytes = W1,
        worker_id: str = "w1",
        credit: int = 1,
        queues: tuple[str, ...] = ("default",),
    ) -> list[Send]:
        msg = Ready(worker_id, worker_id, "host", 2, list(queues), max(credit, 1), credit)
        return self.worker(msg, address)

    def submit(self, *specs: TaskSpec, address: bytes = P1) -> list[Send]:
        return self.producer(Submit(list(specs)), address)

    def results(self, *outcomes: Outcome, address: bytes = W1, credit: int = 1) -> list[Send]:
        return self.worker(Results(list(outcomes), credit), address)

    def flush(self, start: bool = True) -> list[Send]:
        """Flush; with ``start``, each worker then says it starts what it was sent, as a real
        worker does before handing tasks to its executors (``Results.started``)."""
        sends = self._record(self.s.flush(self.now))
        if start:
            for send in sends:
                if isinstance(send.message, Tasks):
                    ids = [a.task_id for a in send.message.assignments]
                    self.s.handle(send.address, WORKER, Results([], 0, ids), self.now)
        return sends

    def tick(self, now: float) -> list[Send]:
        self.now = now
        return self._record(self.s.tick(now))


def assigned(sends: list[Send], address: bytes = W1) -> list[str]:
    """Task ids sent to the worker at ``address``, in order."""
    return [
        a.task_id
        for s in sends
        if s.address == address and isinstance(s.message, Tasks)
        for a in s.message.assignments
    ]


def attempts(sends: list[Send], address: bytes = W1) -> dict[str, int]:
    return {
        a.task_id: a.attempt
        for s in sends
        if s.address == address and isinstance(s.message, Tasks)
        for a in s.message.assignments
    }


def outcomes(sends: list[Send], address: bytes = P1) -> list[Outcome]:
    return [
        o
        for s in sends
        if s.address == address and isinstance(s.message, Outcomes)
        for o in s.message.outcomes
    ]


def messages(sends: list[Send], kind: type[Any], address: bytes | None = None) -> list[Any]:
    return [
        s.message
        for s in sends
        if isinstance(s.message, kind) and (address is None or s.address == address)
    ]


def queue_stats(s: Scheduler, queue: str = "default") -> dict[str, int]:
    for q in s.snapshot(0.0)["queues"]:
        if q["name"] == queue:
            return {k: q[k] for k in ("pending", "running", "done", "failed")}
    raise AssertionError(f"no queue {queue!r} in the snapshot")


# --------------------------------------------------------------------------- producers


def test_hello_is_welcomed_with_the_heartbeat_rules() -> None:
    m = Mesh(heartbeat_interval_s=0.5, heartbeat_liveness=4)
    sends = m.hello()
    assert sends == [Send(P1, PRODUCER, Welcome("broker-test", 0.5, 4))]


def test_submit_is_acked_in_flush_not_immediately() -> None:
    m = Mesh()
    m.hello()
    assert m.submit(spec("t1"), spec("t2")) == []
    sends = m.flush()
    assert sends == [Send(P1, PRODUCER, Ack(["t1", "t2"]))]
    assert m.flush() == []  # an ack is sent once
    assert m.s.counters["submitted"] == 2


def test_duplicate_submit_creates_no_second_task() -> None:
    m = Mesh()
    m.hello()
    m.submit(spec("t1"))
    m.flush()
    m.submit(spec("t1"))  # a resend after a lost ack
    assert messages(m.flush(), Ack) == [Ack(["t1"])]  # acked again
    assert m.s.counters["submitted"] == 1
    assert list(m.s.tasks) == ["t1"]
    assert queue_stats(m.s) == {"pending": 1, "running": 0, "done": 0, "failed": 0}
    m.ready(credit=5)
    assert assigned(m.flush()) == ["t1"]  # dispatched once


def test_duplicate_submit_of_a_running_task_does_not_requeue_it() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=5)
    m.submit(spec("t1"))
    assert assigned(m.flush()) == ["t1"]
    m.submit(spec("t1"))
    assert assigned(m.flush()) == []
    assert queue_stats(m.s) == {"pending": 0, "running": 1, "done": 0, "failed": 0}


def test_duplicate_submit_of_a_finished_task_redelivers_its_outcome() -> None:
    m = Mesh()
    m.hello()
    m.ready()
    m.submit(spec("t1"))
    m.flush()
    m.results(ok("t1", b"42"))
    assert [o.value for o in outcomes(m.flush())] == [b"42"]
    m.submit(spec("t1"))
    sends = m.flush()
    assert assigned(sends) == []  # not run again
    assert [(o.task_id, o.status, o.value) for o in outcomes(sends)] == [("t1", Status.OK, b"42")]


@pytest.mark.parametrize(
    "msg",
    [Submit([spec("t1")]), Cancel(["t1"]), Watch(["t1"]), Heartbeat()],
    ids=lambda m: type(m).__name__,
)
def test_unknown_producer_gets_reconnect(msg: Message) -> None:
    m = Mesh()
    assert m.producer(msg) == [Send(P1, PRODUCER, Reconnect())]
    assert m.s.tasks == {}
    assert m.flush() == []


@pytest.mark.parametrize(
    "msg",
    [Credit(3), Results([ok("t1")], 1), Heartbeat()],
    ids=lambda m: type(m).__name__,
)
def test_unknown_worker_gets_reconnect(msg: Message) -> None:
    m = Mesh()
    assert m.worker(msg) == [Send(W1, WORKER, Reconnect())]
    assert m.s.workers == {}
    assert m.flush() == []


def test_goodbyes_from_unknown_peers_get_no_answer() -> None:
    m = Mesh()
    assert m.producer(Bye()) == []
    assert m.worker(Disconnect()) == []


def test_a_worker_address_speaking_the_producer_protocol_gets_reconnect() -> None:
    m = Mesh()
    m.ready()
    assert m.producer(Submit([spec("t1")]), W1) == [Send(W1, PRODUCER, Reconnect())]
    assert m.s.tasks == {}


def test_status_request_needs_no_hello() -> None:
    m = Mesh()
    sends = m.producer(StatusRequest(), P2)
    assert len(sends) == 1
    assert sends[0].address == P2
    assert isinstance(sends[0].message, StatusReply)
    assert sends[0].message.snapshot["broker_id"] == "broker-test"


def test_bye_forgets_the_producer() -> None:
    m = Mesh()
    m.hello()
    m.producer(Bye())
    assert m.s.producers == {}
    assert m.submit(spec("t1")) == [Send(P1, PRODUCER, Reconnect())]


# --------------------------------------------------------------------------- dispatch


def test_task_goes_to_a_worker_with_credit_and_its_payload_travels() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=1)
    m.submit(spec("t1", timeout_s=9.0))
    sends = m.flush()
    tasks = messages(sends, Tasks, W1)
    assert len(tasks) == 1
    (a,) = tasks[0].assignments
    assert (a.task_id, a.name, a.fn, a.args, a.attempt, a.timeout_s) == (
        "t1",
        "fn_t1",
        b"fn-t1",
        b"args-t1",
        1,
        9.0,
    )


def test_dispatch_never_exceeds_credit() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=2)
    m.submit(*(spec(f"t{i}") for i in range(6)))
    assert assigned(m.flush()) == ["t0", "t1"]
    assert assigned(m.flush()) == []  # no credit left: nothing more, however often we flush
    m.worker(Credit(1))
    assert assigned(m.flush()) == ["t2"]
    m.results(ok("t0"), ok("t1"), credit=2)  # freed slots come back as credit
    assert assigned(m.flush()) == ["t3", "t4"]
    assert queue_stats(m.s) == {"pending": 1, "running": 3, "done": 2, "failed": 0}


def test_worker_with_zero_credit_gets_nothing() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=0)
    m.submit(spec("t1"))
    assert assigned(m.flush()) == []
    assert queue_stats(m.s)["pending"] == 1


def test_negative_credit_is_refused() -> None:
    m = Mesh()
    m.ready(credit=1)
    sends = m.worker(Credit(-1))
    assert [type(s.message) for s in sends] == [Error]
    assert m.s.workers["w1"].credit == 1


@settings(derandomize=True, database=None, deadline=None, max_examples=150)
@given(
    st.lists(st.integers(0, 4), min_size=1, max_size=3),
    st.lists(
        st.tuples(st.sampled_from(["submit", "credit", "finish"]), st.integers(0, 2)),
        max_size=25,
    ),
)
def test_dispatch_never_exceeds_credit_property(
    initial_credit: list[int], ops: list[tuple[str, int]]
) -> None:
    m = Mesh()
    m.hello()
    addresses = [f"addr-w{i}".encode() for i in range(len(initial_credit))]
    granted = dict(zip(addresses, initial_credit, strict=True))
    for i, (address, credit) in enumerate(zip(addresses, initial_credit, strict=True)):
        m.ready(address, f"w{i}", credit)
    next_task = 0
    for op, arg in ops:
        address = addresses[arg % len(addresses)]
        if op == "submit":
            m.submit(spec(f"t{next_task}"))
            next_task += 1
        elif op == "credit":
            m.worker(Credit(arg), address)
            granted[address] += arg
        else:  # finish one of its running tasks, which gives its slot back
            held = [t for t in assigned(m.sent, address) if m.s.tasks[t].state == "running"]
            if held:
                m.results(ok(held[0]), address=address, credit=1)
                granted[address] += 1
        m.flush()
        for a in addresses:
            total = len(assigned(m.sent, a))
            assert total <= granted[a], f"{a!r} received {total} tasks for {granted[a]} credit"
    # and no task waits while some worker has a free slot
    free = sum(w.credit for w in m.s.workers.values())
    pending = sum(q.pending for q in m.s.stats.values())
    assert free == 0 or pending == 0


def test_least_loaded_worker_first() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=1)
    m.ready(W2, "w2", credit=3)
    m.submit(spec("t1"))
    sends = m.flush()
    assert assigned(sends, W2) == ["t1"]  # the worker with more free slots
    assert assigned(sends, W1) == []


def test_work_is_spread_by_free_credit() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=1)
    m.ready(W2, "w2", credit=3)
    m.submit(*(spec(f"t{i}") for i in range(3)))
    sends = m.flush()
    # w2 (3 free) takes two; then both have 1 free and w1, with nothing running, takes the third
    assert len(assigned(sends, W1)) + len(assigned(sends, W2)) == 3
    assert len(assigned(sends, W1)) == 1
    assert len(assigned(sends, W2)) == 2


def test_equal_credit_goes_to_the_worker_with_fewer_running() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=2)
    m.submit(spec("t1"))
    assert assigned(m.flush(), W1) == ["t1"]
    m.ready(W2, "w2", credit=1)
    # w1 has 1 free slot and 1 running; w2 has 1 free slot and nothing running
    m.submit(spec("t2"))
    sends = m.flush()
    assert assigned(sends, W2) == ["t2"]


def test_priorities_higher_first_fifo_among_equals() -> None:
    m = Mesh()
    m.hello()
    m.submit(
        spec("low-1", priority=0),
        spec("high-1", priority=5),
        spec("mid", priority=1),
        spec("high-2", priority=5),
        spec("low-2", priority=0),
        spec("neg", priority=-3),
    )
    m.ready(credit=1)
    order = assigned(m.flush())
    for _ in range(5):
        m.worker(Credit(1))
        order += assigned(m.flush())
    assert order == ["high-1", "high-2", "mid", "low-1", "low-2", "neg"]


def test_priorities_apply_across_the_queues_a_worker_serves() -> None:
    m = Mesh()
    m.hello()
    m.submit(spec("a-low", queue="a", priority=0), spec("b-high", queue="b", priority=9))
    m.ready(credit=1, queues=("a", "b"))
    assert assigned(m.flush()) == ["b-high"]


def test_named_queue_waits_for_a_worker_that_serves_it() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=5, queues=("default",))
    m.submit(spec("gpu-1", queue="gpu"), spec("d-1"))
    sends = m.flush()
    assert assigned(sends, W1) == ["d-1"]
    assert queue_stats(m.s, "gpu") == {"pending": 1, "running": 0, "done": 0, "failed": 0}
    m.tick(1.0)
    m.worker(Heartbeat())
    assert assigned(m.flush(), W1) == []  # still not for w1
    m.ready(W2, "w2", credit=1, queues=("gpu",))
    sends = m.flush()
    assert assigned(sends, W2) == ["gpu-1"]
    assert assigned(sends, W1) == []
    assert queue_stats(m.s, "gpu")["running"] == 1


# --------------------------------------------------------------------------- outcomes


def test_result_routes_to_the_producer_and_is_acked_to_the_worker() -> None:
    m = Mesh()
    m.hello(P1, "client-1")
    m.hello(P2, "client-2")
    m.ready(credit=2)
    m.submit(spec("t1"), address=P1)
    m.submit(spec("t2"), address=P2)
    m.flush()
    m.results(ok("t2", b"two"), ok("t1", b"one"), credit=2)
    sends = m.flush()
    assert [(o.task_id, o.status, o.value) for o in outcomes(sends, P1)] == [
        ("t1", Status.OK, b"one")
    ]
    assert [(o.task_id, o.status, o.value) for o in outcomes(sends, P2)] == [
        ("t2", Status.OK, b"two")
    ]
    assert messages(sends, ResultsAck, W1) == [ResultsAck(["t2", "t1"])]
    assert m.s.counters["done"] == 2
    assert m.s.workers["w1"].done == 2


def test_a_start_report_alone_gets_no_results_ack_and_outcomes_go_before_acks() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=2)
    m.submit(spec("t1"))
    sends = m.flush()  # the worker reports that it starts t1
    assert messages(sends, ResultsAck) == []
    assert messages(m.flush(), ResultsAck) == []  # nor later: there was nothing to acknowledge
    m.submit(spec("t2"))
    m.results(ok("t1"))
    kinds = [type(s.message).__name__ for s in m.flush()]
    assert kinds.index("Outcomes") < kinds.index("Ack") < kinds.index("ResultsAck")


def test_only_outcomes_of_runs_may_leave_before_the_journal_commit() -> None:
    """A rerun after a broker crash is allowed for a task that ran (at least once); it would
    contradict a cancel, a timeout or a final loss, so those outcomes wait for the journal."""
    m = Mesh()
    m.hello()
    m.ready(credit=3)
    m.submit(spec("ran"), spec("raised"), spec("overran"), spec("waiting"))
    m.flush()
    m.results(ok("ran"), failed("raised"), failed("overran", Status.TIMEOUT), credit=3)
    m.producer(Cancel(["waiting"]))
    sends = m.flush()
    early = {o.task_id: o.status for s in sends if s.early for o in outcomes([s])}
    assert early == {"ran": Status.OK, "raised": Status.ERROR}
    gated = {o.task_id for s in sends if not s.early for o in outcomes([s])}
    assert gated == {"overran", "waiting"}
    assert not any(s.early for s in sends if not isinstance(s.message, Outcomes))


def test_error_with_retries_left_is_requeued_with_the_next_attempt() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=1)
    m.submit(spec("t1", retries=2))
    assert attempts(m.flush()) == {"t1": 1}
    m.results(failed("t1"))
    sends = m.flush()
    assert outcomes(sends) == []  # the producer hears nothing of a retried failure
    assert attempts(sends) == {"t1": 2}
    m.results(failed("t1", Status.ERROR))
    assert attempts(m.flush()) == {"t1": 3}
    m.results(failed("t1"))
    sends = m.flush()
    (final,) = outcomes(sends)
    assert (final.task_id, final.status, final.value) == ("t1", Status.ERROR, b"pickled-exc")
    assert final.error is not None and final.error.message == "t1 failed"
    assert assigned(sends) == []
    assert m.s.counters["retried"] == 2
    assert m.s.counters["failed"] == 1
    assert queue_stats(m.s) == {"pending": 0, "running": 0, "done": 0, "failed": 1}


def test_error_without_retries_fails_at_once() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=1)
    m.submit(spec("t1"))
    m.flush()
    m.results(failed("t1"))
    sends = m.flush()
    assert [o.status for o in outcomes(sends)] == [Status.ERROR]
    assert assigned(sends) == []
    assert m.s.recent_failures[-1]["task_id"] == "t1"
    assert m.s.recent_failures[-1]["type"] == "ValueError"


def test_success_after_a_retry_delivers_one_ok_outcome() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=1)
    m.submit(spec("t1", retries=1))
    m.flush()
    m.results(failed("t1"))
    m.flush()
    m.results(ok("t1", b"finally"))
    m.flush()
    assert [(o.status, o.value) for o in outcomes(m.sent)] == [(Status.OK, b"finally")]


# --------------------------------------------------------------------------- liveness


def test_worker_is_dead_only_after_interval_times_liveness() -> None:
    m = Mesh(heartbeat_interval_s=1.0, heartbeat_liveness=3)
    m.hello()
    m.ready(credit=1)
    m.submit(spec("t1"))
    m.flush()
    sends = m.tick(3.0)  # exactly at the deadline: still alive, and heartbeated
    assert Send(W1, WORKER, Heartbeat()) in sends
    m.producer(Heartbeat())
    assert "w1" in m.s.workers
    m.tick(3.01)
    assert "w1" not in m.s.workers
    assert m.s.counters["workers_lost"] == 1
    assert m.s.dead_workers[-1]["name"] == "w1"


def test_a_heartbeating_worker_stays_alive() -> None:
    m = Mesh(heartbeat_interval_s=1.0, heartbeat_liveness=3)
    m.ready()
    for t in range(1, 20):
        m.now = float(t)
        m.worker(Heartbeat())
        m.tick(float(t) + 0.5)
    assert "w1" in m.s.workers
    assert m.s.counters["workers_lost"] == 0


def test_dead_worker_tasks_are_requeued_with_the_next_attempt() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=2)
    m.submit(spec("t1"), spec("t2"))
    assert attempts(m.flush(), W1) == {"t1": 1, "t2": 1}
    m.now = 2.0
    m.producer(Heartbeat())  # the producer stays alive; only the worker goes quiet
    m.tick(3.5)
    assert queue_stats(m.s) == {"pending": 2, "running": 0, "done": 0, "failed": 0}
    assert m.s.counters["requeued"] == 2
    m.ready(W2, "w2", credit=2)
    sends = m.flush()
    assert attempts(sends, W2) == {"t1": 2, "t2": 2}
    assert outcomes(m.sent) == []


def test_a_dead_worker_charges_only_what_it_had_started() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=3)
    m.submit(spec("running"), spec("waiting-1"), spec("waiting-2"))
    m.flush(start=False)
    # the worker hands one task to an executor; two wait in its backlog (prefetched)
    m.worker(Results([], 0, ["running"]))
    m.now = 2.0
    m.producer(Heartbeat())
    m.tick(3.5)
    records = {t: m.s.tasks[t] for t in ("running", "waiting-1", "waiting-2")}
    assert {t: (r.lost, r.attempt) for t, r in records.items()} == {
        "running": (1, 2),  # charged: it may be what killed the node
        "waiting-1": (0, 1),  # never started there: requeued as it was
        "waiting-2": (0, 1),
    }
    assert queue_stats(m.s)["pending"] == 3


def test_starts_that_never_arrive_cannot_spare_a_task_forever() -> None:
    # a task that kills its node before the start report gets out: spared up to max_attempts
    # times, then charged like any other, so it still ends as WorkerLost
    m = Mesh()
    m.hello()
    m.submit(spec("sneaky", max_attempts=2))
    deaths = 0
    while not outcomes(m.sent):
        address = f"addr-w{deaths}".encode()
        m.ready(address, f"w{deaths}", credit=1)
        assert assigned(m.flush(start=False), address) == ["sneaky"]
        m.now += 5.0
        m.producer(Heartbeat())
        m.tick(m.now)
        m.flush()
        deaths += 1
        assert deaths <= 4
    assert deaths == 4  # 2 spared, then 2 charged
    (outcome,) = outcomes(m.sent)
    assert outcome.status is Status.WORKER_LOST


def test_task_lost_max_attempts_times_fails_with_worker_lost() -> None:
    m = Mesh()
    m.hello()
    m.submit(spec("poison", max_attempts=2))
    m.ready(W1, "w1", credit=1)
    assert attempts(m.flush(), W1) == {"poison": 1}
    m.now = 2.0
    m.producer(Heartbeat())
    m.tick(3.5)  # w1 dies: lost once
    assert outcomes(m.flush()) == []
    m.ready(W2, "w2", credit=1)
    assert attempts(m.flush(), W2) == {"poison": 2}
    m.now = 5.0
    m.producer(Heartbeat())
    m.tick(7.0)  # w2 dies: lost twice
    sends = m.flush()
    (final,) = outcomes(sends)
    assert final.task_id == "poison"
    assert final.status is Status.WORKER_LOST
    assert final.error is not None
    assert "lost 2 times" in final.error.message
    assert "max_attempts=2" in final.error.message
    m.ready(W3, "w3", credit=1)
    assert assigned(m.flush(), W3) == []  # a poison task kills no more workers
    assert queue_stats(m.s) == {"pending": 0, "running": 0, "done": 0, "failed": 1}


def test_executor_lost_counts_against_max_attempts() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=1)
    m.submit(spec("t1", max_attempts=3, retries=5))
    assert attempts(m.flush()) == {"t1": 1}
    m.results(Outcome("t1", Status.LOST))
    assert attempts(m.flush()) == {"t1": 2}
    m.results(Outcome("t1", Status.LOST))
    assert attempts(m.flush()) == {"t1": 3}
    m.results(Outcome("t1", Status.LOST))
    sends = m.flush()
    assert [o.status for o in outcomes(sends)] == [Status.WORKER_LOST]
    assert assigned(sends) == []
    assert m.s.counters["retried"] == 0  # losses do not use the retries budget


def test_executor_loss_and_worker_death_share_one_budget() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=1)
    m.submit(spec("t1", max_attempts=2))
    m.flush()
    m.results(Outcome("t1", Status.LOST), address=W1, credit=0)  # lost once, no slot back
    assert attempts(m.flush(), W1) == {}
    m.ready(W2, "w2", credit=1)
    assert attempts(m.flush(), W2) == {"t1": 2}
    m.now = 2.0
    m.producer(Heartbeat())
    m.worker(Heartbeat(), W1)
    m.tick(4.0)  # w2 (last seen at 0) dies: lost twice
    assert "w2" not in m.s.workers
    assert [o.status for o in outcomes(m.flush())] == [Status.WORKER_LOST]


def test_results_from_a_dead_worker_before_it_re_registers_get_reconnect() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=1)
    m.submit(spec("t1"))
    m.flush()
    m.now = 2.0
    m.producer(Heartbeat())
    m.tick(4.0)
    assert m.results(ok("t1")) == [Send(W1, WORKER, Reconnect())]
    assert outcomes(m.flush()) == []  # not applied until it says Ready again
    m.ready(credit=0)
    m.results(ok("t1"), credit=0)  # the resend after Reconnect is
    assert [o.task_id for o in outcomes(m.flush())] == ["t1"]


def test_late_ok_from_a_worker_declared_dead_is_accepted_without_an_outcome_yet() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=1)
    m.submit(spec("t1"))
    m.flush()
    m.now = 2.0
    m.producer(Heartbeat())
    m.tick(4.0)  # w1 declared dead; t1 requeued
    m.ready(W1, "w1", credit=0)  # w1 comes back (a network partition healed)
    m.results(ok("t1", b"late"), address=W1, credit=0)
    sends = m.flush()
    assert [(o.task_id, o.status, o.value) for o in outcomes(sends)] == [("t1", Status.OK, b"late")]
    assert messages(sends, ResultsAck, W1) == [ResultsAck(["t1"])]
    assert m.s.counters["duplicates_dropped"] == 0
    assert queue_stats(m.s) == {"pending": 0, "running": 0, "done": 1, "failed": 0}
    m.ready(W2, "w2", credit=1)
    assert assigned(m.flush(), W2) == []  # the requeued copy is not run again


def test_late_ok_from_a_worker_declared_dead_is_dropped_once_the_task_has_an_outcome() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=1)
    m.submit(spec("t1"))
    m.flush()
    m.now = 2.0
    m.producer(Heartbeat())
    m.tick(4.0)  # w1 declared dead
    m.now = 4.0
    m.ready(W2, "w2", credit=1)
    assert attempts(m.flush(), W2) == {"t1": 2}
    m.results(ok("t1", b"from-w2"), address=W2)
    m.flush()
    m.ready(W1, "w1", credit=0)
    m.results(ok("t1", b"from-w1"), address=W1, credit=0)
    sends = m.flush()
    assert messages(sends, ResultsAck, W1) == [ResultsAck(["t1"])]  # so w1 stops resending
    assert m.s.counters["duplicates_dropped"] == 1
    assert [(o.task_id, o.value) for o in outcomes(m.sent)] == [("t1", b"from-w2")]
    assert m.s.counters["done"] == 1


def test_late_ok_while_the_task_reruns_elsewhere_gives_one_outcome() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=1)
    m.submit(spec("t1"))
    m.flush()
    m.now = 2.0
    m.producer(Heartbeat())
    m.tick(4.0)  # w1 declared dead
    m.now = 4.0
    m.ready(W2, "w2", credit=1)
    assert assigned(m.flush(), W2) == ["t1"]  # rerunning on w2
    m.ready(W1, "w1", credit=0)
    m.results(ok("t1", b"from-w1"), address=W1, credit=0)  # first outcome wins
    m.flush()
    m.results(ok("t1", b"from-w2"), address=W2)
    m.flush()
    assert [(o.task_id, o.value) for o in outcomes(m.sent)] == [("t1", b"from-w1")]
    assert m.s.counters["duplicates_dropped"] == 1
    assert queue_stats(m.s) == {"pending": 0, "running": 0, "done": 1, "failed": 0}


def test_late_failure_from_a_stale_run_is_dropped() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=1)
    m.submit(spec("t1"))
    m.flush()
    m.now = 2.0
    m.producer(Heartbeat())
    m.tick(4.0)
    m.now = 4.0
    m.ready(W2, "w2", credit=1)
    m.flush()
    m.ready(W1, "w1", credit=0)
    m.results(failed("t1"), address=W1, credit=0)  # the live run on w2 decides
    m.flush()
    assert outcomes(m.sent) == []
    assert m.s.counters["duplicates_dropped"] == 1
    m.results(ok("t1", b"w2"), address=W2)
    m.flush()
    assert [(o.status, o.value) for o in outcomes(m.sent)] == [(Status.OK, b"w2")]


@pytest.mark.parametrize("status", [Status.WORKER_LOST, Status.UNKNOWN])
def test_worker_may_not_report_the_brokers_own_verdicts(status: Status) -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=1)
    m.submit(spec("t1"))
    m.flush()
    m.results(Outcome("t1", status), credit=0)
    sends = m.flush()
    assert outcomes(sends) == []
    assert m.s.counters["invalid_outcomes"] == 1
    m.results(ok("t1", b"real"), credit=0)
    assert [(o.status, o.value) for o in outcomes(m.flush())] == [(Status.OK, b"real")]


def test_an_invalid_outcome_does_not_orphan_the_running_task() -> None:
    # the invalid report is ignored, so t1 is still running on w1: when w1 dies it is requeued
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=1)
    m.submit(spec("t1"))
    m.flush()
    m.results(Outcome("t1", Status.UNKNOWN), address=W1, credit=0)
    m.flush()
    assert m.s.snapshot(0.0)["workers"][0]["busy"] == 1
    m.now = 2.0
    m.producer(Heartbeat())
    m.tick(4.0)  # w1 dies
    m.ready(W2, "w2", credit=1)
    assert attempts(m.flush(), W2) == {"t1": 2}


def test_resent_results_give_one_outcome() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=1)
    m.submit(spec("t1"))
    m.flush()
    m.results(ok("t1", b"v"))
    m.results(ok("t1", b"v"), credit=0)  # the ResultsAck was lost; the worker resends
    m.flush()
    assert len(outcomes(m.sent)) == 1
    assert m.s.counters["duplicates_dropped"] == 1


def test_a_producer_never_sees_two_outcomes_for_one_task_in_a_busy_history() -> None:
    m = Mesh()
    m.hello()
    m.submit(*(spec(f"t{i}", retries=1, max_attempts=2) for i in range(6)))
    m.ready(W1, "w1", credit=6)
    m.flush()
    m.now = 2.0
    m.producer(Heartbeat())
    m.tick(4.0)  # w1 dies with all six
    m.now = 4.0
    m.ready(W2, "w2", credit=6)
    m.flush()
    m.ready(W1, "w1", credit=0)
    m.results(*(ok(f"t{i}", b"w1") for i in range(3)), address=W1, credit=0)
    m.results(failed("t3"), failed("t4"), ok("t0", b"w2"), ok("t5", b"w2"), address=W2)
    m.flush()
    m.results(*(ok(f"t{i}", b"w2") for i in range(6)), address=W2)
    m.flush()
    seen = Counter(o.task_id for o in outcomes(m.sent))
    assert seen == Counter({f"t{i}": 1 for i in range(6)})


# --------------------------------------------------------------------------- cancel


def test_cancel_pending_task_gives_cancelled_and_it_never_runs() -> None:
    m = Mesh()
    m.hello()
    m.submit(spec("t1"), spec("t2"))
    m.flush()
    assert m.producer(Cancel(["t1"])) == []
    sends = m.flush()
    assert [(o.task_id, o.status) for o in outcomes(sends)] == [("t1", Status.CANCELLED)]
    m.ready(credit=5)
    assert assigned(m.flush()) == ["t2"]
    assert m.s.counters["cancelled"] == 1
    assert queue_stats(m.s)["pending"] == 0


def test_cancel_of_an_unknown_or_finished_task_is_ignored() -> None:
    m = Mesh()
    m.hello()
    m.ready()
    m.submit(spec("t1"))
    m.flush()
    m.results(ok("t1"))
    m.flush()
    m.producer(Cancel(["t1", "nope"], terminate=True))
    sends = m.flush()
    assert outcomes(sends) == []
    assert messages(sends, Abort) == []
    assert m.s.counters["cancelled"] == 0


def test_cancel_terminate_of_a_running_task_aborts_it_on_its_worker() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=1)
    m.ready(W2, "w2", credit=1)
    m.submit(spec("t1"))
    sends = m.flush()
    (holder,) = [a for a in (W1, W2) if assigned(sends, a)]
    abort_sends = m.producer(Cancel(["t1"], terminate=True))
    assert abort_sends == [Send(holder, WORKER, Abort(["t1"]))]
    m.results(Outcome("t1", Status.CANCELLED), address=holder)
    sends = m.flush()
    assert [(o.task_id, o.status) for o in outcomes(sends)] == [("t1", Status.CANCELLED)]
    assert m.s.counters["cancelled"] == 1
    # stopped on request: not a failure of the task, nor of the worker that ran it
    assert m.s.counters["failed"] == 0
    assert [w.failed for w in m.s.workers.values()] == [0, 0]


def test_terminated_task_is_not_run_again_when_its_worker_dies_before_confirming() -> None:
    # cancel(terminate=True) promises to stop the task; if the worker dies before it reports
    # CANCELLED, the task must not be requeued and run a second time
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=1)
    m.submit(spec("t1"))
    m.flush()
    m.now = 1.0
    assert m.producer(Cancel(["t1"], terminate=True)) == [Send(W1, WORKER, Abort(["t1"]))]
    m.now = 2.0
    m.producer(Heartbeat())
    m.tick(4.0)  # w1 dies without confirming the abort
    m.ready(W2, "w2", credit=1)
    sends = m.flush()
    assert assigned(sends, W2) == []
    assert [(o.task_id, o.status) for o in outcomes(m.sent)] == [("t1", Status.CANCELLED)]


def test_cancel_without_terminate_leaves_a_running_task_alone() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=1)
    m.submit(spec("t1"))
    m.flush()
    assert m.producer(Cancel(["t1"], terminate=False)) == []
    assert outcomes(m.flush()) == []
    m.results(ok("t1", b"done anyway"))
    assert [o.status for o in outcomes(m.flush())] == [Status.OK]


def test_cancel_without_terminate_drops_a_task_the_worker_has_not_started() -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=2)
    m.submit(spec("t1"), spec("t2"))
    m.flush(start=False)
    m.worker(Results([], 0, ["t1"]))  # t1 reaches an executor; t2 waits in the worker
    assert m.producer(Cancel(["t1", "t2"], terminate=False)) == [
        Send(W1, WORKER, Abort(["t2"], terminate=False))
    ]
    m.results(Outcome("t2", Status.CANCELLED))  # the worker dropped it
    m.results(ok("t1"))
    assert {o.task_id: o.status for o in outcomes(m.flush())} == {
        "t1": Status.OK,
        "t2": Status.CANCELLED,
    }


@pytest.mark.parametrize("then", ["drain", "death", "new socket"])
def test_a_cancel_sent_to_a_worker_survives_the_task_coming_back(then: str) -> None:
    m = Mesh()
    m.hello()
    m.ready(credit=2)
    m.submit(spec("busy"), spec("waiting"))
    m.flush(start=False)
    m.worker(Results([], 0, ["busy"]))
    m.producer(Cancel(["waiting"], terminate=False))  # its ABORT is lost in what follows
    if then == "drain":
        m.worker(Release(["waiting"]))
    elif then == "death":
        m.now = 2.0
        m.producer(Heartbeat())
        m.tick(3.5)
    else:  # the same worker on a new socket, no longer holding it
        m.worker(Ready("w1", "w1", "host", 2, ["default"], 2, 1, ["busy"]), W2)
    m.ready(W3, "w3", credit=5)
    assert "waiting" not in assigned(m.flush(), W3)  # not run elsewhere: cancelled instead
    assert {o.task_id: o.status for o in outcomes(m.sent)} == {"waiting": Status.CANCELLED}


def test_after_a_broker_restart_only_reported_starts_are_charged() -> None:
    m = Mesh()
    recovery = Recovery(
        pending=[
            PendingTask(spec("ran"), "client-1", 0),
            PendingTask(spec("waited"), "client-1", 1),
        ],
        finished=[],
    )
    m.s.restore(recovery, 0.0)
    m.hello()
    # the worker held both across the restart: one in an executor, one in its backlog
    m.worker(Ready("w1", "w1", "host", 2, ["default"], 2, 0, ["ran", "waited"]))
    m.worker(Results([], 0, ["ran"]))  # what a worker says right after registering
    m.now = 2.0
    m.producer(Heartbeat())
    m.tick(3.5)  # it dies
    assert (m.s.tasks["ran"].lost, m.s.tasks["waited"].lost) == (1, 0)


def test_after_a_restart_new_tasks_are_numbered_past_every_journal_row() -> None:
    """Rows the journal could not read still hold their seq: a new task must not take it."""
    m = Mesh()
    m.s.restore(Recovery([PendingTask(spec("old"), "client-1", 3)], [], last_seq=9), 0.0)
    m.hello()
    m.submit(spec("new"))
    assert m.s.tasks["new"].seq == 10


def test_cancel_of_a_delayed_task() -> None:
    m = Mesh(heartbeat_interval_s=100.0)
    m.hello()
    m.ready(credit=1)
    m.submit(spec("t1", countdown_s=5.0))
    m.flush()
    m.producer(Cancel(["t1"]))
    assert [o.status for o in outcomes(m.flush())] == [Status.CANCELLED]
    m.tick(6.0)
    assert assigned(m.flush()) == []


# --------------------------------------------------------------------------- disconnect


def test_disconnect_requeues_without_charging_an_attempt() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=1)
    m.submit(spec("t1", max_attempts=1))
    assert attempts(m.flush(), W1) == {"t1": 1}
    assert m.worker(Disconnect(), W1) == []
    assert "w1" not in m.s.workers
    assert queue_stats(m.s)["pending"] == 1
    m.ready(W2, "w2", credit=1)
    assert attempts(m.flush(), W2) == {"t1": 1}
    m.worker(Disconnect(), W2)  # a second clean exit: max_attempts=1 is not used up
    m.ready(W3, "w3", credit=1)
    assert attempts(m.flush(), W3) == {"t1": 1}
    assert outcomes(m.sent) == []
    assert m.s.counters["workers_lost"] == 0


# --------------------------------------------------------------------------- countdown


def test_countdown_delays_dispatch_until_the_clock_passes_it() -> None:
    m = Mesh(heartbeat_interval_s=100.0)
    m.hello()
    m.ready(credit=2)
    m.submit(spec("later", countdown_s=5.0), spec("now"))
    assert assigned(m.flush()) == ["now"]
    assert m.s.snapshot(0.0)["delayed"] == 1
    assert m.s.next_deadline(0.0) == 5.0
    m.tick(4.99)
    assert assigned(m.flush()) == []
    m.tick(5.0)
    m.now = 5.0
    sends = m.flush()
    assert attempts(sends) == {"later": 1}
    assert m.s.snapshot(5.0)["delayed"] == 0


def test_delayed_tasks_are_acked_at_once() -> None:
    m = Mesh()
    m.hello()
    m.submit(spec("later", countdown_s=60.0))
    assert messages(m.flush(), Ack) == [Ack(["later"])]


def test_cancelled_delayed_task_is_not_counted_as_delayed() -> None:
    m = Mesh(heartbeat_interval_s=100.0)
    m.hello()
    m.submit(spec("later", countdown_s=60.0))
    m.producer(Cancel(["later"]))
    m.flush()
    assert m.s.tasks["later"].state == "cancelled"
    assert m.s.snapshot(1.0)["delayed"] == 0


# --------------------------------------------------------------------------- retention


def test_result_ttl_forgets_finished_tasks() -> None:
    m = Mesh(heartbeat_interval_s=1000.0, result_ttl_s=10.0)
    m.hello()
    m.ready()
    m.submit(spec("t1"))
    m.flush()
    m.now = 1.0
    m.results(ok("t1", b"v"))
    m.flush()
    m.tick(10.5)  # within the TTL: Watch redelivers the outcome
    m.producer(Watch(["t1"]))
    assert [(o.status, o.value) for o in outcomes(m.flush())] == [(Status.OK, b"v")]
    m.tick(11.5)  # past it: forgotten
    assert "t1" not in m.s.tasks
    m.producer(Watch(["t1"]))
    assert [(o.task_id, o.status) for o in outcomes(m.flush())] == [("t1", Status.UNKNOWN)]


def test_result_ttl_keeps_unfinished_tasks() -> None:
    m = Mesh(heartbeat_interval_s=1000.0, result_ttl_s=1.0)
    m.hello()
    m.ready()
    m.submit(spec("running"), spec("pending"))
    m.flush()
    m.tick(500.0)
    assert set(m.s.tasks) == {"running", "pending"}


def test_watch_of_a_pending_task_delivers_its_outcome_later() -> None:
    m = Mesh(heartbeat_interval_s=1000.0)
    m.hello(P1, "client-1")
    m.submit(spec("t1"))
    m.flush()
    m.hello(P2, "client-1")  # the producer reconnected on a new socket
    m.producer(Watch(["t1"]), P2)
    assert outcomes(m.flush(), P2) == []
    m.ready()
    m.flush()
    m.results(ok("t1"))
    sends = m.flush()
    assert [o.task_id for o in outcomes(sends, P2)] == ["t1"]
    assert outcomes(sends, P1) == []


def test_outcome_for_a_silent_producer_is_kept_for_watch() -> None:
    m = Mesh(heartbeat_interval_s=1.0)
    m.hello()
    m.ready()
    m.submit(spec("t1"))
    m.flush()
    m.worker(Heartbeat())
    m.now = 2.0
    m.worker(Heartbeat())
    m.tick(3.5)  # the producer is silent past the deadline: forgotten
    assert m.s.producers == {}
    m.results(ok("t1", b"kept"))
    assert outcomes(m.flush()) == []
    m.hello()
    m.producer(Watch(["t1"]))
    assert [o.value for o in outcomes(m.flush())] == [b"kept"]


# --------------------------------------------------------------------------- status


def test_status_snapshot_counts() -> None:
    m = Mesh(heartbeat_interval_s=1.0)
    m.hello()
    m.ready(W1, "w1", credit=3, queues=("default", "cpu"))
    m.submit(
        spec("ok"),
        spec("bad"),
        spec("busy"),
        spec("wait"),
        spec("cpu-wait", queue="cpu"),
        spec("io-wait", queue="io"),
    )
    sends = m.flush()
    assert sorted(assigned(sends, W1)) == ["bad", "busy", "ok"]
    m.results(ok("ok"), failed("bad"), credit=0)
    m.flush()
    snap = m.s.snapshot(0.5)
    queues = {
        q["name"]: {
            k: v
            for k, v in q.items()
            if k not in ("name", "head_wait_s", "submitted", "requeued", "waiting")
        }
        for q in snap["queues"]
    }
    assert {q["name"]: q["head_wait_s"] for q in snap["queues"]} == {
        "cpu": 0.5,
        "default": 0.5,
        "io": 0.5,
    }
    assert queues == {
        "cpu": {"pending": 1, "delayed": 0, "running": 0, "done": 0, "failed": 0},
        "default": {"pending": 1, "delayed": 0, "running": 1, "done": 1, "failed": 1},
        "io": {"pending": 1, "delayed": 0, "running": 0, "done": 0, "failed": 0},
    }
    assert snap["workers_alive"] == 1
    (w,) = snap["workers"]
    assert w["worker_id"] == "w1"
    assert w["queues"] == ["default", "cpu"]
    assert w["busy"] == 1
    assert w["credit"] == 0
    assert w["done"] == 1
    assert w["failed"] == 1
    assert w["running"] == ["fn_busy"]
    assert w["state"] == "alive"
    assert w["heartbeat_age_s"] == 0.5
    assert snap["counters"]["submitted"] == 6
    assert snap["counters"]["done"] == 1
    assert snap["counters"]["failed"] == 1
    assert snap["recent_failures"][-1]["task_id"] == "bad"


def test_status_snapshot_marks_a_quiet_worker_suspect() -> None:
    m = Mesh(heartbeat_interval_s=1.0)
    m.ready()
    assert m.s.snapshot(1.0)["workers"][0]["state"] == "alive"
    assert m.s.snapshot(2.0)["workers"][0]["state"] == "suspect"


def test_status_snapshot_lists_workers_in_join_order() -> None:
    m = Mesh()
    m.ready(W2, "w2")
    m.ready(W1, "w1")
    m.ready(W3, "w3")
    assert [w["worker_id"] for w in m.s.snapshot(0.0)["workers"]] == ["w2", "w1", "w3"]


def test_ready_with_bad_fields_is_refused() -> None:
    m = Mesh()
    sends = m.worker(Ready("w1", "n", "h", 1, [], 1, 1))  # no queues
    assert [type(s.message) for s in sends] == [Error]
    sends = m.worker(Ready("w1", "n", "h", 1, ["q"], 0, 1))  # no concurrency
    assert [type(s.message) for s in sends] == [Error]
    assert m.s.workers == {}


def test_re_ready_of_a_live_worker_keeps_the_tasks_it_still_holds() -> None:
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=2)
    m.submit(spec("t1"), spec("t2"))
    assert assigned(m.flush(), W1) == ["t1", "t2"]
    # the same worker on a fresh socket: it holds t1; t2 went to the old socket and was lost
    m.worker(Ready("w1", "w1", "host", 2, ["default"], 2, 1, held=["t1"]), W2)
    assert m.s.workers["w1"].address == W2
    assert m.s.workers["w1"].running == {"t1"}
    assert attempts(m.flush(), W2) == {"t2": 1}  # sent again, to the new socket
    m.results(ok("t1"), ok("t2"), address=W2)
    assert sorted(o.task_id for o in outcomes(m.flush())) == ["t1", "t2"]
    assert m.worker(Heartbeat(), W1) == [Send(W1, WORKER, Reconnect())]  # the old address


def test_a_repeated_ready_on_the_same_socket_changes_nothing() -> None:
    # a worker answers two Reconnects with two Readys before the broker has seen either; the
    # tasks dispatched after the first are in flight, so the second must not requeue them
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=2)
    m.submit(spec("t1"), spec("t2"))
    assert assigned(m.flush(), W1) == ["t1", "t2"]
    replies = m.worker(Ready("w1", "w1", "host", 2, ["default"], 2, 2, held=[]), W1)
    assert [type(s.message) for s in replies] == [Welcome]
    assert m.s.workers["w1"].running == {"t1", "t2"}
    assert m.s.workers["w1"].credit == 0  # not reset to the stale figure
    assert assigned(m.flush(), W1) == []
    assert m.s.counters["requeued"] == 0


def test_delivered_outcomes_leave_no_bookkeeping_behind() -> None:
    # at tens of thousands of tasks a second, anything kept per delivered task for the whole
    # retention time would grow without bound
    m = Mesh()
    m.hello()
    m.ready(W1, "w1", credit=100)
    m.submit(*(spec(f"t{i}") for i in range(50)))
    m.flush()
    m.results(*(ok(f"t{i}") for i in range(50)), credit=0)
    m.flush()
    m.s.handle(P1, PRODUCER, Delivered([f"t{i}" for i in range(50)]), 1.0)
    assert not m.s.tasks
    assert not m.s._retired
