"""The broker's decisions as a pure state machine: messages and clock ticks in, sends out.

No sockets, no threads, no wall clock: every entry point takes ``now`` (monotonic seconds), so
queues, credit, liveness, requeues, retries and dedupe are unit-tested by feeding messages with an
explicit clock. The broker shell (``broker.py``) turns frames into ``handle`` calls and the
returned ``Send`` actions into frames.

Delivery rules kept here:
- A worker never receives more tasks than the credit it granted; least-loaded workers first.
- A worker that misses ``heartbeat_liveness`` intervals is dead; each task it held is requeued
  with attempt + 1, or fails with ``WORKER_LOST`` once it has been lost ``max_attempts`` times.
- The first outcome of a task wins; any later one (a worker presumed dead that came back, a
  duplicate resend) is acknowledged to the worker and dropped, so a producer sees one outcome.
- A submit is idempotent by task id: a producer that resends after a lost ack creates no twin.
- Whatever must survive a restart (a submitted task, a requeue, an outcome, a forgotten task) is
  also appended to ``journal``; the shell writes that batch durably before it sends anything, so
  no acknowledgement ever runs ahead of the journal.
- After a restart, recovered tasks wait one liveness period before they are queued again, so
  that workers still running them can re-register (``Ready.held``) and claim them: a broker
  restart does not make a task run twice.
- A task whose arguments refer to other tasks (``TaskSpec.deps``) waits until they have all
  succeeded, then runs with their results; if one fails or is cancelled, it fails with
  ``DEPENDENCY_FAILED`` naming that task (and so on down the chain). A dependency's outcome is
  kept, even once delivered to its producer, until every task that refers to it has finished.
- A periodic task is submitted by the broker itself, once per tick, under a task id derived
  from the tick; the run and the schedule's next tick are journaled together, so a restart
  neither repeats nor loses a tick. Ticks missed while the broker was down are coalesced into
  one run (see ``taskmesh.periodic``).
"""

from __future__ import annotations

import bisect
import dataclasses
import enum
import hashlib
import heapq
import itertools
import logging
import random
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from taskmesh.histogram import Histogram
from taskmesh.journal import FinishedTask, JournalBatch, PendingTask, Recovery, StoredSchedule
from taskmesh.periodic import (
    CronError,
    CronRule,
    check_every,
    format_every,
    latest_tick,
    next_tick,
)
from taskmesh.protocol import (
    PRODUCER,
    WORKER,
    Abort,
    Ack,
    Assignment,
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
    Payload,
    PeriodicTask,
    Ready,
    Reconnect,
    Release,
    Results,
    ResultsAck,
    Schedule,
    Status,
    StatusReply,
    StatusRequest,
    Submit,
    Tasks,
    TaskSpec,
    Unschedule,
    Watch,
    Welcome,
)


class TaskState(enum.StrEnum):
    WAITING = "waiting"  # for the tasks its arguments refer to
    PENDING = "pending"
    DELAYED = "delayed"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({TaskState.DONE, TaskState.FAILED, TaskState.CANCELLED})

# Outcomes of runs that ended by themselves, with a value or an exception, go to their producer
# without waiting for the journal, unless another task depends on them (``_finish``). Were the
# broker to die before committing one, the task would run again (at least once allows that) and
# the producer, which has its outcome already, would drop the second. Outcomes that decide a
# task's fate without a run to show for it (cancelled, lost too often, timed out, a dependency
# failed) wait for the commit: a rerun would contradict them. Sent early, an outcome's DELIVERED
# often comes back before the journal thread has written it, and then the journal writes
# neither (``FinishedTask.hold``, ``JournalBatch.coalesce``).
RAN_OUTCOMES = frozenset({Status.OK, Status.ERROR})


class Route(enum.StrEnum):
    """How the broker picks a worker for a queue's tasks (``taskmesh broker --route Q=S``)."""

    LEAST_LOADED = "least-loaded"  # the worker with the most free credit (the default)
    ROUND_ROBIN = "round-robin"
    RANDOM = "random"
    WEIGHTED = "weighted"  # random, in proportion to each worker's --weight
    KEY = "key"  # consistent hashing on the task's key; tasks without one: least-loaded


