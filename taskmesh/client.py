"""The producer: ``Client`` (a ``concurrent.futures.Executor``) and ``TaskFuture``.

One background I/O thread owns the producer's socket (ZeroMQ sockets are not thread-safe).
Callers pickle in their own thread (so a pickling error raises at ``submit``), append the task
to a queue and wake the I/O thread, which sends everything queued as one ``Submit``: batching
comes for free when submits arrive faster than one round trip.

Delivery rules kept here:
- A submit stays in ``_unacked`` until the broker acknowledges it and is sent again after a
  reconnect (the broker dedupes by task id). One unacknowledged for ``connect_timeout_s``
  fails its future with ``BrokerUnavailable``.
- After a reconnect the client asks (``Watch``) for the outcome of every acknowledged,
  unresolved future. Futures resolve once: later copies of an outcome are ignored.
- A broker that refuses this client's key (at the handshake, or ``forbidden`` later) fails
  every unresolved future with ``AuthenticationError`` and forgets its tasks: nothing is resent
  if the key is accepted later, so a failed future never runs after all.
- A future passed as an argument (a dependency) travels as a reference to its task. Until the
  broker has acknowledged the task that refers to it, the dependency's ``Delivered`` is held
  back, so the broker cannot forget an outcome that a task on its way still needs. A future
  that has already finished travels as its value instead (or fails its dependent at once).
"""

from __future__ import annotations

import asyncio
import atexit
import itertools
import logging
import math
import os
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import CancelledError, Executor, Future, InvalidStateError
from dataclasses import replace
from datetime import timedelta
from typing import Any, TypeVar, cast

import zmq

from taskmesh import protocol as p
from taskmesh.config import (
    ClientConfig,
    HeartbeatConfig,
    default_broker,
    default_broker_key,
    default_curve_secret,
)
from taskmesh.errors import (
    AuthenticationError,
    BrokerUnavailable,
    DependencyFailed,
    ProtocolError,
    SerializationError,
    TaskmeshError,
)
from taskmesh.options import DEFAULT_OPTIONS, TaskOptions, periodic_rule, split_call_options
from taskmesh.security import client_keys
from taskmesh.serialize import (
    callable_name,
    dependency_collector,
    dependency_value,
    dumps_call,
    dumps_function,
    load_outcome,
    passthrough,
)
from taskmesh.transport import check_endpoint, watched_dealer

log = logging.getLogger(__name__)

T = TypeVar("T")

_MAX_BATCH = 2000  # tasks per Submit message
_DEFAULT_BATCH_BYTES = 64 << 20  # before the broker has said its limit
_ENVELOPE_BYTES = 4096  # room for frames and fields around a call's pickles
# A DELIVERED waits this long for a message to travel with: a caller that waits for each result
# submits its next task within microseconds, and the broker then wakes once for both. Shorter
# than the broker's hold on unwritten outcomes, so the journal still never writes most of them.
_DELIVERED_WAIT_S = 0.002


# concurrent.futures' own state names: TaskFuture keeps Future's fields, only made cheaper
_PENDING, _FINISHED = "PENDING", "FINISHED"
_SETTLED = ("CANCELLED", "CANCELLED_AND_NOTIFIED", _FINISHED)
# guards making a future's Condition, and settling a future that has none yet
_CONDITION_MADE = threading.Lock()


