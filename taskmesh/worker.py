"""A worker node: one supervisor process and N executor processes.

The supervisor owns the ZeroMQ socket, the heartbeats, the credit and the time limits; it never
runs user code, so it keeps heartbeating while a task hangs or crashes its executor. Executors
are forked from a forkserver that holds no ZeroMQ context (forking a process with a live context
is undefined behaviour).

Delivery rules kept here:
- Credit: the worker is the authority on its free slots. It grants the broker
  ``slots + prefetch - held - outstanding`` whenever that is positive, and re-announces the
  whole figure in ``Ready`` after every (re)registration.
- Every outcome stays in ``_unacked`` until the broker acknowledges it, and is sent again after a
  reconnect; the broker drops duplicates by task id.
- An executor that dies mid-task reports the task ``LOST`` (the broker requeues it or, after
  ``max_attempts``, fails it with ``WorkerLost``); one killed for overrunning reports ``TIMEOUT``.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import socket
import time
import uuid
from collections import deque
from multiprocessing.connection import Connection
from typing import Any

import zmq

from taskmesh import executor as executor_module
from taskmesh import protocol as p
from taskmesh.config import WorkerConfig
from taskmesh.errors import ProtocolError
from taskmesh.transport import dealer

log = logging.getLogger(__name__)


class ExecutorSlot:
    """One executor process and the task it is running."""

    __slots__ = ("conn", "deadline", "index", "kill_reason", "process", "started_at", "task")

    def __init__(self, index: int, process: Any, conn: Connection) -> None:
        self.index = index
        self.process = process
        self.conn = conn
        self.task: p.Assignment | None = None
        self.started_at = 0.0
        self.deadline: float | None = None
        self.kill_reason: p.Status | None = None

    def kill(self, reason: p.Status) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class WorkerNode:
    """The supervisor. ``run()`` blocks until SIGTERM/SIGINT or ``stop()``."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = uuid.uuid4().hex
        self.capacity = config.concurrency + config.prefetch
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._mp = multiprocessing.get_context("forkserver")
        self._mp.set_forkserver_preload(["taskmesh.executor"])
        self._slots: list[ExecutorSlot] = []
        self._backlog: deque[p.Assignment] = deque()
        self._unacked: dict[str, p.Outcome] = {}
        self._outbox: list[p.Outcome] = []
        self._outstanding = 0  # credit granted to the broker and not yet used
        self._sock: zmq.Socket[Any] | None = None
        self._broker_seen = 0.0
        self._broker_alive = False
        self._last_sent = 0.0
        self._reconnect_delay = config.heartbeat.interval_s
        self._next_reconnect = 0.0
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.done = 0
        self.failed = 0

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        old_handlers = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self._slots = [self._spawn(i) for i in range(self.config.concurrency)]
            self._connect(time.monotonic())
            log.info(
                "worker %s started: %d executors, queues %s, broker %s",
                self.config.name,
                self.config.concurrency,
                ",".join(self.config.queues),
                self.config.broker,
            )
            while not self._stopping:
                self._step()
            self._shutdown()
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self._close()

    def stop(self) -> None:
        self._stopping = True
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def _on_signal(self, signum: int, frame: Any) -> None:
        log.info("worker %s: %s received, leaving", self.config.name, signal.Signals(signum).name)
        self._stopping = True

    def _shutdown(self) -> None:
        """Leave cleanly: tell the broker (it requeues what we held), stop the executors."""
        if self._sock is not None:
            self._flush(time.monotonic())
            self._send(p.Disconnect())
        for slot in self._slots:
            slot.kill(p.Status.CANCELLED)
        for slot in self._slots:
            slot.process.join(timeout=2.0)

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------------ executors

    def _spawn(self, index: int) -> ExecutorSlot:
        parent_conn, child_conn = self._mp.Pipe(duplex=True)
        process = self._mp.Process(
            target=executor_module.executor_main,
            args=(child_conn, self.config.name),
            name=f"taskmesh-executor-{index}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        return ExecutorSlot(index, process, parent_conn)

    def _executor_died(self, slot: ExecutorSlot, now: float) -> None:
        slot.process.join(timeout=1.0)
        task = slot.task
        if task is not None:
            how = _signal_name(slot.process.exitcode)
            if slot.kill_reason is p.Status.TIMEOUT:
                message = (
                    f"task {task.name} [{task.task_id}] exceeded its time limit of "
                    f"{task.timeout_s:g}s on worker {self.config.name}"
                )
                self._report(task, p.Status.TIMEOUT, "taskmesh.errors.TaskTimeout", message, now)
            elif slot.kill_reason is p.Status.CANCELLED:
                message = f"task {task.name} [{task.task_id}] was cancelled while running"
                self._report(
                    task, p.Status.CANCELLED, "taskmesh.errors.TaskCancelled", message, now
                )
            else:
                message = (
                    f"the executor running task {task.name} [{task.task_id}] on worker "
                    f"{self.config.name} died ({how})"
                )
                log.warning("%s", message)
                self._report(task, p.Status.LOST, "taskmesh.errors.WorkerLost", message, now)
        slot.conn.close()
        if not self._stopping:
            self._slots[slot.index] = self._spawn(slot.index)

    def _report(
        self, task: p.Assignment, status: p.Status, type_name: str, message: str, now: float
    ) -> None:
        short = type_name.rsplit(".", 1)[-1]
        info = p.ErrorInfo(type_name, message, "", (type_name, "taskmesh.errors.TaskmeshError"))
        outcome = p.Outcome(task.task_id, status, b"", info, now - self._slot_start(task, now))
        if status is not p.Status.LOST:
            self.failed += 1
        log.info("task %s [%s] %s", task.name, task.task_id, short)
        self._queue_outcome(outcome)

    def _slot_start(self, task: p.Assignment, now: float) -> float:
        for slot in self._slots:
            if slot.task is task:
                return slot.started_at
        return now

    def _start_tasks(self, now: float) -> None:
        for slot in self._slots:
            if not self._backlog:
                return
            if slot.task is None and slot.kill_reason is None and slot.process.is_alive():
                task = self._backlog.popleft()
                try:
                    slot.conn.send_bytes(pickle.dumps((task.task_id, task.name)))
                    slot.conn.send_bytes(task.fn)
                    slot.conn.send_bytes(task.args)
                except OSError:
                    self._backlog.appendleft(task)  # the executor is dying; the sentinel says so
                    continue
                slot.task = task
                slot.started_at = now
                slot.deadline = now + task.timeout_s if task.timeout_s else None

    def _read_result(self, slot: ExecutorSlot, now: float) -> None:
        try:
            data = slot.conn.recv_bytes()
        except (EOFError, OSError):
            return  # it died; its sentinel is handled below
        task_id, status, value, error, run_s = pickle.loads(data)
        task = slot.task
        slot.task = None
        slot.deadline = None
        if task is None or task.task_id != task_id:
            log.error("executor %d returned an unexpected task %s", slot.index, task_id)
            return
        info = None if error is None else p.ErrorInfo(error[0], error[1], error[2], error[3])
        if status == p.Status.OK:
            self.done += 1
        else:
            self.failed += 1
            log.info("task %s [%s] raised %s", task.name, task_id, info.type_name if info else "?")
        self._queue_outcome(p.Outcome(task_id, p.Status(status), value, info, run_s))

    def _queue_outcome(self, outcome: p.Outcome) -> None:
        self._unacked[outcome.task_id] = outcome
        self._outbox.append(outcome)

    # ------------------------------------------------------------------ broker link

    def _connect(self, now: float) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock = dealer(
            self._ctx, self.config.broker, max_message_bytes=self.config.max_message_bytes
        )
        self._broker_seen = now
        self._register(now)

    def _register(self, now: float) -> None:
        """(Re)announce ourselves with our whole free capacity, and resend unacked outcomes."""
        held = [t.task_id for t in self._backlog]
        held += [s.task.task_id for s in self._slots if s.task is not None]
        self._outstanding = max(0, self.capacity - len(held))
        ready = p.Ready(
            worker_id=self.worker_id,
            name=self.config.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=list(self.config.queues),
            concurrency=self.config.concurrency,
            credit=self._outstanding,
            held=held,
        )
        self._send(ready)
        self._outbox.clear()
        if self._unacked:
            self._send(p.Results(list(self._unacked.values()), 0))

    def _send(self, msg: p.Message) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart(p.encode(p.WORKER, msg), copy=False)
        except zmq.ZMQError as exc:
            log.warning("send to broker failed: %s", exc)
        self._last_sent = time.monotonic()

    def _on_message(self, frames: list[Any], now: float) -> None:
        try:
            signature, msg = p.decode(frames)
        except ProtocolError as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            return
        if signature != p.WORKER:
            log.warning("dropped a message with the wrong signature from the broker")
            return
        self._broker_seen = now
        if not self._broker_alive:
            self._broker_alive = True
            self._reconnect_delay = self.config.heartbeat.interval_s
        if isinstance(msg, p.Tasks):
            self._outstanding = max(0, self._outstanding - len(msg.assignments))
            self._backlog.extend(msg.assignments)
        elif isinstance(msg, p.ResultsAck):
            for task_id in msg.task_ids:
                self._unacked.pop(task_id, None)
        elif isinstance(msg, p.Abort):
            self._abort(set(msg.task_ids), now)
        elif isinstance(msg, p.Reconnect):
            log.info("broker does not know this worker; registering again")
            self._register(now)
        elif isinstance(msg, p.Welcome):
            log.info("registered with broker %s at %s", msg.broker_id, self.config.broker)
        elif isinstance(msg, p.Error):
            log.error("broker refused a message: %s: %s", msg.code, msg.message)

    def _abort(self, task_ids: set[str], now: float) -> None:
        kept: deque[p.Assignment] = deque()
        for task in self._backlog:
            if task.task_id in task_ids:
                message = f"task {task.name} [{task.task_id}] was cancelled"
                self._report(
                    task, p.Status.CANCELLED, "taskmesh.errors.TaskCancelled", message, now
                )
            else:
                kept.append(task)
        self._backlog = kept
        for slot in self._slots:
            if slot.task is not None and slot.task.task_id in task_ids:
                slot.kill(p.Status.CANCELLED)

    def _flush(self, now: float) -> None:
        held = len(self._backlog) + sum(1 for s in self._slots if s.task is not None)
        grant = self.capacity - held - self._outstanding
        if grant < 0:
            grant = 0
        if self._outbox or grant:
            if not self._broker_alive and not self._outbox:
                return
            self._outstanding += grant
            if self._outbox:
                self._send(p.Results(self._outbox, grant))
                self._outbox = []
            else:
                self._send(p.Credit(grant))

    # ------------------------------------------------------------------ the loop

    def _step(self) -> None:
        now = time.monotonic()
        hb = self.config.heartbeat
        timeout = hb.interval_s
        for slot in self._slots:
            if slot.deadline is not None:
                timeout = min(timeout, max(0.0, slot.deadline - now))
        poller = zmq.Poller()
        assert self._sock is not None
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        by_fd: dict[int, tuple[str, ExecutorSlot]] = {}
        for slot in self._slots:
            by_fd[slot.conn.fileno()] = ("conn", slot)
            by_fd[slot.process.sentinel] = ("sentinel", slot)
            poller.register(slot.conn.fileno(), zmq.POLLIN)
            poller.register(slot.process.sentinel, zmq.POLLIN)
        events = dict(poller.poll(int(timeout * 1000)))
        now = time.monotonic()
        if self._wake_r in events:
            try:
                os.read(self._wake_r, 512)
            except BlockingIOError:
                pass
        if self._sock in events:
            for _ in range(1000):
                try:
                    frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._on_message(frames, now)
        dead: list[ExecutorSlot] = []
        for fd, kind_slot in by_fd.items():
            if fd not in events:
                continue
            kind, slot = kind_slot
            if kind == "conn":
                while slot.conn.poll():
                    before = slot.task
                    self._read_result(slot, now)
                    if slot.task is before:
                        break
            if not slot.process.is_alive() and slot not in dead:
                dead.append(slot)
        for slot in self._slots:
            if slot.deadline is not None and now >= slot.deadline and slot.kill_reason is None:
                assert slot.task is not None
                log.warning(
                    "task %s [%s] exceeded its time limit of %gs; killing its executor",
                    slot.task.name,
                    slot.task.task_id,
                    slot.task.timeout_s,
                )
                slot.kill(p.Status.TIMEOUT)
        for slot in dead:
            self._executor_died(slot, now)
        self._start_tasks(now)
        self._flush(now)
        self._keepalive(now)

    def _keepalive(self, now: float) -> None:
        hb = self.config.heartbeat
        if now - self._broker_seen > hb.timeout_s:
            if self._broker_alive:
                log.warning(
                    "broker %s silent for %.1fs; reconnecting",
                    self.config.broker,
                    now - self._broker_seen,
                )
                self._broker_alive = False
                self._next_reconnect = now
            if now >= self._next_reconnect:
                self._connect(now)
                self._broker_seen = now - hb.timeout_s  # stay "lost" until the broker answers
                self._next_reconnect = now + self._reconnect_delay
                self._reconnect_delay = min(self._reconnect_delay * 2, self.config.reconnect_max_s)
            return
        if now - self._last_sent >= hb.interval_s:
            self._send(p.Heartbeat())