class WorkerState(enum.StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(frozen=True, slots=True)
class Send:
    """Send ``message`` to the peer at ROUTER ``address``, speaking ``signature``.

    ``early``: it may leave before the journal has committed its loop iteration's changes
    (see ``RAN_OUTCOMES``); every other send waits for that commit."""

    address: bytes
    signature: bytes
    message: Message
    early: bool = False


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    heartbeat_interval_s: float = 1.0
    heartbeat_liveness: int = 3
    result_ttl_s: float = 3600.0
    recent_failures: int = 20
    retry_backoff_max_s: float = 300.0
    max_message_bytes: int = 0  # announced in Welcome; 0 when unlimited
    routes: tuple[tuple[str, Route], ...] = ()  # (queue, strategy); unnamed queues: least-loaded
    priority_aging_s: float = 0.0  # 0: strict priorities; else one level gained per this wait
    journaled: bool = True  # False (--journal :memory:): build no journal records at all


class TaskRecord:
    """Everything the broker knows of one task. Slotted: there may be a million of them."""

    __slots__ = (
        "attempt",
        "cancel_requested",
        "client_id",
        "entry",
        "errors",
        "lost",
        "outcome",
        "queued_at",
        "seq",
        "spared",
        "spec",
        "started_at",
        "state",
        "submitted_at",
        "waiting",
        "worker_id",
    )

    def __init__(self, spec: TaskSpec, client_id: str, seq: int, now: float) -> None:
        self.spec = spec
        self.client_id = client_id
        self.seq = seq
        self.state = TaskState.PENDING
        self.attempt = 1
        self.errors = 0
        self.lost = 0
        self.worker_id: str | None = None
        self.submitted_at = now
        self.queued_at = now
        self.started_at = 0.0
        self.outcome: Outcome | None = None
        # its live entry in a queue heap (while pending) or in the delayed heap (while delayed)
        self.entry: tuple[float, int, str] | None = None
        self.cancel_requested = False  # terminate asked while running: never run it again
        self.waiting = 0  # dependencies not finished yet (while WAITING)
        self.spared = 0  # requeued uncharged from dead workers that had not started it


class WorkerRecord:
    __slots__ = (
        "address",
        "concurrency",
        "credit",
        "done",
        "draining",
        "failed",
        "host",
        "joined_at",
        "last_seen",
        "name",
        "pid",
        "queues",
        "running",
        "seq",
        "started",
        "weight",
        "worker_id",
    )

    def __init__(self, msg: Ready, address: bytes, seq: int, now: float) -> None:
        self.worker_id = msg.worker_id
        self.address = address
        self.name = msg.name
        self.host = msg.host
        self.pid = msg.pid
        self.queues = tuple(dict.fromkeys(msg.queues))
        self.concurrency = msg.concurrency
        self.credit = msg.credit
        self.running: set[str] = set()
        self.started: set[str] = set()  # of running: said to be handed to an executor
        self.joined_at = now
        self.last_seen = now
        self.done = 0
        self.failed = 0
        self.seq = seq
        self.weight = msg.weight if msg.weight > 0 else 1.0
        self.draining = False  # shutting down: finishing what it runs, taking nothing new


class ProducerRecord:
    __slots__ = ("address", "client_id", "host", "last_seen", "name", "pid")

    def __init__(self, msg: Hello, address: bytes, now: float) -> None:
        self.client_id = msg.client_id
        self.address = address
        self.name = msg.name
        self.host = msg.host
        self.pid = msg.pid
        self.last_seen = now


class ScheduleRecord:
    """A periodic task, its parsed rule and its clock (wall seconds)."""

    __slots__ = ("last_run_at", "last_task_id", "next_at", "periodic", "rule", "runs", "skipped")

    def __init__(self, periodic: PeriodicTask, rule: CronRule | None, next_at: float) -> None:
        self.periodic = periodic
        self.rule = rule
        self.next_at = next_at
        self.runs = 0
        self.skipped = 0
        self.last_run_at: float | None = None
        self.last_task_id = ""

    def stored(self) -> StoredSchedule:
        return StoredSchedule(
            self.periodic,
            self.next_at,
            self.runs,
            self.skipped,
            self.last_run_at,
            self.last_task_id,
        )


class QueueStats:
    __slots__ = (
        "delayed",
        "done",
        "failed",
        "pending",
        "requeued",
        "running",
        "submitted",
        "waiting",
    )

    def __init__(self) -> None:
        self.submitted = 0
        self.waiting = 0
        self.requeued = 0
        self.delayed = 0
        self.pending = 0
        self.running = 0
        self.done = 0
        self.failed = 0


_MAX_CREDIT = 1_000_000
_WORKER_LOST_MRO = (
    "taskmesh.errors.WorkerLost",
    "taskmesh.errors.TaskmeshError",
    "Exception",
    "BaseException",
)
_DEPENDENCY_FAILED_MRO = (
    "taskmesh.errors.DependencyFailed",
    "taskmesh.errors.TaskmeshError",
    "Exception",
    "BaseException",
)
_ROUTED_HEAP = "\0"  # separates a queue's name from a per-task route in a heap's name
#: what a worker may report; WORKER_LOST and UNKNOWN are the broker's own verdicts
_WORKER_STATUSES = frozenset(
    {Status.OK, Status.ERROR, Status.TIMEOUT, Status.LOST, Status.CANCELLED}
)


class Scheduler:
    """The broker's state: tasks, queues, workers, producers; all decisions, no I/O."""

    def __init__(
        self,
        config: SchedulerConfig | None = None,
        broker_id: str = "broker",
        *,
        wall_offset: float = 0.0,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config or SchedulerConfig()
        self.broker_id = broker_id
        self.wall_offset = wall_offset  # wall clock minus monotonic clock, for the journal
        self.rng = rng or random.Random()
        self.journal = JournalBatch()
        self.tasks: dict[str, TaskRecord] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.producers: dict[str, ProducerRecord] = {}
        # ROUTER address -> ("p", client_id) or ("w", worker_id)
        self._peers: dict[bytes, tuple[str, str]] = {}
        # per queue: heap of (-priority, seq, task_id); stale entries are skipped on pop
        self._queues: dict[str, list[tuple[float, int, str]]] = {}
        self._delayed: list[tuple[float, int, str]] = []
        # finished, undelivered tasks in finishing order -> finished_at, for the retention time;
        # a dict, so that a delivery forgets its entry at once and memory stays bounded
        self._retired: dict[str, float] = {}
        self._seq = itertools.count()
        self._worker_seq = itertools.count()
        self.stats: dict[str, QueueStats] = {}
        self.counters = {
            "submitted": 0,
            "done": 0,
            "failed": 0,
            "cancelled": 0,
            "requeued": 0,
            "retried": 0,
            "workers_lost": 0,
            "duplicates_dropped": 0,
            "invalid_outcomes": 0,
            "rate_limited": 0,
        }
        self.recent_failures: list[dict[str, Any]] = []
        self.queue_wait = Histogram()  # from queued (or requeued) to dispatched
        self.run_time = Histogram()  # as the executor measured it
        self.dead_workers: list[dict[str, Any]] = []
        # what flush() turns into batched sends
        self._out_tasks: dict[str, list[Assignment]] = {}
        self._out_outcomes: dict[str, list[Outcome]] = {}
        self._out_ran: dict[str, list[Outcome]] = {}  # outcomes of runs: sent early
        self._out_acks: dict[str, list[str]] = {}
        self._out_results_acks: dict[bytes, list[str]] = {}
        self._dirty = False  # something may be dispatchable
        # lifecycle events for the shell to log: (level, %-format, args); pure data here
        self.notices: list[tuple[int, str, tuple[Any, ...]]] = []
        self.routes: dict[str, Route] = {
            queue: route for queue, route in self.config.routes if route is not Route.LEAST_LOADED
        }
        self._rr: dict[str, int] = {}  # round-robin position per queue
        self._buckets: dict[str, tuple[float, float]] = {}  # task name -> (tokens, refilled at)
        self._rings: dict[str, tuple[frozenset[str], list[tuple[int, str]]]] = {}
        self._immediate: list[Send] = []
        # dependencies: task id -> ids of the tasks waiting for it (stale ids are skipped);
        # task id -> how many unfinished tasks refer to it (its outcome is kept until 0)
        self._dependents: dict[str, list[str]] = {}
        self._pins: dict[str, int] = {}
        self._forget_later: set[str] = set()  # delivered or expired while pinned
        self._settled: list[str] = []  # finished tasks whose dependents are still to be told
        self._settling = False
        self.schedules: dict[str, ScheduleRecord] = {}

    # ------------------------------------------------------------------ entry points

    def handle(self, address: bytes, signature: bytes, msg: Message, now: float) -> list[Send]:
        """Apply one message from the peer at ``address``; return the immediate replies."""
        self._immediate = []
        peer = self._peers.get(address)
        if signature == PRODUCER:
            replies = self._handle_producer(address, peer, msg, now)
        else:
            replies = self._handle_worker(address, peer, msg, now)
        return replies + self._immediate if self._immediate else replies

    def due(self, now: float) -> None:
        """What ``next_deadline`` was for: delayed tasks and periodic ticks now due."""
        self._release_delayed(now)
        self._run_schedules(now)

    def tick(self, now: float) -> list[Send]:
        """Periodic duties: liveness, heartbeats, delayed tasks, retention."""
        sends: list[Send] = []
        deadline = self.config.heartbeat_interval_s * self.config.heartbeat_liveness
        for worker in list(self.workers.values()):
            if now - worker.last_seen > deadline:
                self._worker_died(worker, now, reason="missed heartbeats")
            else:
                sends.append(Send(worker.address, WORKER, Heartbeat()))
        for producer in list(self.producers.values()):
            if now - producer.last_seen > deadline:
                # keep its tasks and outcomes; it gets them after it says hello again
                self._peers.pop(producer.address, None)
                del self.producers[producer.client_id]
            else:
                sends.append(Send(producer.address, PRODUCER, Heartbeat()))
        self.due(now)
        self._expire(now)
        return sends

    def flush(self, now: float) -> list[Send]:
        """Dispatch what can be dispatched and emit every batched send accumulated so far."""
        if self._dirty:
            self._dirty = False
            self._dispatch(now)
        # what someone waits for first (tasks for idle executors, outcomes for futures), then
        # the acknowledgements: each send wakes a thread, and the first ones go out soonest
        sends: list[Send] = []
        for worker_id, assignments in self._out_tasks.items():
            worker = self.workers.get(worker_id)
            if worker is not None:
                sends.append(Send(worker.address, WORKER, Tasks(assignments)))
        for client_id, outcomes in self._out_ran.items():
            producer = self.producers.get(client_id)
            if producer is not None:
                sends.append(Send(producer.address, PRODUCER, Outcomes(outcomes), early=True))
        for client_id, outcomes in self._out_outcomes.items():
            producer = self.producers.get(client_id)
            if producer is not None:
                sends.append(Send(producer.address, PRODUCER, Outcomes(outcomes)))
        for client_id, task_ids in self._out_acks.items():
            producer = self.producers.get(client_id)
            if producer is not None:
                sends.append(Send(producer.address, PRODUCER, Ack(task_ids)))
        for address, task_ids in self._out_results_acks.items():
            sends.append(Send(address, WORKER, ResultsAck(task_ids)))
        self._out_tasks = {}
        self._out_results_acks = {}
        self._out_acks = {}
        self._out_outcomes = {}
        self._out_ran = {}
        return sends

    def next_deadline(self, now: float) -> float | None:
        """When the earliest delayed task or periodic tick becomes due, if any."""
        due = self._delayed[0][0] if self._delayed else None
        if self.schedules:
            tick = min(s.next_at for s in self.schedules.values()) - self.wall_offset
            if tick != float("inf"):
                due = tick if due is None else min(due, tick)
        return due

    # ------------------------------------------------------------------ producers

    def _handle_producer(
        self, address: bytes, peer: tuple[str, str] | None, msg: Message, now: float
    ) -> list[Send]:
        if isinstance(msg, Hello):
            return self._hello(address, msg, now)
        if isinstance(msg, StatusRequest):
            return [Send(address, PRODUCER, StatusReply(self.snapshot(now)))]
        if peer is None or peer[0] != "p":
            if isinstance(msg, Bye):
                return []
            return [Send(address, PRODUCER, Reconnect())]
        producer = self.producers[peer[1]]
        producer.last_seen = now
        if isinstance(msg, Submit):
            self._submit(producer, msg.tasks, now)
        elif isinstance(msg, Cancel):
            self._cancel(msg.task_ids, msg.terminate, now)
        elif isinstance(msg, Watch):
            self._watch(producer, msg.task_ids)
        elif isinstance(msg, Delivered):
            self._delivered(msg.task_ids)
        elif isinstance(msg, Schedule):
            return self._schedule(producer, msg.periodic, now)
        elif isinstance(msg, Unschedule):
            return self._unschedule(producer, msg.names)
        elif isinstance(msg, Bye):
            self._peers.pop(address, None)
            del self.producers[producer.client_id]
        return []

    def _hello(self, address: bytes, msg: Hello, now: float) -> list[Send]:
        old = self.producers.get(msg.client_id)
        if old is not None and old.address != address:
            self._peers.pop(old.address, None)
        self._forget_address(address, now)
        self.producers[msg.client_id] = ProducerRecord(msg, address, now)
        self._peers[address] = ("p", msg.client_id)
        return [Send(address, PRODUCER, self._welcome())]

    def _notice(self, level: int, message: str, *args: Any) -> None:
        self.notices.append((level, message, args))

    def _welcome(self) -> Welcome:
        return Welcome(
            self.broker_id,
            self.config.heartbeat_interval_s,
            self.config.heartbeat_liveness,
            self.config.max_message_bytes,
        )

    def _submit(self, producer: ProducerRecord, specs: Iterable[TaskSpec], now: float) -> None:
        acks = self._out_acks.setdefault(producer.client_id, [])
        for spec in specs:
            acks.append(spec.task_id)
            existing = self.tasks.get(spec.task_id)
            if existing is not None:  # a resend after a lost ack: same task, no twin
                existing.client_id = producer.client_id
                if existing.outcome is not None:
                    self._deliver(existing, existing.outcome)
                continue
            self._add_task(spec, producer.client_id, now)

    def _add_task(self, spec: TaskSpec, client_id: str, now: float) -> None:
        record = TaskRecord(spec, client_id, next(self._seq), now)
        self.tasks[spec.task_id] = record
        self.counters["submitted"] += 1
        self._stats(spec.queue).submitted += 1
        not_before = None
        if spec.countdown_s > 0:
            not_before = now + spec.countdown_s + self.wall_offset
        if self.config.journaled:
            self.journal.submitted.append(
                PendingTask(spec, client_id, record.seq, 0, 0, not_before)
            )
        if spec.deps and self._await_dependencies(record, now):
            return
        self._place(record, now)

    def _place(self, record: TaskRecord, now: float) -> None:
        """Queue a new (or no longer waiting) task, or hold it until its countdown ends."""
        ready_at = record.submitted_at + record.spec.countdown_s
        if ready_at > now:
            self._delay(record, ready_at)
        else:
            self._enqueue(record, now)

    # ------------------------------------------------------------------ dependencies

    def _await_dependencies(self, record: TaskRecord, now: float) -> bool:
        """Hold a task until the tasks its arguments refer to have succeeded. True when it is
        held (WAITING), or already failed because one of them did."""
        task_id = record.spec.task_id
        waiting = 0
        failed: tuple[str, TaskRecord | None] | None = None
        for dep_id in record.spec.deps:
            self._pins[dep_id] = self._pins.get(dep_id, 0) + 1
            dep = self.tasks.get(dep_id) if dep_id != task_id else None
            if dep is not None and dep.state in TERMINAL and self.config.journaled:
                # this task is about to use that outcome (or fail by it): it must be durable
                # before anything about this task goes out, even if the journal held it back
                self.journal.durable.append(dep.seq)
            if dep is not None and dep.state is TaskState.DONE:
                continue
            if dep is None or dep.state in TERMINAL:
                failed = failed or (dep_id, dep)
                continue
            waiting += 1
            self._dependents.setdefault(dep_id, []).append(task_id)
        if failed is not None:
            self._dependency_failed(record, *failed, now)
            return True
        if waiting:
            record.state = TaskState.WAITING
            record.waiting = waiting
            self.stats[record.spec.queue].waiting += 1
            return True
        return False

    def _dependency_failed(
        self, record: TaskRecord, dep_id: str, dep: TaskRecord | None, now: float
    ) -> None:
        """Fail a task whose dependency did not succeed. The message names that dependency and
        the root cause (carried down a chain in ``ErrorInfo.traceback``), so it stays short
        however long the chain."""
        spec = record.spec
        what = f"task {spec.name} [{spec.task_id}] did not run: its dependency"
        if dep is None:
            cause = (
                f"[{dep_id}] is unknown to the broker (submitted elsewhere, or its "
                "outcome was delivered and forgotten before this task arrived)"
            )
            message = f"{what} {cause}"
        elif dep.state is TaskState.CANCELLED:
            cause = f"{dep.spec.name} [{dep_id}] was cancelled"
            message = f"{what} {cause}"
        else:
            error = dep.outcome.error if dep.outcome is not None else None
            if dep.outcome is not None and dep.outcome.status is Status.DEPENDENCY_FAILED:
                cause = error.traceback if error is not None else ""
                message = (
                    f"{what} {dep.spec.name} [{dep_id}] did not run either; root cause: {cause}"
                )
            else:
                reason = f": {error.type_name}: {error.message[:300]}" if error is not None else ""
                cause = f"{dep.spec.name} [{dep_id}] failed{reason}"
                message = f"{what} {cause}"
        info = ErrorInfo("taskmesh.errors.DependencyFailed", message, cause, _DEPENDENCY_FAILED_MRO)
        outcome = Outcome(spec.task_id, Status.DEPENDENCY_FAILED, b"", info)
        self._finish(record, outcome, TaskState.FAILED, now)

    def _tell_dependents(self, now: float) -> None:
        """Release or fail the tasks waiting for the tasks just finished. A worklist, not
        recursion: failing one task may fail a long chain behind it."""
        if self._settling:
            return
        self._settling = True
        try:
            while self._settled:
                dep = self.tasks.get(self._settled.pop())
                if dep is None:
                    continue
                for task_id in self._dependents.pop(dep.spec.task_id, ()):
                    record = self.tasks.get(task_id)
                    if record is None or record.state is not TaskState.WAITING:
                        continue  # cancelled or failed already
                    if dep.state is TaskState.DONE:
                        record.waiting -= 1
                        if record.waiting == 0:
                            self._leave_state(record)
                            self._place(record, now)
                    else:
                        self._leave_state(record)
                        self._dependency_failed(record, dep.spec.task_id, dep, now)
        finally:
            self._settling = False

    def _unpin(self, dep_ids: Iterable[str]) -> None:
        """A task that referred to these has finished: forget those already delivered."""
        for dep_id in dep_ids:
            left = self._pins.get(dep_id, 0) - 1
            if left > 0:
                self._pins[dep_id] = left
                continue
            self._pins.pop(dep_id, None)
            if dep_id in self._forget_later:
                self._forget_later.discard(dep_id)
                self._forget(dep_id)

    def _forget(self, task_id: str) -> None:
        """Drop a finished task (the journal too), unless a waiting task still needs it."""
        self._retired.pop(task_id, None)
        if task_id in self._pins:
            self._forget_later.add(task_id)
            return
        record = self.tasks.get(task_id)
        if record is not None and record.state in TERMINAL:
            del self.tasks[task_id]
            if self.config.journaled:
                self.journal.forgotten.append(record.seq)

    # ------------------------------------------------------------------ periodic tasks

    def _schedule(
        self, producer: ProducerRecord, periodic: Iterable[PeriodicTask], now: float
    ) -> list[Send]:
        replies: list[Send] = []
        acks = self._out_acks.setdefault(producer.client_id, [])
        for item in periodic:
            ack_id = f"schedule:{item.name}"
            try:
                self._add_schedule(item, now)
            except (CronError, ValueError, OverflowError) as exc:
                error = Error("bad-schedule", str(exc), [ack_id])
                replies.append(Send(producer.address, PRODUCER, error))
                continue
            acks.append(ack_id)
        return replies

    def _add_schedule(self, item: PeriodicTask, now: float) -> None:
        """Check everything first, then store: a refused schedule leaves no trace."""
        rule = CronRule.parse(item.cron) if item.cron is not None else None
        if item.every_s is not None:
            check_every(item.every_s)
        if item.template.deps:
            raise ValueError("a periodic task cannot depend on other tasks")
        text = _rule_text(item)
        old = self.schedules.get(item.name)
        if old is not None and (old.periodic.every_s, old.periodic.cron) == (
            item.every_s,
            item.cron,
        ):
            old.periodic = item  # a new function or options; the clock goes on
            self.journal.schedules.append((item.name, old.stored()))
            return
        first = next_tick(item.every_s, rule, now + self.wall_offset)
        if first is None:
            raise ValueError(f"{text} has no next tick")
        record = self.schedules[item.name] = ScheduleRecord(item, rule, first)
        self.journal.schedules.append((item.name, record.stored()))
        self._notice(logging.INFO, "periodic task %s scheduled (%s)", item.name, text)

    def _unschedule(self, producer: ProducerRecord, names: Iterable[str]) -> list[Send]:
        acks = self._out_acks.setdefault(producer.client_id, [])
        unknown = []
        for name in names:
            if self.schedules.pop(name, None) is None:
                unknown.append(f"schedule:{name}")
                continue
            self.journal.schedules.append((name, None))
            self._notice(logging.INFO, "periodic task %s removed", name)
            acks.append(f"schedule:{name}")
        if not unknown:
            return []
        message = f"no periodic task named {', '.join(n[9:] for n in unknown)}"
        return [Send(producer.address, PRODUCER, Error("unknown-schedule", message, unknown))]

    def _run_schedules(self, now: float) -> None:
        """Submit a run for each periodic task whose tick has come: one run, for the latest
        tick passed, however many passed while the broker was down."""
        wall = now + self.wall_offset
        for record in list(self.schedules.values()):
            if record.next_at > wall:
                continue
            try:
                self._run_schedule(record, now, wall)
            except Exception as exc:  # a bad rule must not stop the others, nor the broker
                self._notice(
                    logging.ERROR,
                    "periodic task %s: %s; retrying in an hour",
                    record.periodic.name,
                    exc,
                )
                record.next_at = wall + 3600.0

    def _run_schedule(self, record: ScheduleRecord, now: float, wall: float) -> None:
        periodic = record.periodic
        tick_at, skipped = latest_tick(periodic.every_s, record.rule, record.next_at, wall)
        following = next_tick(periodic.every_s, record.rule, wall)
        task_id = f"periodic:{periodic.name}:{round(tick_at * 1000)}"
        if task_id not in self.tasks:
            spec = _with_task_id(periodic.template, task_id)
            self._add_task(spec, "", now)
            record.runs += 1
        if skipped:
            record.skipped += skipped
            self._notice(
                logging.WARNING,
                "periodic task %s: %d tick(s) passed while the broker was down or busy; "
                "ran once, for the latest",
                periodic.name,
                skipped + 1,
            )
        record.last_run_at = tick_at
        record.last_task_id = task_id
        record.next_at = following if following is not None else float("inf")
        self.journal.schedules.append((periodic.name, record.stored()))

    def _cancel(self, task_ids: Iterable[str], terminate: bool, now: float) -> None:
        aborts: dict[str, list[str]] = {}
        gentle: dict[str, list[str]] = {}
        for task_id in task_ids:
            record = self.tasks.get(task_id)
            if record is None or record.state in TERMINAL:
                continue
            if record.state is TaskState.RUNNING:
                worker = self.workers.get(record.worker_id or "")
                if worker is None:
                    continue
                if terminate:
                    record.cancel_requested = True
                    aborts.setdefault(worker.worker_id, []).append(task_id)
                elif task_id not in worker.started:
                    # sent ahead to a busy worker and not started there: it can still be
                    # dropped, so cancel means the same whether it waits here or there. Marked,
                    # so that a requeue (drain, death, reconnect) cancels it instead
                    record.cancel_requested = True
                    gentle.setdefault(worker.worker_id, []).append(task_id)
                continue
            self._leave_state(record)
            self._finish(record, Outcome(task_id, Status.CANCELLED), TaskState.CANCELLED, now)
        for worker_id, ids in aborts.items():
            worker = self.workers.get(worker_id)
            if worker is not None:
                self._immediate.append(Send(worker.address, WORKER, Abort(ids)))
        for worker_id, ids in gentle.items():
            worker = self.workers.get(worker_id)
            if worker is not None:
                self._immediate.append(Send(worker.address, WORKER, Abort(ids, terminate=False)))

    def _delivered(self, task_ids: Iterable[str]) -> None:
        """The producer has these outcomes: forget the tasks (the journal too)."""
        for task_id in task_ids:
            record = self.tasks.get(task_id)
            if record is not None and record.state in TERMINAL:
                self._forget(task_id)

    def _watch(self, producer: ProducerRecord, task_ids: Iterable[str]) -> None:
        for task_id in task_ids:
            record = self.tasks.get(task_id)
            if record is None:
                unknown = Outcome(task_id, Status.UNKNOWN)
                self._out_outcomes.setdefault(producer.client_id, []).append(unknown)
                continue
            record.client_id = producer.client_id
            if record.outcome is not None:
                self._deliver(record, record.outcome)

    # ------------------------------------------------------------------ workers

    def _handle_worker(
        self, address: bytes, peer: tuple[str, str] | None, msg: Message, now: float
    ) -> list[Send]:
        if isinstance(msg, Ready):
            return self._ready(address, msg, now)
        if peer is None or peer[0] != "w":
            return [] if isinstance(msg, Disconnect) else [Send(address, WORKER, Reconnect())]
        worker = self.workers[peer[1]]
        worker.last_seen = now
        if isinstance(msg, Credit):
            return self._grant(worker, msg.n)
        if isinstance(msg, Results):
            self._results(worker, msg.outcomes, now)
            if msg.started:
                worker.started.update(t for t in msg.started if t in worker.running)
            return self._grant(worker, msg.credit)
        if isinstance(msg, Release):
            self._release(worker, msg.task_ids, now)
        elif isinstance(msg, Disconnect):
            self._worker_left(worker, now)
        return []

    def _ready(self, address: bytes, msg: Ready, now: float) -> list[Send]:
        if msg.concurrency < 1 or not 0 <= msg.credit <= _MAX_CREDIT or not msg.queues:
            return [
                Send(address, WORKER, Error("bad-ready", "invalid concurrency, credit or queues"))
            ]
        held = set(msg.held)
        worker = self.workers.get(msg.worker_id)
        if worker is not None and worker.address == address:
            # a repeat on the same socket (it answered several Reconnects): tasks sent since the
            # first Ready are still on their way, and its credit already counts them
            worker.last_seen = now
            for task_id in held:
                self._claim(task_id, worker, now)
            return [Send(address, WORKER, self._welcome())]
        if worker is not None:
            # the same live worker on a fresh socket: what it still holds is still its own;
            # what it does not hold was sent to its old socket and lost: queue it again
            self._peers.pop(worker.address, None)
            worker.address = address
            worker.credit = msg.credit
            worker.last_seen = now
            worker.queues = tuple(dict.fromkeys(msg.queues))
            for task_id in worker.running - held:
                record = self.tasks.get(task_id)
                if record is not None and record.state is TaskState.RUNNING:
                    self._requeue_uncharged(record, now)
        else:
            self._forget_address(address, now)
            worker = WorkerRecord(msg, address, next(self._worker_seq), now)
            self.workers[msg.worker_id] = worker
            self._notice(
                logging.INFO,
                "worker %s joined (host %s, pid %d, %d slots, queues %s)",
                worker.name,
                worker.host,
                worker.pid,
                worker.concurrency,
                ",".join(worker.queues),
            )
        for task_id in held:
            self._claim(task_id, worker, now)
        self._peers[address] = ("w", msg.worker_id)
        self._dirty = True
        return [Send(address, WORKER, self._welcome())]

    def _claim(self, task_id: str, worker: WorkerRecord, now: float) -> None:
        """A (re)registering worker still holds this task: let it finish there, not run twice."""
        record = self.tasks.get(task_id)
        if record is None or record.state not in (TaskState.PENDING, TaskState.DELAYED):
            return
        self._leave_state(record)
        self.stats[record.spec.queue].running += 1
        record.state = TaskState.RUNNING
        record.worker_id = worker.worker_id
        record.started_at = now
        worker.running.add(task_id)
        if record.cancel_requested:  # its ABORT may have gone down with the old connection
            self._immediate.append(Send(worker.address, WORKER, Abort([task_id], terminate=False)))

    def _grant(self, worker: WorkerRecord, n: int) -> list[Send]:
        if n < 0 or worker.credit + n > _MAX_CREDIT:
            return [Send(worker.address, WORKER, Error("bad-credit", f"invalid credit {n}"))]
        if n and not worker.draining:
            worker.credit += n
            self._dirty = True
        return []

    def _results(self, worker: WorkerRecord, outcomes: list[Outcome], now: float) -> None:
        if not outcomes:
            return  # only start reports or credit: nothing to acknowledge
        acks = self._out_results_acks.setdefault(worker.address, [])
        for outcome in outcomes:
            acks.append(outcome.task_id)
            if outcome.status not in _WORKER_STATUSES:
                self.counters["invalid_outcomes"] += 1
                continue
            worker.running.discard(outcome.task_id)
            worker.started.discard(outcome.task_id)
            record = self.tasks.get(outcome.task_id)
            if record is None or record.state in TERMINAL:
                self.counters["duplicates_dropped"] += 1
                continue
            current = record.state is TaskState.RUNNING and record.worker_id == worker.worker_id
            if not current and outcome.status is not Status.OK:
                # a stale run (its worker was presumed dead) failed: the live run decides
                self.counters["duplicates_dropped"] += 1
                continue
            if outcome.status is Status.LOST:
                self._lost(record, now, f"its executor on {worker.name} died")
                continue
            # a late success from a worker presumed dead still counts: first outcome wins
            self._leave_state(record)
            self._outcome(record, outcome, worker, now)

    def _outcome(
        self, record: TaskRecord, outcome: Outcome, worker: WorkerRecord, now: float
    ) -> None:
        spec = record.spec
        self.run_time.observe(outcome.run_s)
        if outcome.status is Status.OK:
            worker.done += 1
            self._finish(
                record,
                Outcome(spec.task_id, Status.OK, outcome.value, None, outcome.run_s),
                TaskState.DONE,
                now,
            )
            return
        if (
            outcome.status in (Status.ERROR, Status.TIMEOUT)
            and record.errors < spec.retries
            and _retryable(spec, outcome.error)
        ):
            record.errors += 1
            record.attempt += 1
            self.counters["retried"] += 1
            self._requeue(record, now, self._backoff(spec, record.errors))
            return
        if outcome.status is Status.CANCELLED:  # stopped on request: nobody failed
            state = TaskState.CANCELLED
        else:
            worker.failed += 1
            state = TaskState.FAILED
        final = Outcome(spec.task_id, outcome.status, outcome.value, outcome.error, outcome.run_s)
        self._finish(record, final, state, now, worker_name=worker.name)

    def _release(self, worker: WorkerRecord, task_ids: Iterable[str], now: float) -> None:
        """A draining worker gives back what it has not started; it gets no more work."""
        if not worker.draining:
            self._notice(logging.INFO, "worker %s is draining", worker.name)
        worker.draining = True
        worker.credit = 0
        self._dirty = True
        for task_id in task_ids:
            record = self.tasks.get(task_id)
            if (
                record is not None
                and record.state is TaskState.RUNNING
                and record.worker_id == worker.worker_id
            ):
                self._requeue_uncharged(record, now)

    def _worker_left(self, worker: WorkerRecord, now: float) -> None:
        """A clean goodbye: requeue what it held without charging an attempt."""
        for task_id in list(worker.running):
            record = self.tasks.get(task_id)
            if record is None or record.state is not TaskState.RUNNING:
                continue
            if record.worker_id == worker.worker_id:
                self._requeue_uncharged(record, now)
        self._notice(logging.INFO, "worker %s left", worker.name)
        self._remove_worker(worker, now, "left")

    def _worker_died(self, worker: WorkerRecord, now: float, reason: str) -> None:
        self.counters["workers_lost"] += 1
        self._notice(
            logging.WARNING,
            "worker %s declared dead (%s); requeueing its %d tasks",
            worker.name,
            reason,
            len(worker.running),
        )
        for task_id in list(worker.running):
            record = self.tasks.get(task_id)
            if (
                record is None
                or record.state is not TaskState.RUNNING
                or record.worker_id != worker.worker_id
            ):
                continue
            if task_id in worker.started or record.spared >= record.spec.max_attempts:
                self._lost(record, now, f"worker {worker.name} died ({reason})")
            else:
                # it waited in the worker and never reached an executor: not its fault. (A
                # start said just before the node died may not have got out: hence the bound.)
                record.spared += 1
                self._requeue_uncharged(record, now)
        self._remove_worker(worker, now, reason)

    def _remove_worker(self, worker: WorkerRecord, now: float, reason: str) -> None:
        self._dirty = True  # tasks that waited for this worker (key affinity) go elsewhere now
        self._peers.pop(worker.address, None)
        self.workers.pop(worker.worker_id, None)
        self._out_tasks.pop(worker.worker_id, None)
        self.dead_workers.append(
            {"name": worker.name, "host": worker.host, "pid": worker.pid, "reason": reason}
        )
        del self.dead_workers[: -self.config.recent_failures]

    def _lost(self, record: TaskRecord, now: float, why: str) -> None:
        """The run was lost to a dead worker or executor: requeue, or stop a poison task."""
        self._leave_state(record)
        if self._cancelled_instead(record, now):
            return
        record.lost += 1
        if record.lost >= record.spec.max_attempts:
            message = (
                f"task {record.spec.name} [{record.spec.task_id}] was lost {record.lost} times "
                f"(max_attempts={record.spec.max_attempts}); last: {why}"
            )
            info = ErrorInfo("taskmesh.errors.WorkerLost", message, "", _WORKER_LOST_MRO)
            self._notice(
                logging.WARNING,
                "task %s [%s] failed: %s",
                record.spec.name,
                record.spec.task_id,
                message,
            )
            outcome = Outcome(record.spec.task_id, Status.WORKER_LOST, b"", info)
            self._finish(record, outcome, TaskState.FAILED, now)
            return
        record.attempt += 1
        self.counters["requeued"] += 1
        self.stats[record.spec.queue].requeued += 1
        self._notice(
            logging.INFO,
            "task %s [%s] requeued (attempt %d): %s",
            record.spec.name,
            record.spec.task_id,
            record.attempt,
            why,
        )
        self._requeue(record, now, 0.0)

    def _cancelled_instead(self, record: TaskRecord, now: float) -> bool:
        """A task whose cancel was asked while it ran is finished as cancelled, not rerun."""
        if not record.cancel_requested:
            return False
        self._finish(
            record, Outcome(record.spec.task_id, Status.CANCELLED), TaskState.CANCELLED, now
        )
        return True

    def _requeue_uncharged(self, record: TaskRecord, now: float) -> None:
        """Its run was interrupted through no fault of the task's: queue it again for free."""
        self._leave_state(record)
        if not self._cancelled_instead(record, now):
            self.counters["requeued"] += 1
            self.stats[record.spec.queue].requeued += 1
            self._enqueue(record, now)

    def _backoff(self, spec: TaskSpec, errors: int) -> float:
        """Exponential backoff with jitter: base * 2^(n-1) * U(0.5, 1.5), capped."""
        if spec.retry_backoff_s <= 0:
            return 0.0
        delay = spec.retry_backoff_s * 2 ** (errors - 1) * self.rng.uniform(0.5, 1.5)
        return float(min(delay, self.config.retry_backoff_max_s))

    def _requeue(self, record: TaskRecord, now: float, delay_s: float) -> None:
        """Queue a task again (now, or after ``delay_s``) and journal its spent budgets."""
        not_before = None
        if delay_s > 0:
            not_before = now + delay_s + self.wall_offset
            self._delay(record, now + delay_s)
        else:
            self._enqueue(record, now)
        if self.config.journaled:
            self.journal.requeued.append((record.seq, record.lost, record.errors, not_before))

    # ------------------------------------------------------------------ task lifecycle

    def _stats(self, queue: str) -> QueueStats:
        stats = self.stats.get(queue)
        if stats is None:
            stats = self.stats[queue] = QueueStats()
        return stats

    def _enqueue(self, record: TaskRecord, now: float) -> None:
        record.state = TaskState.PENDING
        record.worker_id = None
        record.queued_at = now
        spec = record.spec
        name = spec.queue if spec.route is None else self._routed_heap(spec.queue, spec.route)
        heap = self._queues.get(name)
        if heap is None:
            heap = self._queues[name] = []
        aging = self.config.priority_aging_s
        # with aging, a fixed key still: a task that has waited `aging` seconds longer than
        # another is worth one priority level more, so low priorities are never starved
        rank = record.submitted_at - spec.priority * aging if aging > 0 else float(-spec.priority)
        entry = (rank, record.seq, spec.task_id)
        record.entry = entry
        heapq.heappush(heap, entry)
        self.stats[spec.queue].pending += 1
        self._dirty = True

    def _routed_heap(self, queue: str, route_name: str) -> str:
        """The heap of a queue's tasks that asked for a route of their own (``_route=``):
        dispatched by that strategy among the queue's workers."""
        try:
            route = Route(route_name)
        except ValueError:
            return queue  # an unknown strategy: the queue's own (producers check names)
        if self.routes.get(queue, Route.LEAST_LOADED) is route:
            return queue
        name = f"{queue}{_ROUTED_HEAP}{route}"
        self.routes.setdefault(name, route)
        return name

    def _delay(self, record: TaskRecord, ready_at: float) -> None:
        record.state = TaskState.DELAYED
        record.worker_id = None
        entry = (ready_at, record.seq, record.spec.task_id)
        record.entry = entry
        heapq.heappush(self._delayed, entry)
        self.stats[record.spec.queue].delayed += 1

    def _leave_state(self, record: TaskRecord) -> None:
        """Take a task out of its pending, delayed or running bookkeeping (stats, heaps)."""
        if record.state is TaskState.RUNNING:
            self.stats[record.spec.queue].running -= 1
            worker = self.workers.get(record.worker_id or "")
            if worker is not None:
                worker.running.discard(record.spec.task_id)
                worker.started.discard(record.spec.task_id)
        elif record.state is TaskState.PENDING:
            self.stats[record.spec.queue].pending -= 1
            record.entry = None
        elif record.state is TaskState.DELAYED:
            self.stats[record.spec.queue].delayed -= 1
            record.entry = None
        elif record.state is TaskState.WAITING:
            self.stats[record.spec.queue].waiting -= 1

    def _finish(
        self,
        record: TaskRecord,
        outcome: Outcome,
        state: TaskState,
        now: float,
        worker_name: str = "",
    ) -> None:
        record.state = state
        record.outcome = outcome
        # the payload is no longer needed: keep only the outcome for redelivery
        record.spec = _strip_payload(record.spec)
        stats = self.stats[record.spec.queue]
        if state is TaskState.DONE:
            stats.done += 1
            self.counters["done"] += 1
        elif state is TaskState.CANCELLED:
            self.counters["cancelled"] += 1
        else:
            stats.failed += 1
            self.counters["failed"] += 1
            error = outcome.error
            self.recent_failures.append(
                {
                    "task_id": record.spec.task_id,
                    "name": record.spec.name,
                    "type": error.type_name if error else outcome.status.name,
                    "message": (error.message if error else "")[:200],
                    "worker": worker_name,
                    "at": round(now + self.wall_offset, 3),
                }
            )
            del self.recent_failures[: -self.config.recent_failures]
        task_id = record.spec.task_id
        self._retired[task_id] = now
        # a run's outcome goes out before its commit, and its row may wait, unless a task
        # depends on it: that one must never see a value that a rerun could replace
        early = (
            outcome.status in RAN_OUTCOMES
            and task_id not in self._dependents
            and task_id not in self._pins
        )
        if self.config.journaled:
            self.journal.finished.append(
                FinishedTask(
                    task_id,
                    record.client_id,
                    str(state),
                    outcome,
                    now + self.wall_offset,
                    record.seq,
                    hold=early,
                )
            )
        self._deliver(record, outcome, early)
        if record.spec.deps:
            self._unpin(record.spec.deps)
        if task_id in self._dependents:
            self._settled.append(task_id)
            self._tell_dependents(now)

    def _deliver(self, record: TaskRecord, outcome: Outcome, early: bool = False) -> None:
        out = self._out_ran if early else self._out_outcomes
        out.setdefault(record.client_id, []).append(outcome)

    def _release_delayed(self, now: float) -> None:
        while self._delayed and self._delayed[0][0] <= now:
            entry = heapq.heappop(self._delayed)
            record = self.tasks.get(entry[2])
            if record is not None and record.entry is entry:
                self._leave_state(record)  # leaves DELAYED
                self._enqueue(record, now)

    def _expire(self, now: float) -> None:
        horizon = now - self.config.result_ttl_s
        expired = []
        for task_id, finished_at in self._retired.items():  # oldest first
            if finished_at > horizon:
                break
            expired.append(task_id)
        for task_id in expired:
            self._forget(task_id)

    def _forget_address(self, address: bytes, now: float) -> None:
        peer = self._peers.pop(address, None)
        if peer is None:
            return
        kind, peer_id = peer
        worker = self.workers.get(peer_id) if kind == "w" else None
        if worker is not None:
            self._worker_left(worker, now)
        elif kind == "p":
            self.producers.pop(peer_id, None)

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, now: float) -> None:
        """Hand pending tasks to workers with credit: routed queues by their strategy, the
        rest least-loaded (most free credit first)."""
        for heap_name, route in list(self.routes.items()):
            if self._queues.get(heap_name):
                self._dispatch_routed(heap_name, route, now)
        routed = self.routes
        candidates = [
            (-w.credit, len(w.running), w.seq, w.worker_id)
            for w in self.workers.values()
            if w.credit > 0
            and any(
                q not in routed and self.stats.get(q) and self.stats[q].pending for q in w.queues
            )
        ]
        heapq.heapify(candidates)
        while candidates:
            _, running, seq, worker_id = heapq.heappop(candidates)
            worker = self.workers[worker_id]
            queues = (
                worker.queues if not routed else tuple(q for q in worker.queues if q not in routed)
            )
            record = self._pop_best(queues, now)
            if record is None:
                continue
            self._start(record, worker, now)
            if worker.credit > 0:
                heapq.heappush(candidates, (-worker.credit, running + 1, seq, worker_id))

    def _dispatch_routed(self, heap_name: str, route: Route, now: float) -> None:
        """Task by task: the strategy picks the worker; a task whose worker has no credit now
        (key affinity) waits, and the tasks behind it go on."""
        queue = heap_name.partition(_ROUTED_HEAP)[0]
        eligible = sorted(
            (w for w in self.workers.values() if queue in w.queues and not w.draining),
            key=lambda w: w.seq,
        )
        parked: list[TaskRecord] = []
        while len(parked) < 1000 and any(w.credit > 0 for w in eligible):
            record = self._pop_best((heap_name,), now)
            if record is None:
                break
            worker = self._choose(heap_name, route, record, eligible)
            if worker is None:
                parked.append(record)
                continue
            self._start(record, worker, now)
        heap = self._queues[heap_name]
        for record in parked:  # still pending, under their old entries
            if record.entry is not None:
                heapq.heappush(heap, record.entry)

    def _choose(
        self, queue: str, route: Route, record: TaskRecord, eligible: list[WorkerRecord]
    ) -> WorkerRecord | None:
        free = [w for w in eligible if w.credit > 0]
        if route is Route.KEY and record.spec.key is not None:
            target = self._ring_lookup(queue, record.spec.key, eligible)
            return target if target is not None and target.credit > 0 else None
        if route is Route.ROUND_ROBIN:
            start = self._rr.get(queue, 0)
            for i in range(len(eligible)):
                worker = eligible[(start + i) % len(eligible)]
                if worker.credit > 0:
                    self._rr[queue] = (start + i + 1) % len(eligible)
                    return worker
            return None
        if route is Route.RANDOM:
            return self.rng.choice(free)
        if route is Route.WEIGHTED:
            return self.rng.choices(free, weights=[w.weight for w in free])[0]
        return max(free, key=lambda w: (w.credit, -len(w.running), -w.seq))

    def _ring_lookup(
        self, queue: str, key: str, eligible: list[WorkerRecord]
    ) -> WorkerRecord | None:
        """Consistent hashing: 64 points per worker name, so a worker joining or leaving moves
        only about 1/N of the keys, and a worker that reconnects keeps its keys."""
        if not eligible:
            return None
        names = frozenset(w.name for w in eligible)
        cached = self._rings.get(queue)
        if cached is None or cached[0] != names:
            ring = sorted((_hash64(f"{name}#{i}"), name) for name in names for i in range(64))
            cached = self._rings[queue] = (names, ring)
        ring = cached[1]
        index = bisect.bisect(ring, (_hash64(key), "")) % len(ring)
        name = ring[index][1]
        return next(w for w in eligible if w.name == name)

    def _pop_best(self, queues: tuple[str, ...], now: float) -> TaskRecord | None:
        """The next task to run from these queues; a rate-limited task without a token now is
        put aside (delayed until its next token) and the search goes on."""
        while True:
            record = self._pop_head(queues)
            if record is None:
                return None
            rate = record.spec.rate_limit
            if rate is None or self._take_token(record, rate, now):
                return record

    def _take_token(self, record: TaskRecord, rate: float, now: float) -> bool:
        """A token bucket per task name, holding at most one second of runs."""
        name = record.spec.name
        tokens, last = self._buckets.get(name, (max(1.0, rate), now))
        tokens = min(max(1.0, rate), tokens + (now - last) * rate)
        if tokens >= 1.0:
            self._buckets[name] = (tokens - 1.0, now)
            return True
        self._buckets[name] = (tokens, now)
        self._leave_state(record)
        self._delay(record, now + (1.0 - tokens) / rate)
        self.counters["rate_limited"] += 1
        return False

    def _pop_head(self, queues: tuple[str, ...]) -> TaskRecord | None:
        best: tuple[float, int, str] | None = None
        best_heap: list[tuple[float, int, str]] | None = None
        for name in queues:
            heap = self._queues.get(name)
            while heap:
                entry = heap[0]
                record = self.tasks.get(entry[2])
                if record is not None and record.entry is entry:
                    break
                heapq.heappop(heap)  # stale: dispatched, cancelled, finished elsewhere, expired
            if heap and (best is None or heap[0] < best):
                best, best_heap = heap[0], heap
        if best is None or best_heap is None:
            return None
        heapq.heappop(best_heap)
        return self.tasks[best[2]]

    def _start(self, record: TaskRecord, worker: WorkerRecord, now: float) -> None:
        spec = record.spec
        stats = self.stats[spec.queue]
        stats.pending -= 1
        stats.running += 1
        record.state = TaskState.RUNNING
        record.entry = None
        record.worker_id = worker.worker_id
        record.started_at = now
        self.queue_wait.observe(now - record.queued_at)
        worker.credit -= 1
        worker.running.add(spec.task_id)
        deps: tuple[tuple[str, Payload], ...] = ()
        if spec.deps:
            deps = tuple(self._dependency_values(spec.deps))
        assignment = Assignment(
            spec.task_id, spec.name, spec.fn, spec.args, record.attempt, spec.timeout_s, deps
        )
        self._out_tasks.setdefault(worker.worker_id, []).append(assignment)

    def _dependency_values(self, dep_ids: Iterable[str]) -> Iterable[tuple[str, Payload]]:
        for dep_id in dict.fromkeys(dep_ids):
            dep = self.tasks.get(dep_id)
            if dep is not None and dep.outcome is not None:  # pinned: always there
                yield dep_id, dep.outcome.value

    # ------------------------------------------------------------------ durability

    def take_journal(self) -> JournalBatch:
        """What changed since the last call; the shell writes it before sending anything."""
        batch, self.journal = self.journal, JournalBatch()
        return batch

    def restore(self, recovery: Recovery, now: float) -> None:
        """Rebuild from the journal after a restart (before any message is handled).

        Unfinished tasks wait two liveness periods (or until their own not-before time) so that
        workers still running them can claim them on re-registration.
        """
        grace = 2 * self.config.heartbeat_interval_s * self.config.heartbeat_liveness
        max_seq = -1
        recovered: list[tuple[TaskRecord, float]] = []
        for item in recovery.pending:
            record = TaskRecord(item.spec, item.client_id, item.seq, now)
            record.lost = item.lost
            record.errors = item.errors
            record.attempt = 1 + item.lost + item.errors
            self.tasks[item.spec.task_id] = record
            self._stats(item.spec.queue)
            ready_at = now + grace
            if item.not_before is not None:
                ready_at = max(ready_at, item.not_before - self.wall_offset)
            recovered.append((record, ready_at))
            max_seq = max(max_seq, item.seq)
        retired: list[tuple[float, str]] = []
        for done in recovery.finished:
            spec = TaskSpec(done.task_id, "", "", b"", b"")
            record = TaskRecord(spec, done.client_id, done.seq, now)
            record.state = TaskState(done.state)
            record.outcome = done.outcome
            self.tasks[done.task_id] = record
            retired.append((done.finished_at - self.wall_offset, done.task_id))
            max_seq = max(max_seq, done.seq)
        self._retired = {task_id: at for at, task_id in sorted(retired)}
        # past every row, readable or not: a skipped row's seq must not be given out again
        self._seq = itertools.count(max(max_seq, recovery.last_seq) + 1)
        # every task is known now: a dependent waits again, or (its grace passed) is queued
        for record, ready_at in recovered:
            if record.state is TaskState.PENDING and not (
                record.spec.deps and self._await_dependencies(record, now)
            ):
                self._delay(record, ready_at)
        for stored in recovery.schedules:
            periodic = stored.periodic
            try:
                rule = CronRule.parse(periodic.cron) if periodic.cron is not None else None
            except CronError:
                continue
            schedule = ScheduleRecord(periodic, rule, stored.next_at)
            schedule.runs, schedule.skipped = stored.runs, stored.skipped
            schedule.last_run_at, schedule.last_task_id = stored.last_run_at, stored.last_task_id
            self.schedules[periodic.name] = schedule
        self.counters["recovered"] = len(recovery.pending)
        self.counters["recovered_outcomes"] = len(recovery.finished)

    # ------------------------------------------------------------------ status

    def _head_wait(self, queue: str, now: float) -> float | None:
        """How long the next task of a queue has waited (None if none or not known cheaply)."""
        heap = self._queues.get(queue)
        if not heap:
            return None
        record = self.tasks.get(heap[0][2])
        if record is None or record.entry is not heap[0]:
            return None
        return round(now - record.queued_at, 3)

    def snapshot(self, now: float) -> dict[str, Any]:
        """Plain data for ``taskmesh status`` and the dashboard: computed from counters."""
        interval = self.config.heartbeat_interval_s
        workers = []
        for w in sorted(self.workers.values(), key=lambda w: w.seq):
            age = now - w.last_seen
            state = WorkerState.ALIVE if age <= interval * 1.5 else WorkerState.SUSPECT
            workers.append(
                {
                    "worker_id": w.worker_id,
                    "name": w.name,
                    "host": w.host,
                    "pid": w.pid,
                    "queues": list(w.queues),
                    "concurrency": w.concurrency,
                    "busy": len(w.running),
                    "credit": w.credit,
                    "done": w.done,
                    "failed": w.failed,
                    "heartbeat_age_s": round(age, 3),
                    "state": "draining" if w.draining else str(state),
                    "running": sorted(
                        self.tasks[t].spec.name for t in w.running if t in self.tasks
                    )[: w.concurrency],
                }
            )
        queues = [
            {
                "name": name,
                "pending": s.pending,
                "head_wait_s": self._head_wait(name, now),
                "delayed": s.delayed,
                "waiting": s.waiting,
                "running": s.running,
                "done": s.done,
                "failed": s.failed,
                "submitted": s.submitted,
                "requeued": s.requeued,
            }
            for name, s in sorted(self.stats.items())
        ]
        return {
            "broker_id": self.broker_id,
            "workers": workers,
            "queues": queues,
            "counters": dict(self.counters),
            "workers_alive": len(self.workers),
            "delayed": sum(s.delayed for s in self.stats.values()),
            # finished tasks whose producer has not confirmed their outcome (DELIVERED) yet
            "undelivered_outcomes": len(self._retired),
            "recent_failures": list(self.recent_failures),
            "latency": {"queue_wait": self.queue_wait.summary(), "run": self.run_time.summary()},
            "dead_workers": list(self.dead_workers),
            "schedules": [
                {
                    "name": name,
                    "task": r.periodic.template.name,
                    "queue": r.periodic.template.queue,
                    "rule": _rule_text(r.periodic),
                    "next_at": r.next_at if r.next_at != float("inf") else None,
                    "last_run_at": r.last_run_at,
                    "last_task_id": r.last_task_id,
                    "last_state": self._state_of(r.last_task_id),
                    "runs": r.runs,
                    "skipped": r.skipped,
                }
                for name, r in sorted(self.schedules.items())
            ],
        }

    def _state_of(self, task_id: str) -> str | None:
        record = self.tasks.get(task_id) if task_id else None
        return None if record is None else str(record.state)


def _strip_payload(spec: TaskSpec) -> TaskSpec:
    return TaskSpec(
        spec.task_id,
        spec.name,
        spec.queue,
        b"",
        b"",
        spec.priority,
        spec.timeout_s,
        spec.retries,
        spec.max_attempts,
        spec.countdown_s,
        spec.key,
        spec.retry_backoff_s,
        spec.retry_on,
        spec.rate_limit,
        spec.deps,
        spec.route,
    )


def _with_task_id(template: TaskSpec, task_id: str) -> TaskSpec:
    return dataclasses.replace(template, task_id=task_id, countdown_s=0.0)


def _rule_text(periodic: PeriodicTask) -> str:
    if periodic.cron is not None:
        return f"cron {periodic.cron}"
    return f"every {format_every(periodic.every_s or 0.0)}"


def _retryable(spec: TaskSpec, error: ErrorInfo | None) -> bool:
    """Whether ``retry_on`` admits this failure (an empty ``retry_on`` admits every one)."""
    if not spec.retry_on:
        return True
    if error is None:
        return False
    names = set(error.mro) | {error.type_name}
    return any(name in names for name in spec.retry_on)


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")