class TaskFuture(Future[T]):
    """A ``concurrent.futures.Future`` for one remote task; awaitable from asyncio.

    ``Future.__init__`` makes a ``threading.Condition`` per future; with the garbage collector
    tracking it and its parts, that was a fifth of a producer's CPU per no-op task, and most
    futures are settled before anyone waits on them. A TaskFuture makes its Condition when a
    thread first needs it (to wait, cancel, or add a callback or a ``wait()`` waiter); until
    then it is settled under one shared lock, which is also the lock that makes Conditions, so
    a waiter arriving meanwhile finds the future either settled or with its Condition in place.
    """

    def __init__(self, task_id: str, name: str, client: Client) -> None:
        # Future.__init__ but for the Condition and the two lists only a thread holding it may
        # change: those come with it (empty tuples until then, for reading). Every object the
        # collector tracks counts: a producer keeps thousands of futures alive, and each full
        # collection walks them all.
        self._state = _PENDING
        self._result: Any = None
        self._exception: BaseException | None = None
        self._waiters = cast("list[Any]", ())  # a string: a subscripted type costs microseconds
        self._done_callbacks = cast("list[Callable[[Future[T]], object]]", ())
        # an attribute, not a lookup in __dict__: reading __dict__ makes CPython build a real
        # dict for the object (another tracked object per future)
        self._made_condition: threading.Condition | None = None
        self.task_id = task_id
        self.name = name
        self._client = client
        self._seen: p.Outcome | None = None  # its outcome arrived (set before it is settled)

    @property
    def _condition(self) -> threading.Condition:
        condition = self._made_condition
        if condition is None:
            with _CONDITION_MADE:
                condition = self._made_condition
                if condition is None:
                    self._waiters = []
                    self._done_callbacks = []
                    condition = self._made_condition = threading.Condition()
        return condition

    @_condition.setter
    def _condition(self, condition: threading.Condition) -> None:
        self._made_condition = condition

    def _settle_alone(self, result: Any, exception: BaseException | None) -> bool:
        """Settle without a Condition if nobody has one yet; False if someone might wait."""
        with _CONDITION_MADE:
            if self._made_condition is not None:
                return False
            if self._state in _SETTLED:
                raise InvalidStateError(f"{self._state}: {self!r}")
            self._result = result
            self._exception = exception
            self._state = _FINISHED
        return True  # no Condition means no callbacks and no waiters to tell

    def set_result(self, result: T) -> None:
        if not self._settle_alone(result, None):
            super().set_result(result)

    def set_exception(self, exception: BaseException | None) -> None:
        if exception is None or not self._settle_alone(None, exception):
            super().set_exception(exception)

    def done(self) -> bool:
        return self._state in _SETTLED  # one attribute read: no lock needed

    def result(self, timeout: float | None = None) -> T:
        if self._state == _FINISHED:  # settled: nothing to wait for, no Condition to make
            if self._exception is None:
                result: T = self._result
                return result
            try:
                raise self._exception
            finally:
                self = None  # type: ignore[assignment]  # no future <-> traceback cycle
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        if self._state == _FINISHED:
            return self._exception
        return super().exception(timeout)

    def cancel(self) -> bool:
        """Cancel locally and ask the broker to drop the task if it has not started yet."""
        # cancel here first: the broker's reply may otherwise finish the future in between
        if not super().cancel():
            return False
        # what an Executor does for a future it will not run: wait() and as_completed() count
        # a future as done only once it is CANCELLED_AND_NOTIFIED
        self.set_running_or_notify_cancel()
        self._client._request_cancel([self.task_id], terminate=False)
        return True

    def __reduce__(self) -> tuple[Any, ...]:
        """Only as an argument of a submitted task: a reference to this task's result."""
        return self._client._dependency_reference(self)

    def __await__(self) -> Generator[Any, None, T]:
        return asyncio.wrap_future(self).__await__()

    def __repr__(self) -> str:
        return f"<TaskFuture {self.name} [{self.task_id}] {self._state.lower()}>"


