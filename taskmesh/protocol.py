"""The taskmesh wire protocol: the only module that knows how messages look on the wire.

Every message is a ZeroMQ multipart message::

    frame 0   signature  b"TMP" or b"TMW" + one version byte (producer or worker protocol)
    frame 1   kind       one byte, a ``Kind`` value
    frame 2   body       msgpack array, the message's fields in declaration order
    frame 3+  blobs      large opaque payloads sent out of band (zero-copy)

A blob (a pickled function, pickled arguments, a pickled result) travels inside the body when
it is small and as its own frame when it is larger than ``INLINE_BLOB_MAX``; in the body it is
then replaced by the frame's index. Arguments and results may also be a ``Pickled``: a pickle
stream and the large buffers it refers to (pickle protocol 5), each buffer its own frame, so
that a 100 MB argument is never copied into a pickle. The broker never unpickles a blob: it
only routes bytes.

This module imports no ZeroMQ: ``encode`` returns a list of bytes-like frames and ``decode``
takes one. ``docs/protocol.md`` describes the protocol in prose.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from sys import intern
from typing import Any, ClassVar, TypeAlias

import msgpack

from taskmesh.errors import ProtocolError

PROTOCOL_VERSION = 2  # 2: dependencies, routes, schedules, start reports, payload arrays
PRODUCER = b"TMP" + bytes([PROTOCOL_VERSION])
WORKER = b"TMW" + bytes([PROTOCOL_VERSION])
SIGNATURES = (PRODUCER, WORKER)

#: Blobs larger than this travel as their own frame instead of inside the msgpack body.
INLINE_BLOB_MAX = 64 * 1024

Blob: TypeAlias = bytes | memoryview
Frame: TypeAlias = bytes | memoryview


@dataclass(frozen=True, slots=True, repr=False)
class Pickled:
    """A pickle stream and the out-of-band buffers it refers to (pickle protocol 5).

    Each buffer travels as a frame of its own, straight from (and into) the memory of the
    object it belongs to, instead of being copied into and out of a single pickle. ``readonly``
    says, per buffer, whether the unpickled object expects immutable memory (a ``bytes``): a
    receiver that must read the buffer from a stream can then read it straight into a ``bytes``.

    ``len()`` is the payload's size in bytes, as for a ``Blob``, so size limits apply alike.
    """

    stream: Blob
    buffers: tuple[Blob, ...] = ()
    readonly: tuple[bool, ...] = ()

    def __len__(self) -> int:
        return len(self.stream) + sum(memoryview(b).nbytes for b in self.buffers)

    def __repr__(self) -> str:  # sizes, not megabytes of content
        sizes = [memoryview(b).nbytes for b in self.buffers]
        return (
            f"Pickled(stream={len(self.stream)} bytes, buffers={sizes}, readonly={self.readonly})"
        )


#: pickled arguments or a pickled result: one blob, or a stream with out-of-band buffers
Payload: TypeAlias = Blob | Pickled


class Kind(enum.IntEnum):
    """Message kinds. The values are fixed: they are what goes on the wire."""

    # producer -> broker
    HELLO = 0x01
    SUBMIT = 0x02
    CANCEL = 0x03
    STATUS = 0x04
    WATCH = 0x05
    BYE = 0x06
    DELIVERED = 0x07
    SCHEDULE = 0x08
    UNSCHEDULE = 0x09
    # worker -> broker
    READY = 0x21
    CREDIT = 0x22
    RESULTS = 0x23
    DISCONNECT = 0x24
    RELEASE = 0x25
    # broker -> producer
    WELCOME = 0x41
    ACK = 0x42
    OUTCOMES = 0x43
    STATUS_REPLY = 0x44
    # broker -> worker
    TASKS = 0x61
    RESULTS_ACK = 0x62
    ABORT = 0x63
    # any direction
    HEARTBEAT = 0x70
    RECONNECT = 0x71
    ERROR = 0x7F


class Status(enum.IntEnum):
    """How a task ended, as carried in an ``Outcome``."""

    OK = 0
    ERROR = 1  # the task raised; value is the pickled exception
    TIMEOUT = 2  # the task overran its time limit
    LOST = 3  # worker -> broker only: the executor died while running it
    WORKER_LOST = 4  # broker -> producer: lost max_attempts times
    CANCELLED = 5
    UNKNOWN = 6  # the broker has no record of the task
    DEPENDENCY_FAILED = 7  # broker -> producer: a dependency failed; the task never ran


#: a status from its wire value: a dict lookup, where calling the enum costs ten times more
STATUS_OF = {int(s): s for s in Status}

# --------------------------------------------------------------------------- field checks


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{what}: expected a string, got {type(value).__name__}")
    return value


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError(f"{what}: expected an integer, got {type(value).__name__}")
    return value


def _float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError(f"{what}: expected a number, got {type(value).__name__}")
    return float(value)


def _opt_float(value: Any, what: str) -> float | None:
    return None if value is None else _float(value, what)


def _opt_str(value: Any, what: str) -> str | None:
    return None if value is None else _str(value, what)


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{what}: expected a boolean, got {type(value).__name__}")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise ProtocolError(f"{what}: expected an array, got {type(value).__name__}")
    return value


def _str_list(value: Any, what: str) -> list[str]:
    items = _list(value, what)
    for v in items:
        if type(v) is not str:
            raise ProtocolError(f"{what}: expected strings, got {type(v).__name__}")
    return items


def _dict(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: expected a map, got {type(value).__name__}")
    return value


def _arity(value: Any, n: int, what: str) -> list[Any]:
    items = _list(value, what)
    if len(items) != n:
        raise ProtocolError(f"{what}: expected {n} fields, got {len(items)}")
    return items


class _BlobWriter:
    """Collects the out-of-band frames of one message while its body is built."""

    __slots__ = ("frames", "inline_max")

    def __init__(self, inline_max: int = INLINE_BLOB_MAX) -> None:
        self.frames: list[Blob] = []
        self.inline_max = inline_max

    def put(self, blob: Blob) -> Blob | int:
        if len(blob) <= self.inline_max:
            return blob
        self.frames.append(blob)
        return len(self.frames) - 1

    def put_payload(self, payload: Payload) -> Blob | int | list[Any]:
        """A ``Pickled`` is written ``[stream, [buffer, ...], [readonly, ...]]``, each part
        inline or a frame index like any blob: its buffers are never joined into one frame."""
        if type(payload) is bytes and len(payload) <= self.inline_max:
            return payload  # the common case first: a small pickle
        if not isinstance(payload, Pickled):
            return self.put(payload)
        return [
            self.put(payload.stream),
            [self.put(b) for b in payload.buffers],
            list(payload.readonly),
        ]


class _BlobReader:
    __slots__ = ("frames",)

    def __init__(self, frames: Sequence[Frame]) -> None:
        self.frames = frames

    def get(self, value: Any, what: str) -> Blob:
        if isinstance(value, bytes):
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            if 0 <= value < len(self.frames):
                frame = self.frames[value]
                return frame if isinstance(frame, bytes) else memoryview(frame)
            raise ProtocolError(f"{what}: blob frame {value} does not exist")
        raise ProtocolError(f"{what}: expected bytes or a frame index, got {type(value).__name__}")

    def payload(self, value: Any, what: str) -> Payload:
        """A blob, or a ``Pickled`` written as ``[stream, [buffer, ...], [readonly, ...]]``."""
        if type(value) is not list:
            return self.get(value, what)
        stream, buffers, readonly = _arity(value, 3, what)
        parts = tuple(self.get(b, f"{what}.buffers") for b in _list(buffers, f"{what}.buffers"))
        flags = tuple(_bool(r, f"{what}.readonly") for r in _list(readonly, f"{what}.readonly"))
        if len(flags) != len(parts):
            raise ProtocolError(f"{what}: {len(parts)} buffers but {len(flags)} readonly flags")
        return Pickled(self.get(stream, f"{what}.stream"), parts, flags)


# --------------------------------------------------------------------------- records


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x, on every task
class TaskSpec:
    """One task as a producer submits it."""

    task_id: str
    name: str
    queue: str
    fn: Blob
    args: Payload
    priority: int = 0
    timeout_s: float | None = None
    retries: int = 0
    max_attempts: int = 3
    countdown_s: float = 0.0
    key: str | None = None
    retry_backoff_s: float = 0.0
    retry_on: tuple[str, ...] = ()  # qualified exception names; empty means any exception
    rate_limit: float | None = None  # runs per second of this task name, across all workers
    deps: tuple[str, ...] = ()  # task ids whose results the args refer to (by persistent id)
    route: str | None = None  # a routing strategy for this task; None: its queue's

    def to_wire(self, blobs: _BlobWriter) -> list[Any]:
        fn, args = self.fn, self.args
        return [
            self.task_id,
            self.name,
            self.queue,
            fn if len(fn) <= blobs.inline_max else blobs.put(fn),
            blobs.put_payload(args),
            self.priority,
            self.timeout_s,
            self.retries,
            self.max_attempts,
            self.countdown_s,
            self.key,
            self.retry_backoff_s,
            list(self.retry_on),
            self.rate_limit,
            list(self.deps),
            self.route,
        ]

    @classmethod
    def from_wire(cls, value: Any, blobs: _BlobReader) -> TaskSpec:
        # the common case checked in one expression; anything unusual takes the careful path
        if type(value) is list and len(value) == 16:
            (
                task_id,
                name,
                queue,
                fn,
                args,
                prio,
                timeout,
                retries,
                attempts,
                cd,
                key,
                bo,
                on,
                rl,
                deps,
                route,
            ) = value
            if (
                type(task_id) is str
                and task_id
                and type(name) is str
                and type(queue) is str
                and queue
                and type(fn) is bytes
                and type(args) is bytes
                and type(prio) is int
                and timeout is None
                and retries == 0
                and type(attempts) is int
                and attempts >= 1
                and cd == 0
                and key is None
                and bo == 0
                and on == []
                and rl is None
                and deps == []
                and route is None
            ):
                # names repeat across millions of tasks: keep one copy of each
                return cls(task_id, intern(name), intern(queue), fn, args, prio, None, 0, attempts)
        return cls._from_wire_checked(value, blobs)

    @classmethod
    def _from_wire_checked(cls, value: Any, blobs: _BlobReader) -> TaskSpec:
        if type(value) is list and len(value) == 14:
            value = [*value, [], None]  # stored before dependencies and per-task routes
        f = _arity(value, 16, "task")
        max_attempts = _int(f[8], "task.max_attempts")
        retries = _int(f[7], "task.retries")
        if max_attempts < 1 or retries < 0:
            raise ProtocolError("task: max_attempts must be >= 1 and retries >= 0")
        spec = cls(
            task_id=_str(f[0], "task.task_id"),
            name=intern(_str(f[1], "task.name")),
            queue=intern(_str(f[2], "task.queue")),
            fn=blobs.get(f[3], "task.fn"),
            args=blobs.payload(f[4], "task.args"),
            priority=_int(f[5], "task.priority"),
            timeout_s=_opt_float(f[6], "task.timeout_s"),
            retries=retries,
            max_attempts=max_attempts,
            countdown_s=_float(f[9], "task.countdown_s"),
            key=_opt_str(f[10], "task.key"),
            retry_backoff_s=_float(f[11], "task.retry_backoff_s"),
            retry_on=tuple(_str_list(f[12], "task.retry_on")),
            rate_limit=_opt_float(f[13], "task.rate_limit"),
            deps=tuple(_str_list(f[14], "task.deps")),
            route=_opt_str(f[15], "task.route"),
        )
        if not spec.queue or not spec.task_id:
            raise ProtocolError("task: task_id and queue must be non-empty")
        if spec.timeout_s is not None and not spec.timeout_s > 0:
            raise ProtocolError("task: timeout_s must be > 0")
        if spec.rate_limit is not None and not spec.rate_limit > 0:
            raise ProtocolError("task: rate_limit must be > 0")
        if not (spec.countdown_s >= 0 and spec.retry_backoff_s >= 0):
            raise ProtocolError("task: countdown_s and retry_backoff_s must be >= 0")
        return spec


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x, on every task
class Assignment:
    """One task as the broker hands it to a worker."""

    task_id: str
    name: str
    fn: Blob
    args: Payload
    attempt: int
    timeout_s: float | None
    # (task id, pickled result) of each dependency, for the args' persistent ids
    deps: tuple[tuple[str, Payload], ...] = ()

    def to_wire(self, blobs: _BlobWriter) -> list[Any]:
        fn, args = self.fn, self.args
        return [
            self.task_id,
            self.name,
            fn if len(fn) <= blobs.inline_max else blobs.put(fn),
            blobs.put_payload(args),
            self.attempt,
            self.timeout_s,
            [[dep_id, blobs.put_payload(value)] for dep_id, value in self.deps],
        ]

    @classmethod
    def from_wire(cls, value: Any, blobs: _BlobReader) -> Assignment:
        if type(value) is list and len(value) == 7:
            task_id, name, fn, args, attempt, timeout, deps = value
            if (
                type(task_id) is str
                and type(name) is str
                and type(fn) is bytes
                and type(args) is bytes
                and type(attempt) is int
                and (timeout is None or type(timeout) is float)
                and deps == []
            ):
                return cls(task_id, name, fn, args, attempt, timeout)
        f = _arity(value, 7, "assignment")
        return cls(
            task_id=_str(f[0], "assignment.task_id"),
            name=_str(f[1], "assignment.name"),
            fn=blobs.get(f[2], "assignment.fn"),
            args=blobs.payload(f[3], "assignment.args"),
            attempt=_int(f[4], "assignment.attempt"),
            timeout_s=_opt_float(f[5], "assignment.timeout_s"),
            deps=tuple(
                (_str(d[0], "assignment.deps.id"), blobs.payload(d[1], "assignment.deps.value"))
                for d in (_arity(d, 2, "assignment.deps") for d in _list(f[6], "assignment.deps"))
            ),
        )


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """What always survives the trip of a remote exception: names and text, never pickles."""

    type_name: str
    message: str
    traceback: str = ""
    mro: tuple[str, ...] = ()

    def to_wire(self) -> list[Any]:
        return [self.type_name, self.message, self.traceback, list(self.mro)]

    @classmethod
    def from_wire(cls, value: Any) -> ErrorInfo:
        f = _arity(value, 4, "error")
        return cls(
            type_name=_str(f[0], "error.type_name"),
            message=_str(f[1], "error.message"),
            traceback=_str(f[2], "error.traceback"),
            mro=tuple(_str_list(f[3], "error.mro")),
        )


@dataclass(slots=True)  # not frozen: a frozen __init__ costs 4x, on every task
class Outcome:
    """How one task ended: worker -> broker in ``Results``, broker -> producer in ``Outcomes``."""

    task_id: str
    status: Status
    value: Payload = b""
    error: ErrorInfo | None = None
    run_s: float = 0.0

    def to_wire(self, blobs: _BlobWriter) -> list[Any]:
        value = self.value
        return [
            self.task_id,
            int(self.status),
            blobs.put_payload(value),
            None if self.error is None else self.error.to_wire(),
            self.run_s,
        ]

    @classmethod
    def from_wire(cls, value: Any, blobs: _BlobReader) -> Outcome:
        if type(value) is list and len(value) == 5:
            task_id, status, blob, error, run_s = value
            known = STATUS_OF.get(status) if type(status) is int else None
            if (
                known is not None
                and type(task_id) is str
                and type(blob) is bytes
                and error is None
                and type(run_s) is float
            ):
                return cls(task_id, known, blob, None, run_s)
        f = _arity(value, 5, "outcome")
        try:
            status = Status(_int(f[1], "outcome.status"))
        except ValueError:
            raise ProtocolError(f"outcome.status: unknown status {f[1]!r}") from None
        return cls(
            task_id=_str(f[0], "outcome.task_id"),
            status=status,
            value=blobs.payload(f[2], "outcome.value"),
            error=None if f[3] is None else ErrorInfo.from_wire(f[3]),
            run_s=_float(f[4], "outcome.run_s"),
        )


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True, slots=True)
class Hello:
    """A producer introduces itself; the broker answers ``Welcome``."""

    KIND: ClassVar[Kind] = Kind.HELLO
    client_id: str
    name: str = ""
    host: str = ""
    pid: int = 0


@dataclass(frozen=True, slots=True)
class Submit:
    """A batch of tasks; the broker answers ``Ack`` once they are recorded."""

    KIND: ClassVar[Kind] = Kind.SUBMIT
    tasks: list[TaskSpec]


@dataclass(frozen=True, slots=True)
class Cancel:
    """Cancel tasks: pending ones are dropped; running ones are killed if ``terminate``."""

    KIND: ClassVar[Kind] = Kind.CANCEL
    task_ids: list[str]
    terminate: bool = False


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """Ask for one status snapshot. Allowed without ``Hello``: status readers are transient."""

    KIND: ClassVar[Kind] = Kind.STATUS


@dataclass(frozen=True, slots=True)
class Watch:
    """After a reconnect: send me the outcomes of these tasks (now, or when they exist)."""

    KIND: ClassVar[Kind] = Kind.WATCH
    task_ids: list[str]


@dataclass(frozen=True, slots=True)
class Delivered:
    """These outcomes reached their futures: the broker may forget the tasks."""

    KIND: ClassVar[Kind] = Kind.DELIVERED
    task_ids: list[str]


@dataclass(frozen=True, slots=True)
class PeriodicTask:
    """A task the broker submits itself on a rule: every ``every_s`` seconds or on a ``cron``
    line (UTC), each tick a copy of ``template`` under a task id derived from the tick."""

    name: str
    every_s: float | None
    cron: str | None
    template: TaskSpec

    def to_wire(self, blobs: _BlobWriter) -> list[Any]:
        return [self.name, self.every_s, self.cron, self.template.to_wire(blobs)]

    @classmethod
    def from_wire(cls, value: Any, blobs: _BlobReader) -> PeriodicTask:
        f = _arity(value, 4, "periodic")
        periodic = cls(
            name=_str(f[0], "periodic.name"),
            every_s=_opt_float(f[1], "periodic.every_s"),
            cron=_opt_str(f[2], "periodic.cron"),
            template=TaskSpec.from_wire(f[3], blobs),
        )
        if not periodic.name or (periodic.every_s is None) == (periodic.cron is None):
            raise ProtocolError("periodic: a name and exactly one of every_s and cron")
        if periodic.every_s is not None and not (
            periodic.every_s > 0 and math.isfinite(periodic.every_s)
        ):
            raise ProtocolError("periodic: every_s must be a finite number > 0")
        return periodic


@dataclass(frozen=True, slots=True)
class Schedule:
    """Add (or replace, by name) periodic tasks; the broker answers ``Ack`` with
    ``schedule:NAME`` ids, or ``Error`` naming them."""

    KIND: ClassVar[Kind] = Kind.SCHEDULE
    periodic: list[PeriodicTask]


@dataclass(frozen=True, slots=True)
class Unschedule:
    """Remove periodic tasks by name; answered like ``Schedule``."""

    KIND: ClassVar[Kind] = Kind.UNSCHEDULE
    names: list[str]


@dataclass(frozen=True, slots=True)
class Bye:
    """A producer leaves; the broker forgets its address."""

    KIND: ClassVar[Kind] = Kind.BYE


@dataclass(frozen=True, slots=True)
class Ready:
    """A worker node registers (or re-registers) with its free slots as initial credit and the
    ids of the tasks it already holds (so a restarted broker does not run them twice)."""

    KIND: ClassVar[Kind] = Kind.READY
    worker_id: str
    name: str
    host: str
    pid: int
    queues: list[str]
    concurrency: int
    credit: int
    held: list[str] = field(default_factory=list)
    weight: float = 1.0  # its share under the "weighted" routing strategy


@dataclass(frozen=True, slots=True)
class Credit:
    """A worker grants the broker ``n`` more tasks."""

    KIND: ClassVar[Kind] = Kind.CREDIT
    n: int


@dataclass(frozen=True, slots=True)
class Results:
    """A batch of outcomes from a worker, with the credit its freed slots give back, and the
    tasks it is about to hand to its executors (said before it does: a task not named here
    has never started there)."""

    KIND: ClassVar[Kind] = Kind.RESULTS
    outcomes: list[Outcome]
    credit: int = 0
    started: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Release:
    """A draining worker hands back tasks it has not started and takes no new ones: the broker
    requeues them without charging an attempt and sends this worker nothing more."""

    KIND: ClassVar[Kind] = Kind.RELEASE
    task_ids: list[str]


@dataclass(frozen=True, slots=True)
class Disconnect:
    """A worker leaves cleanly; whatever it still held is requeued without using an attempt."""

    KIND: ClassVar[Kind] = Kind.DISCONNECT


@dataclass(frozen=True, slots=True)
class Welcome:
    """The broker accepts a peer and tells it the heartbeat rules and the largest message it
    takes (a peer must not send more: the broker would drop the connection)."""

    KIND: ClassVar[Kind] = Kind.WELCOME
    broker_id: str
    heartbeat_interval_s: float
    heartbeat_liveness: int
    max_message_bytes: int = 0  # 0: not announced


@dataclass(frozen=True, slots=True)
class Ack:
    """These submitted tasks are recorded by the broker."""

    KIND: ClassVar[Kind] = Kind.ACK
    task_ids: list[str]


@dataclass(frozen=True, slots=True)
class Outcomes:
    """A batch of task outcomes for a producer."""

    KIND: ClassVar[Kind] = Kind.OUTCOMES
    outcomes: list[Outcome]


@dataclass(frozen=True, slots=True)
class StatusReply:
    """One snapshot of the mesh, as plain msgpack-able data."""

    KIND: ClassVar[Kind] = Kind.STATUS_REPLY
    snapshot: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Tasks:
    """A batch of tasks for a worker, never more than its credit."""

    KIND: ClassVar[Kind] = Kind.TASKS
    assignments: list[Assignment]


@dataclass(frozen=True, slots=True)
class ResultsAck:
    """The broker has these outcomes; the worker may forget them."""

    KIND: ClassVar[Kind] = Kind.RESULTS_ACK
    task_ids: list[str]


@dataclass(frozen=True, slots=True)
class Abort:
    """Cancel these tasks held by the worker: drop those not started yet and, with
    ``terminate``, kill the executors running the others; report them cancelled."""

    KIND: ClassVar[Kind] = Kind.ABORT
    task_ids: list[str]
    terminate: bool = True


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """I am alive. Any message counts as a heartbeat; this one is sent when nothing else is."""

    KIND: ClassVar[Kind] = Kind.HEARTBEAT


@dataclass(frozen=True, slots=True)
class Reconnect:
    """The broker does not know this peer (it restarted, or declared the peer dead): say hello
    again and resend whatever is unacknowledged."""

    KIND: ClassVar[Kind] = Kind.RECONNECT


@dataclass(frozen=True, slots=True)
class Error:
    """The broker refused a message. ``task_ids`` names the tasks concerned, if any."""

    KIND: ClassVar[Kind] = Kind.ERROR
    code: str
    message: str
    task_ids: list[str] = field(default_factory=list)


Message: TypeAlias = (
    Hello
    | Submit
    | Cancel
    | StatusRequest
    | Watch
    | Delivered
    | Schedule
    | Unschedule
    | Bye
    | Ready
    | Credit
    | Results
    | Release
    | Disconnect
    | Welcome
    | Ack
    | Outcomes
    | StatusReply
    | Tasks
    | ResultsAck
    | Abort
    | Heartbeat
    | Reconnect
    | Error
)

#: Which kinds each side may send, by signature. The broker sends a peer the same signature.
PRODUCER_SENDS = frozenset({Kind.HELLO, Kind.SUBMIT, Kind.CANCEL, Kind.STATUS, Kind.WATCH})
PRODUCER_SENDS |= {Kind.DELIVERED, Kind.SCHEDULE, Kind.UNSCHEDULE, Kind.BYE, Kind.HEARTBEAT}
WORKER_SENDS = frozenset(
    {Kind.READY, Kind.CREDIT, Kind.RESULTS, Kind.RELEASE, Kind.DISCONNECT, Kind.HEARTBEAT}
)


# --------------------------------------------------------------------------- encode / decode


def _encode_body(msg: Message, blobs: _BlobWriter) -> list[Any]:
    if isinstance(msg, Submit):
        return [[t.to_wire(blobs) for t in msg.tasks]]
    if isinstance(msg, Tasks):
        return [[a.to_wire(blobs) for a in msg.assignments]]
    if isinstance(msg, Results):
        return [[o.to_wire(blobs) for o in msg.outcomes], msg.credit, msg.started]
    if isinstance(msg, Outcomes):
        return [[o.to_wire(blobs) for o in msg.outcomes]]
    if isinstance(msg, Schedule):
        return [[s.to_wire(blobs) for s in msg.periodic]]
    return [getattr(msg, f.name) for f in dataclasses.fields(msg)]


def encode(signature: bytes, msg: Message) -> list[Frame]:
    """Turn a message into the frames to send (without any routing envelope)."""
    blobs = _BlobWriter()
    body = msgpack.packb(_encode_body(msg, blobs), use_bin_type=True)
    return [signature, bytes([msg.KIND]), body, *blobs.frames]


_SIMPLE: dict[Kind, tuple[type[Any], tuple[Any, ...]]] = {}


def _simple(cls: type[Any], *checks: Any) -> None:
    _SIMPLE[cls.KIND] = (cls, checks)


_simple(Hello, _str, _str, _str, _int)
_simple(Cancel, _str_list, _bool)
_simple(StatusRequest)
_simple(Watch, _str_list)
_simple(Delivered, _str_list)
_simple(Unschedule, _str_list)
_simple(Bye)
_simple(Ready, _str, _str, _str, _int, _str_list, _int, _int, _str_list, _float)
_simple(Credit, _int)
_simple(Release, _str_list)
_simple(Disconnect)
_simple(Welcome, _str, _float, _int, _int)
_simple(Ack, _str_list)
_simple(StatusReply, _dict)
_simple(ResultsAck, _str_list)
_simple(Abort, _str_list, _bool)
_simple(Heartbeat)
_simple(Reconnect)
_simple(Error, _str, _str, _str_list)


def decode(frames: Sequence[Frame]) -> tuple[bytes, Message]:
    """Parse frames (without routing envelope) into ``(signature, message)``.

    Raises ``ProtocolError`` for anything malformed: wrong signature or version, unknown kind,
    a body that is not msgpack, wrong field count or types. Never raises anything else.
    """
    if len(frames) < 3:
        raise ProtocolError(f"expected at least 3 frames, got {len(frames)}")
    signature = bytes(frames[0])
    if signature not in SIGNATURES:
        if len(signature) == 4 and signature[:3] in (b"TMP", b"TMW"):
            raise ProtocolError(
                f"protocol version {signature[3]} is not supported (this side speaks "
                f"{PROTOCOL_VERSION})"
            )
        raise ProtocolError("not a taskmesh message (bad signature frame)")
    kind_frame = bytes(frames[1])
    if len(kind_frame) != 1:
        raise ProtocolError("kind frame must be one byte")
    try:
        kind = Kind(kind_frame[0])
    except ValueError:
        raise ProtocolError(f"unknown message kind 0x{kind_frame[0]:02x}") from None
    try:
        body = msgpack.unpackb(frames[2], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise ProtocolError(f"body is not valid msgpack: {exc}") from None
    blobs = _BlobReader(frames[3:])
    try:
        return signature, _decode_body(kind, body, blobs)
    except ProtocolError:
        raise
    except Exception as exc:  # defensive: a decoder bug must not escape as a crash
        raise ProtocolError(f"cannot decode {kind.name}: {exc!r}") from None


def _decode_body(kind: Kind, body: Any, blobs: _BlobReader) -> Message:
    if kind is Kind.SUBMIT:
        (tasks,) = _arity(body, 1, "SUBMIT")
        return Submit([TaskSpec.from_wire(t, blobs) for t in _list(tasks, "SUBMIT.tasks")])
    if kind is Kind.TASKS:
        (items,) = _arity(body, 1, "TASKS")
        return Tasks([Assignment.from_wire(a, blobs) for a in _list(items, "TASKS.assignments")])
    if kind is Kind.RESULTS:
        if type(body) is list and len(body) == 2:
            body = [*body, []]  # from a worker that does not report starts
        items, credit, started = _arity(body, 3, "RESULTS")
        outcomes = [Outcome.from_wire(o, blobs) for o in _list(items, "RESULTS.outcomes")]
        return Results(
            outcomes, _int(credit, "RESULTS.credit"), _str_list(started, "RESULTS.started")
        )
    if kind is Kind.OUTCOMES:
        (items,) = _arity(body, 1, "OUTCOMES")
        return Outcomes([Outcome.from_wire(o, blobs) for o in _list(items, "OUTCOMES.outcomes")])
    if kind is Kind.SCHEDULE:
        (items,) = _arity(body, 1, "SCHEDULE")
        return Schedule([PeriodicTask.from_wire(s, blobs) for s in _list(items, "SCHEDULE")])
    if kind is Kind.ABORT and type(body) is list and len(body) == 1:
        body = [*body, True]  # from a broker that always terminated
    cls, checks = _SIMPLE[kind]
    values = _arity(body, len(checks), kind.name)
    fields = [
        check(v, f"{kind.name}.{i}")
        for i, (check, v) in enumerate(zip(checks, values, strict=True))
    ]
    message: Message = cls(*fields)
    return message


def allowed(signature: bytes, msg: Message) -> bool:
    """Whether a peer speaking ``signature`` may send this message to the broker."""
    return msg.KIND in (PRODUCER_SENDS if signature == PRODUCER else WORKER_SENDS)


# --------------------------------------------------------------------------- stored records
# The journal stores tasks and outcomes in their wire form, every blob inline, so that there is
# one encoding of a task and it is defined here.

_INLINE_ALL = 1 << 62


def pack_task(spec: TaskSpec, *, without_fn: bool = False) -> bytes:
    """``without_fn``: leave the function's pickle out (the journal keeps it elsewhere)."""
    wire = spec.to_wire(_BlobWriter(_INLINE_ALL))
    if without_fn:
        wire[3] = b""
    packed: bytes = msgpack.packb(wire, use_bin_type=True)
    return packed


def unpack_task(data: bytes) -> TaskSpec:
    return TaskSpec.from_wire(msgpack.unpackb(data, raw=False), _BlobReader(()))


def pack_outcome(outcome: Outcome) -> bytes:
    packed: bytes = msgpack.packb(outcome.to_wire(_BlobWriter(_INLINE_ALL)), use_bin_type=True)
    return packed


def unpack_outcome(data: bytes) -> Outcome:
    return Outcome.from_wire(msgpack.unpackb(data, raw=False), _BlobReader(()))


def pack_periodic(periodic: PeriodicTask) -> bytes:
    packed: bytes = msgpack.packb(periodic.to_wire(_BlobWriter(_INLINE_ALL)), use_bin_type=True)
    return packed


def unpack_periodic(data: bytes) -> PeriodicTask:
    return PeriodicTask.from_wire(msgpack.unpackb(data, raw=False), _BlobReader(()))