class Client(Executor):
    """A connection to a taskmesh broker that runs callables remotely.

    ``with Client(url) as client: client.submit(fn, *args).result()``
    """

    def __init__(
        self,
        broker: str | None = None,
        *,
        connect_timeout_s: float | None = None,
        name: str = "",
        config: ClientConfig | None = None,
        curve_secret: str | None = None,
        broker_key: str | None = None,
    ) -> None:
        """``curve_secret`` (this producer's NAME.key_secret) and ``broker_key`` (the broker's
        public key file) turn on CurveZMQ; they default to TASKMESH_CURVE_SECRET and
        TASKMESH_BROKER_KEY."""
        base = config or ClientConfig()
        url = broker or base.broker or default_broker()
        check_endpoint(url)
        self.config = ClientConfig(
            broker=url,
            connect_timeout_s=base.connect_timeout_s
            if connect_timeout_s is None
            else connect_timeout_s,
            heartbeat=base.heartbeat,
            name=name or base.name,
            curve_secret=curve_secret or base.curve_secret,
            broker_key=broker_key or base.broker_key,
        )
        self._curve = client_keys(self.config.curve_secret, self.config.broker_key)
        self.client_id = uuid.uuid4().hex[:16]
        self._ids = itertools.count(1)
        self._futures: dict[str, TaskFuture[Any]] = {}
        self._unacked: dict[str, tuple[float, p.TaskSpec]] = {}
        self._outgoing: deque[p.TaskSpec] = deque()
        self._cancels: deque[tuple[list[str], bool]] = deque()
        self._lock = threading.Lock()
        # dependencies (under _lock): referring tasks not yet acknowledged, per dependency;
        # dependencies whose Delivered waits for those; each dependent's dependency futures
        self._pins: dict[str, int] = {}
        self._held: set[str] = set()
        self._deps_of: dict[str, list[TaskFuture[Any]]] = {}
        self._unpinned: deque[str] = deque()
        # outcomes received, to confirm with the next message out (or after _DELIVERED_WAIT_S)
        self._delivered: list[str] = []
        self._delivered_since = 0.0
        # schedule and unschedule requests awaiting the broker's answer, by ack id
        self._control: dict[str, tuple[p.Message, list[Future[None]], float]] = {}
        self._control_out: deque[p.Message] = deque()
        self._closed = False
        self._wake_flag = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._ctx: zmq.Context[Any] = zmq.Context()
        # raises BrokerUnavailable for a bad address
        self._sock, self._watch = watched_dealer(self._ctx, url, curve=self._curve)
        self._refused: str | None = None  # why the broker refused our key, until a Welcome
        self._sock_refused = False  # this socket's handshake was refused: it is dead
        self._connected = False
        self._hello_at: float | None = None  # a Hello sent, its Welcome not yet seen
        self._max_message = 0  # the broker's limit, from Welcome (0: not known yet)
        self._broker_seen = time.monotonic()
        self._thread = threading.Thread(target=self._io_loop, name="taskmesh-client", daemon=True)
        self._thread.start()

    @property
    def broker(self) -> str:
        return self.config.broker

    # ------------------------------------------------------------------ Executor API

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> TaskFuture[T]:
        """Run ``fn(*args, **kwargs)`` on a worker; options as ``_queue=``, ``_priority=``..."""
        overrides = split_call_options(kwargs)
        # a @task keeps its own options (queue, retries, ...) when submitted through a client
        base = getattr(fn, "options", None)
        options = (base if isinstance(base, TaskOptions) else DEFAULT_OPTIONS).merged(overrides)
        return self.submit_call(fn, args, kwargs, options)

    def submit_call(
        self,
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: TaskOptions = DEFAULT_OPTIONS,
        *,
        name: str | None = None,
        fn_blob: bytes | None = None,
    ) -> TaskFuture[Any]:
        """The one place a task is built: every submit path (``Task.submit`` too) ends here."""
        if self._closed:
            raise RuntimeError("cannot submit to a closed taskmesh Client")
        display = name or callable_name(fn)
        timeout = options.timeout
        task_id = f"{self.client_id}-{next(self._ids)}"
        found: list[TaskFuture[Any]] = []
        try:
            spec = p.TaskSpec(
                task_id,
                display,
                options.queue,
                fn_blob if fn_blob is not None else dumps_function(fn),
                dumps_call(display, args, kwargs, found),
                options.priority,
                None if timeout is None else float(timeout),
                options.retries,
                options.max_attempts,
                float(options.countdown),
                options.key,
                float(options.retry_backoff),
                options.retry_names,
                options.rate_per_s,
                tuple(dict.fromkeys(f.task_id for f in found)) if found else (),
                options.route,
            )
            self._check_size(spec)
        except DependencyFailed as exc:  # a dependency had already failed: never sent
            _release(found)
            failed: TaskFuture[Any] = TaskFuture(task_id, display, self)
            failed.set_exception(DependencyFailed(f"task {display} [{task_id}] did not run: {exc}"))
            return failed
        except BaseException:
            _release(found)
            raise
        future: TaskFuture[Any] = TaskFuture(spec.task_id, display, self)
        with self._lock:  # with _resync: a future is always either queued or unacked
            self._futures[spec.task_id] = future
            self._outgoing.append(spec)
            if found:
                self._deps_of[spec.task_id] = found
        self._wake()
        return future

    def _dependency_reference(self, future: TaskFuture[Any]) -> tuple[Any, ...]:
        """How a future of this client pickles inside a call: its value if it has finished,
        else a reference the broker resolves (and a pin on its outcome until then)."""
        found = dependency_collector()
        if found is None:
            raise TypeError(
                "a TaskFuture can only be pickled as an argument of a submitted task, "
                "where it stands for that task's result"
            )
        with self._lock:
            seen = future._seen
            finished_here = seen is None and future.done() and not future.cancelled()
            if seen is None and not finished_here:
                self._pins[future.task_id] = self._pins.get(future.task_id, 0) + 1
        if seen is not None:
            ok, value = load_outcome(seen, future.name)
        elif finished_here:
            exc = future.exception()
            ok, value = (True, future.result()) if exc is None else (False, exc)
        else:
            found.append(future)
            return (dependency_value, (future.task_id,))
        if ok:
            return (passthrough, (value,))
        what = "was cancelled" if isinstance(value, CancelledError) else "failed"
        raise DependencyFailed(
            f"its dependency {future.name} [{future.task_id}] {what}: "
            f"{type(value).__name__}: {value}"
        )

    def _unpin(self, task_id: str) -> None:
        """A task that refers to this one has been acknowledged (or has failed here)."""
        with self._lock:
            left = self._pins.get(task_id, 0) - 1
            if left > 0:
                self._pins[task_id] = left
                return
            self._pins.pop(task_id, None)
            if task_id not in self._held:
                return
        self._unpinned.append(task_id)
        self._wake()

    def _release_dependencies(self, task_id: str) -> None:
        if not self._deps_of:  # the common case, on every ack and outcome: no lock
            return
        with self._lock:
            found = self._deps_of.pop(task_id, None)
        if found:
            _release(found)

    def map(
        self,
        fn: Callable[..., T],
        *iterables: Iterable[Any],
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Iterator[T]:
        """Like ``Executor.map``: submit all, yield results in order."""
        return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Wait for outstanding futures (if ``wait``), then close the connection."""
        if self._closed:
            return
        if cancel_futures:
            with self._lock:
                pending = [f for f in self._futures.values() if not f.done()]
            for future in pending:
                future.cancel()
        if wait:
            with self._lock:
                pending = list(self._futures.values())
            for future in pending:
                try:
                    future.exception()
                except Exception:
                    pass
        self.close()

    def close(self) -> None:
        """Close now; unresolved futures fail with ``TaskmeshError``."""
        if self._closed:
            return
        self._closed = True
        self._wake(force=True)
        self._thread.join(timeout=5.0)
        with self._lock:
            leftovers = list(self._futures.values())
            self._futures.clear()
        for future in leftovers:
            _settle(future, False, TaskmeshError("the taskmesh Client was closed first"))
        os.close(self._wake_r)
        os.close(self._wake_w)

    def cancel(self, futures: Iterable[TaskFuture[Any]], terminate: bool = False) -> None:
        """Cancel tasks; with ``terminate`` a running task's executor is killed too."""
        ids = []
        for future in futures:
            if not future.done():
                ids.append(future.task_id)
                Future.cancel(future)
        if ids:
            self._request_cancel(ids, terminate)

    def schedule(
        self,
        fn: Callable[..., Any],
        /,
        *args: Any,
        _every: float | timedelta | None = None,
        _cron: str | None = None,
        _name: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Have the broker run ``fn(*args, **kwargs)`` every ``_every`` (seconds or a
        ``timedelta``; ticks fall on multiples of it since the epoch, UTC) or on a ``_cron``
        line (UTC), under the name ``_name`` (default: the task's name). Registering a name
        again replaces the call and keeps the clock. Task options as for ``submit``
        (``_queue=``...). Returns the name once the broker has it."""
        every, cron, name = _every, _cron, _name
        overrides = split_call_options(kwargs)
        base = getattr(fn, "options", None)
        options = (base if isinstance(base, TaskOptions) else DEFAULT_OPTIONS).merged(overrides)
        every_s, rule = periodic_rule(every, cron)
        display = getattr(fn, "name", None) or callable_name(fn)
        found: list[TaskFuture[Any]] = []
        try:
            args_blob = dumps_call(display, args, kwargs, found)
        finally:
            _release(found)
        if found:
            raise TypeError("a periodic task's arguments cannot be futures of other tasks")
        template = p.TaskSpec(
            "template",
            display,
            options.queue,
            dumps_function(fn),
            args_blob,
            options.priority,
            None if options.timeout is None else float(options.timeout),
            options.retries,
            options.max_attempts,
            0.0,
            options.key,
            float(options.retry_backoff),
            options.retry_names,
            options.rate_per_s,
            (),
            options.route,
        )
        self._check_size(template)
        label = name or display
        periodic = p.PeriodicTask(label, every_s, rule, template)
        self._control_request(f"schedule:{label}", p.Schedule([periodic]))
        return label

    def unschedule(self, name: str) -> None:
        """Stop a periodic task; ``TaskmeshError`` if the broker has none by that name."""
        self._control_request(f"schedule:{name}", p.Unschedule([name]))

    def schedules(self) -> list[dict[str, Any]]:
        """The broker's periodic tasks: rule, next and last run, runs, ticks skipped."""
        found: list[dict[str, Any]] = self.status().get("schedules", [])
        return found

    def _control_request(self, ack_id: str, message: p.Message) -> None:
        if self._closed:
            raise RuntimeError("cannot use a closed taskmesh Client")
        waiter: Future[None] = Future()
        with self._lock:
            _, waiters, _ = self._control.get(ack_id, (message, [], 0.0))
            # the same name asked twice before an answer: the last request is the one sent
            # again after a reconnect, and the answer settles both
            self._control[ack_id] = (message, [*waiters, waiter], time.monotonic())
        self._control_out.append(message)
        self._wake()
        waiter.result(timeout=self.config.connect_timeout_s + 5.0)

    def _answer_control(self, ack_id: str, error: BaseException | None) -> None:
        with self._lock:
            entry = self._control.pop(ack_id, None)
        if entry is not None:
            for waiter in entry[1]:
                _settle(waiter, error is None, error)

    def status(self, timeout_s: float = 5.0) -> dict[str, Any]:
        """One status snapshot from the broker."""
        return fetch_status(
            self.config.broker,
            timeout_s,
            curve_secret=self.config.curve_secret,
            broker_key=self.config.broker_key,
        )

    # ------------------------------------------------------------------ I/O thread side

    def _request_cancel(self, task_ids: list[str], terminate: bool) -> None:
        self._cancels.append((task_ids, terminate))
        self._wake()

    def _wake(self, force: bool = False) -> None:
        if force or not self._wake_flag:
            self._wake_flag = True
            try:
                os.write(self._wake_w, b"\0")
            except (BlockingIOError, OSError):
                pass

    def _io_loop(self) -> None:
        try:
            self._hello()
            poller = zmq.Poller()
            poller.register(self._sock, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
            poller.register(self._watch.socket, zmq.POLLIN)
            last_sent = time.monotonic()
            while not self._closed:
                # the broker's heartbeat rules (adopted from Welcome) may change the interval
                interval = self.config.heartbeat.interval_s
                timeout_ms = int(interval * 1000)
                if self._delivered:
                    waited = time.monotonic() - self._delivered_since
                    wait_ms = math.ceil(max(0.0, _DELIVERED_WAIT_S - waited) * 1000)
                    timeout_ms = min(timeout_ms, wait_ms)
                events = dict(poller.poll(timeout_ms))
                now = time.monotonic()
                if self._wake_r in events:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                    # only after draining: a wake-up written in between would be drained with
                    # the flag left set, and every later submit would wait out a poll timeout
                    self._wake_flag = False
                if self._watch.socket in events:
                    self._check_handshake()
                if self._sock in events:
                    self._receive(now)
                if self._sock_refused and self._refused and self._outgoing:
                    self._refuse(self._refused)  # submitted after the refusal: fail them too
                if self._send_outgoing(now):
                    last_sent = now
                if now - self._broker_seen > self.config.heartbeat.timeout_s:
                    if self._connected:
                        log.warning("broker %s stopped answering; reconnecting", self.broker)
                    self._reconnect(poller, now)
                    last_sent = now
                elif now - last_sent >= interval:
                    self._send(p.Heartbeat())
                    last_sent = now
                self._expire_unacked(now)
            try:
                if self._delivered:
                    self._send(p.Delivered(self._delivered))
                self._send(p.Bye())
                self._sock.close(linger=200)  # give the goodbye a moment to leave
            except Exception:
                pass
        except Exception:
            log.exception("taskmesh client I/O thread failed")
            self._fail_all(TaskmeshError("the taskmesh client I/O thread failed; see the log"))
        finally:
            self._watch.close()
            self._sock.close(linger=0)
            self._ctx.term()

    def _hello(self) -> None:
        self._send(p.Hello(self.client_id, self.config.name, socket.gethostname(), os.getpid()))
        self._hello_at = time.monotonic()

    def _send(self, msg: p.Message) -> None:
        try:
            self._sock.send_multipart(p.encode(p.PRODUCER, msg), copy=False)
        except zmq.Again:
            pass  # the handshake was refused and the connection is gone: see _check_handshake

    def _check_handshake(self) -> None:
        refusal = self._watch.refusal()
        if refusal is not None:
            self._sock_refused = True
            self._refuse(refusal)

    def _refuse(self, reason: str) -> None:
        """The broker will not serve this key: fail everything unresolved, resend nothing."""
        if self._refused != reason:
            log.error("broker %s: %s", self.broker, reason)
        self._refused = reason
        with self._lock:
            self._outgoing.clear()
        self._unacked.clear()
        self._fail_all(AuthenticationError(f"{reason} (broker {self.broker})"))

    def _check_size(self, spec: p.TaskSpec) -> None:
        """Refuse a call larger than the broker accepts: it would drop the connection."""
        limit = self._max_message
        size = len(spec.fn) + len(spec.args)
        if limit and size > limit - _ENVELOPE_BYTES:
            raise SerializationError(
                f"the call {spec.name}(...) pickles to {size:,} bytes; the broker at "
                f"{self.broker} accepts messages up to {limit:,} bytes (--max-message-bytes)"
            )

    def _send_outgoing(self, now: float) -> bool:
        sent = False
        budget = (self._max_message or _DEFAULT_BATCH_BYTES) // 2
        while self._outgoing:  # submits first: a cancel must not overtake its task
            batch: list[p.TaskSpec] = []
            size = 0
            while self._outgoing and len(batch) < _MAX_BATCH:
                spec = self._outgoing[0]
                spec_size = len(spec.fn) + len(spec.args) + 256
                if batch and size + spec_size > budget:
                    break  # several large calls go in several messages
                self._outgoing.popleft()
                try:
                    self._check_size(spec)  # the limit may have arrived after submit()
                except SerializationError as exc:
                    self._settle_id(spec.task_id, False, exc)
                    continue
                batch.append(spec)
                size += spec_size
                self._unacked[spec.task_id] = (now, spec)
            if batch:
                self._send(p.Submit(batch))
                sent = True
        while self._cancels:
            ids, terminate = self._cancels.popleft()
            self._send(p.Cancel(ids, terminate))
            sent = True
        while self._control_out:
            self._send(self._control_out.popleft())
            sent = True
        if self._unpinned:
            released = self._released_deliveries()
            if released:
                self._confirm_later(released, now)
                sent = True  # in one DELIVERED with the others, now
        if self._delivered and (sent or now - self._delivered_since >= _DELIVERED_WAIT_S):
            self._send(p.Delivered(self._delivered))
            self._delivered = []
            sent = True
        return sent

    def _receive(self, now: float) -> None:
        for _ in range(10_000):
            try:
                # zero-copy: a large result is unpickled straight from the received frame
                frames: list[Any] = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                signature, msg = p.decode(frames)
            except ProtocolError as exc:
                log.warning("dropped a malformed message from the broker: %s", exc)
                continue
            if signature != p.PRODUCER:
                log.warning("dropped a %s message with a worker signature", msg.KIND.name)
                continue
            if not (isinstance(msg, p.Error) and msg.code == "forbidden" and not msg.task_ids):
                self._broker_seen = now  # a refusal is no live link: reconnect, new handshake
            self._on_message(msg, now)

    def _on_message(self, msg: p.Message, now: float) -> None:
        if isinstance(msg, p.Outcomes):
            self._resolve(msg.outcomes)
        elif isinstance(msg, p.Ack):
            for task_id in msg.task_ids:
                self._unacked.pop(task_id, None)
                self._release_dependencies(task_id)
                if task_id.startswith("schedule:"):
                    self._answer_control(task_id, None)
        elif isinstance(msg, p.Welcome):
            if not self._connected:
                log.debug("connected to broker %s at %s", msg.broker_id, self.broker)
            self._connected = True
            self._refused = None
            self._hello_at = None
            self._max_message = msg.max_message_bytes
            self._adopt_heartbeat(msg)
        elif isinstance(msg, p.Reconnect):
            # one resync answers every Reconnect sent before the broker saw our Hello
            pending = self._hello_at
            if pending is None or now - pending > self.config.heartbeat.timeout_s:
                self._resync()
        elif isinstance(msg, p.Error) and msg.code == "forbidden" and not msg.task_ids:
            self._refuse(f"the broker refused this key: {msg.message}")
        elif isinstance(msg, p.Error) and msg.task_ids and msg.task_ids[0].startswith("schedule:"):
            for ack_id in msg.task_ids:  # the caller gets it as an exception: no log line
                self._answer_control(ack_id, TaskmeshError(msg.message))
        elif isinstance(msg, p.Error):
            log.error("broker refused a message: %s: %s", msg.code, msg.message)
            error: TaskmeshError = ProtocolError(
                f"the broker refused task(s): {msg.code}: {msg.message}"
            )
            if msg.code == "forbidden":
                error = AuthenticationError(f"the broker refused this key: {msg.message}")
            for task_id in msg.task_ids:
                self._unacked.pop(task_id, None)
                self._settle_id(task_id, False, error)

    def _adopt_heartbeat(self, welcome: p.Welcome) -> None:
        """The broker's heartbeat rules win: both sides must agree on when a peer is dead."""
        try:
            hb = HeartbeatConfig(welcome.heartbeat_interval_s, welcome.heartbeat_liveness)
        except ValueError:
            return
        if hb != self.config.heartbeat:
            self.config = replace(self.config, heartbeat=hb)

    def _claim_outcomes(
        self, outcomes: list[p.Outcome]
    ) -> tuple[list[tuple[TaskFuture[Any], p.Outcome]], list[str]]:
        """Take arrived outcomes off the books: their futures, and the ids the broker may
        forget now (not those a task on its way still refers to: they are held back)."""
        arrived: list[tuple[TaskFuture[Any], p.Outcome]] = []
        delivered = []
        with self._lock:
            for outcome in outcomes:
                task_id = outcome.task_id
                future = self._futures.pop(task_id, None)
                if future is not None:
                    future._seen = outcome  # from now on it pickles as its value
                    arrived.append((future, outcome))
                if task_id in self._pins:
                    self._held.add(task_id)
                else:
                    delivered.append(task_id)
        return arrived, delivered

    def _released_deliveries(self) -> list[str]:
        """Held-back ids that nothing on its way refers to any more."""
        released = []
        with self._lock:
            while self._unpinned:
                task_id = self._unpinned.popleft()
                if task_id in self._held and task_id not in self._pins:
                    self._held.discard(task_id)
                    released.append(task_id)
        return released

    def _resolve(self, outcomes: list[p.Outcome]) -> None:
        arrived, delivered = self._claim_outcomes(outcomes)
        for outcome in outcomes:
            self._unacked.pop(outcome.task_id, None)
        for future, outcome in arrived:
            self._release_dependencies(outcome.task_id)
            if future.done():
                continue  # cancelled locally: outcomes count once
            ok, value = load_outcome(outcome, future.name)
            _settle(future, ok, value)
            # settled, it pickles as its value through result(): the outcome need not live on
            # (one object less per future for the garbage collector to walk)
            future._seen = None
        # the broker may forget these tasks now; a resent copy is harmless (first one wins).
        # Sent with the next message out: nobody waits for it (see _DELIVERED_WAIT_S).
        if delivered:
            self._confirm_later(delivered, time.monotonic())

    def _confirm_later(self, task_ids: list[str], now: float) -> None:
        """Queue ids for the next DELIVERED (see ``_send_outgoing``)."""
        if not self._delivered:
            self._delivered_since = now
        self._delivered.extend(task_ids)

    def _settle_id(self, task_id: str, ok: bool, value: Any) -> None:
        with self._lock:
            future = self._futures.pop(task_id, None)
        self._release_dependencies(task_id)
        if future is not None:
            _settle(future, ok, value)

    def _resync(self) -> None:
        """Say hello again, resend what the broker never acknowledged, ask for the rest."""
        self._hello()
        now = time.monotonic()
        with self._lock:
            while self._outgoing:
                spec = self._outgoing.popleft()
                self._unacked[spec.task_id] = (now, spec)
            watched = [t for t in self._futures if t not in self._unacked]
        unacked = [spec for _, spec in self._unacked.values()]
        for i in range(0, len(unacked), _MAX_BATCH):
            self._send(p.Submit(unacked[i : i + _MAX_BATCH]))
        with self._lock:
            controls = [message for message, _, _ in self._control.values()]
        for message in controls:  # a (un)schedule is idempotent: say it again
            self._send(message)
        for i in range(0, len(watched), 10_000):
            self._send(p.Watch(watched[i : i + 10_000]))

    def _reconnect(self, poller: zmq.Poller, now: float) -> None:
        self._check_handshake()  # the old socket's last word, before it goes
        hint = self._watch.hint
        poller.unregister(self._sock)
        poller.unregister(self._watch.socket)
        self._watch.close()
        self._sock.close(linger=0)
        self._sock, self._watch = watched_dealer(self._ctx, self.broker, curve=self._curve)
        self._watch.hint = hint  # until a handshake succeeds
        self._sock_refused = False
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._watch.socket, zmq.POLLIN)
        self._connected = False
        # wait a full liveness period for an answer before trying again
        self._broker_seen = now
        self._resync()

    def _expire_unacked(self, now: float) -> None:
        if self._control:
            with self._lock:
                late = [
                    k
                    for k, (_, _, at) in self._control.items()
                    if now - at > self.config.connect_timeout_s
                ]
            for ack_id in late:
                self._answer_control(ack_id, self._unavailable("answered"))
        if not self._unacked:
            return
        limit = self.config.connect_timeout_s
        expired = [t for t, (sent, _) in self._unacked.items() if now - sent > limit]
        if not expired:
            return
        error: TaskmeshError = self._unavailable("acknowledged the task")
        if self._refused:
            error = AuthenticationError(f"{self._refused} (broker {self.broker})")
        for task_id in expired:
            del self._unacked[task_id]
            self._settle_id(task_id, False, error)

    def _unavailable(self, what: str) -> BrokerUnavailable:
        return BrokerUnavailable(
            f"no broker {what} within {self.config.connect_timeout_s:g}s at {self.broker}: "
            + _check_hint(self._watch.hint, self._curve is not None)
        )

    def _fail_all(self, error: BaseException) -> None:
        with self._lock:
            futures = list(self._futures.values())
            self._futures.clear()
            controls = list(self._control.values())
            self._control.clear()
        for future in futures:
            self._release_dependencies(future.task_id)
            _settle(future, False, error)
        for _, waiters, _ in controls:
            for waiter in waiters:
                _settle(waiter, False, error)


def _release(found: list[TaskFuture[Any]]) -> None:
    """The task that referred to these futures is acknowledged or failed: unpin them."""
    for future in found:
        future._client._unpin(future.task_id)


def _settle(future: Future[Any], ok: bool, value: Any) -> None:
    try:
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)
    except InvalidStateError:
        pass  # cancelled locally in the meantime


def _check_hint(hint: str, curve: bool) -> str:
    if hint:
        return hint
    if curve:
        return "is `taskmesh broker` running there and reachable, and does it accept this key?"
    return "is `taskmesh broker` running there and reachable?"


def fetch_status(
    broker: str,
    timeout_s: float = 5.0,
    *,
    curve_secret: str | None = None,
    broker_key: str | None = None,
) -> dict[str, Any]:
    """Ask a broker for one status snapshot; ``BrokerUnavailable`` if none answers in time,
    ``AuthenticationError`` if it refuses the key. Keys default to TASKMESH_CURVE_SECRET and
    TASKMESH_BROKER_KEY."""
    curve = client_keys(curve_secret or default_curve_secret(), broker_key or default_broker_key())
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        sock, watch = watched_dealer(ctx, broker, curve=curve)
        try:
            sock.send_multipart(p.encode(p.PRODUCER, p.StatusRequest()))
            poller = zmq.Poller()
            poller.register(sock, zmq.POLLIN)
            poller.register(watch.socket, zmq.POLLIN)
            deadline = time.monotonic() + timeout_s
            while True:
                left = deadline - time.monotonic()
                events = dict(poller.poll(max(1, int(left * 1000)))) if left > 0 else {}
                if watch.socket in events and (refusal := watch.refusal()):
                    raise AuthenticationError(f"{refusal} (broker {broker})")
                if not events:
                    raise BrokerUnavailable(
                        f"no broker answered at {broker} within {timeout_s:g}s: "
                        + _check_hint(watch.hint, curve is not None)
                    )
                if sock not in events:
                    continue
                try:
                    _, msg = p.decode(sock.recv_multipart())
                except ProtocolError:
                    continue
                if isinstance(msg, p.StatusReply):
                    return msg.snapshot
                if isinstance(msg, p.Error) and msg.code == "forbidden":
                    raise AuthenticationError(f"the broker refused this key: {msg.message}")
        finally:
            watch.close()
            sock.close(linger=0)
    finally:
        ctx.term()


# --------------------------------------------------------------------------- the default client

_default: Client | None = None
_default_lock = threading.Lock()


def connect(
    broker: str | None = None,
    *,
    connect_timeout_s: float | None = None,
    curve_secret: str | None = None,
    broker_key: str | None = None,
) -> Client:
    """Set (and return) the client that ``Task.submit`` and ``Task.map`` use; with
    ``curve_secret`` and ``broker_key`` (files, see ``taskmesh keys``) over CurveZMQ."""
    global _default
    client = Client(
        broker or default_broker(),
        connect_timeout_s=connect_timeout_s,
        curve_secret=curve_secret,
        broker_key=broker_key,
    )
    with _default_lock:
        old, _default = _default, client
    if old is not None:
        old.close()
    return client


def default_client() -> Client:
    """The client set by ``connect``, created on first use from ``TASKMESH_BROKER``."""
    global _default
    with _default_lock:
        if _default is None or _default._closed:
            _default = Client(default_broker())
        return _default


@atexit.register
def _close_default() -> None:
    client = _default
    if client is not None:
        client.close()
