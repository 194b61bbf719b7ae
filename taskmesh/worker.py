"""A worker node: one supervisor process and N executor processes.

The supervisor owns the ZeroMQ socket, the heartbeats, the credit and the time limits; it never
runs user code, so it keeps heartbeating while a task hangs or crashes its executor. Executors
are forked from a forkserver that holds no ZeroMQ context (forking a process with a live context
is undefined behaviour); ``executor_pool.py`` manages them.

Delivery rules kept here:
- Credit: the worker is the authority on its free slots. It grants the broker
  ``capacity - held - outstanding`` whenever that is positive (capacity adapts to task length:
  see ``ExecutorPool.depth``), and re-announces the whole figure in ``Ready`` after every
  (re)registration, with the ids of every task it holds or has an unacknowledged outcome for,
  so that the broker neither runs them again nor drops their outcomes as stale.
- Every outcome stays in ``_unacked`` until the broker acknowledges it, and is sent again after a
  reconnect; the broker drops duplicates by task id.
- The broker's heartbeat rules (from ``Welcome``) win over local settings.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
import uuid
from typing import Any

import zmq

from taskmesh import protocol as p
from taskmesh.config import HeartbeatConfig, WorkerConfig
from taskmesh.errors import ProtocolError, SerializationError
from taskmesh.executor import exception_mro, pickle_exception
from taskmesh.executor_pool import ExecutorPool
from taskmesh.heap import KEEPER
from taskmesh.security import client_keys
from taskmesh.serialize import qualified_name
from taskmesh.transport import HandshakeWatch, watched_dealer

log = logging.getLogger(__name__)


class WorkerNode:
    """The supervisor. ``run()`` blocks until SIGTERM/SIGINT or ``stop()``."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.worker_id = uuid.uuid4().hex
        self.heartbeat = config.heartbeat
        self._curve = client_keys(config.curve_secret, config.broker_key)
        self.pool = ExecutorPool(
            config.concurrency,
            config.name,
            max_tasks_per_child=config.max_tasks_per_child,
            max_memory_per_child_mb=config.max_memory_per_child_mb,
            preload=config.imports,
        )
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._unacked: dict[str, p.Outcome] = {}
        self._outstanding = 0  # credit granted to the broker and not yet used
        self._sock: zmq.Socket[Any] | None = None
        self._watch: HandshakeWatch | None = None
        self._broker_seen = 0.0
        self._broker_alive = False
        self._last_sent = 0.0
        self._reconnect_delay = self.heartbeat.interval_s
        self._next_reconnect = 0.0
        self._registered_at: float | None = None  # a Ready sent, its Welcome not yet seen
        self._max_message = 0  # the broker's largest message, from Welcome
        self._draining_since: float | None = None  # SIGTERM: finish what runs, take nothing new
        self._heap_tick_at = 0.0
        # no answer from the broker since: a worker pointed at the wrong address must say so
        self._lost_since = time.monotonic()
        self._refused = False  # the broker turned our key down (logged as such)
        self._silence_warning_at = self._lost_since + 2 * self.heartbeat.timeout_s
        self._released = False
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    @property
    def capacity(self) -> int:
        prefetch = self.config.prefetch
        if prefetch is None:  # the default: one task waiting per executor, so none idles
            prefetch = self.config.concurrency
        return self.pool.capacity() + prefetch

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> None:
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        old_handlers = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self.pool.start()
            self._connect(time.monotonic())
            log.info(
                "worker %s started: %d executors, queues %s, broker %s",
                self.config.name,
                self.config.concurrency,
                ",".join(self.config.queues),
                self.config.broker,
            )
            self._loop()
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
        name = signal.Signals(signum).name
        if self._draining_since is None and self.config.shutdown_grace_s > 0:
            log.info(
                "worker %s: %s received: finishing running tasks (up to %gs), handing back the "
                "rest; send it again to leave now",
                self.config.name,
                name,
                self.config.shutdown_grace_s,
            )
            self._draining_since = time.monotonic()
        else:
            log.info("worker %s: %s received, leaving now", self.config.name, name)
            self._stopping = True

    def _drain(self, now: float) -> None:
        """While draining: give back what has not started, leave when the rest is done."""
        assert self._draining_since is not None
        if self.pool.backlog or not self._released:
            # the first Release also tells the broker to send nothing more
            released = [t.task_id for t in self.pool.backlog]
            self.pool.backlog.clear()
            self._send(p.Release(released))
            self._released = True
            if released:
                log.info("worker %s: handed back %d tasks", self.config.name, len(released))
        self._outstanding = 0
        if not self.pool.held_count() and not self._unacked:
            log.info("worker %s: every running task finished; leaving", self.config.name)
            self._stopping = True
        elif now - self._draining_since > self.config.shutdown_grace_s:
            log.warning(
                "worker %s: grace period over with %d tasks still running; they are handed back",
                self.config.name,
                self.pool.held_count(),
            )
            self._stopping = True

    def _shutdown(self) -> None:
        """Leave cleanly: tell the broker (it requeues what we held), stop the executors."""
        if self._sock is not None:
            self._flush()
            self._send(p.Disconnect())
            self._sock.close(linger=500)  # give the goodbye a moment to leave
            self._sock = None
        self.pool.stop()

    def _close(self) -> None:
        if self._watch is not None:
            self._watch.close()
            self._watch = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ------------------------------------------------------------------ broker link

    def _connect(self, now: float) -> None:
        if self._watch is not None:
            self._watch.close()
        if self._sock is not None:
            self._sock.close(linger=0)
        self._sock, self._watch = watched_dealer(
            self._ctx,
            self.config.broker,
            max_message_bytes=self.config.max_message_bytes,
            curve=self._curve,
        )
        self._broker_seen = now
        self._register()

    def _register(self) -> None:
        """(Re)announce ourselves with our whole free capacity, and resend unacked outcomes."""
        for outcome in self.pool.take_outcomes():
            self._unacked[outcome.task_id] = outcome
        held = self.pool.held()
        self._outstanding = max(0, self.capacity - len(held))
        ready = p.Ready(
            worker_id=self.worker_id,
            name=self.config.name,
            host=socket.gethostname(),
            pid=os.getpid(),
            queues=list(self.config.queues),
            concurrency=self.config.concurrency,
            credit=self._outstanding,
            held=held + list(self._unacked),
            weight=self.config.weight,
        )
        self._send(ready)
        self._registered_at = time.monotonic()
        # starts said on a lost connection (or while the broker was away) are said again:
        # everything handed to an executor may have started
        started = self.pool.handed()
        if self._unacked or started:
            self._send(p.Results(list(self._unacked.values()), 0, started))

    def _send(self, msg: p.Message) -> None:
        assert self._sock is not None
        try:
            self._sock.send_multipart(p.encode(p.WORKER, msg), copy=False)
        except zmq.Again:
            pass  # the broker refused our handshake: _keepalive reports it and reconnects
        except zmq.ZMQError as exc:
            log.warning("send to broker failed: %s", exc)
        self._last_sent = time.monotonic()

    def _on_message(self, frames: list[Any], now: float) -> None:
        if len(frames) > 3:  # out-of-band payloads
            KEEPER.saw(sum(len(f) for f in frames[3:]))
        try:
            signature, msg = p.decode(frames)
        except ProtocolError as exc:
            log.warning("dropped a malformed message from the broker: %s", exc)
            return
        if signature != p.WORKER:
            log.warning("dropped a message with the wrong signature from the broker")
            return
        if isinstance(msg, p.Error) and msg.code == "forbidden":
            # not a live link: stay "lost", so that we reconnect (a new handshake picks up a
            # role granted meanwhile) with backoff
            log.error("worker %s: the broker refused this key: %s", self.config.name, msg.message)
            self._refused = True
            return
        self._broker_seen = now
        if not self._broker_alive:
            self._broker_alive = True
            self._refused = False
            self._reconnect_delay = self.heartbeat.interval_s
        if isinstance(msg, p.Tasks):
            self._outstanding = max(0, self._outstanding - len(msg.assignments))
            self.pool.offer(msg.assignments)
        elif isinstance(msg, p.ResultsAck):
            for task_id in msg.task_ids:
                self._unacked.pop(task_id, None)
        elif isinstance(msg, p.Abort):
            self.pool.abort(set(msg.task_ids), msg.terminate)
        elif isinstance(msg, p.Reconnect):
            # one Ready answers every Reconnect sent before the broker saw it
            pending = self._registered_at
            if pending is None or now - pending > self.heartbeat.timeout_s:
                log.info("broker does not know this worker; registering again")
                self._register()
        elif isinstance(msg, p.Welcome):
            log.info("registered with broker %s at %s", msg.broker_id, self.config.broker)
            self._registered_at = None
            self._max_message = msg.max_message_bytes
            self._adopt_heartbeat(msg)
        elif isinstance(msg, p.Error):
            log.error("broker refused a message: %s: %s", msg.code, msg.message)

    def _adopt_heartbeat(self, welcome: p.Welcome) -> None:
        try:
            hb = HeartbeatConfig(welcome.heartbeat_interval_s, welcome.heartbeat_liveness)
        except ValueError:
            return
        if hb != self.heartbeat:
            log.info(
                "using the broker's heartbeat: every %gs, dead after %d missed",
                hb.interval_s,
                hb.liveness,
            )
            self.heartbeat = hb

    def _flush(self, started: list[str] | None = None) -> None:
        """Send new outcomes, whatever credit the freed capacity allows and the tasks about to
        start (``ExecutorPool.pump`` calls this before it hands them over), in one message."""
        outcomes = [self._fit(o) for o in self.pool.take_outcomes()]
        for outcome in outcomes:
            self._unacked[outcome.task_id] = outcome
        grant = max(0, self.capacity - self.pool.held_count() - self._outstanding)
        if self._draining_since is not None:
            grant = 0
        if not self._broker_alive and not outcomes:
            return
        if outcomes or started:
            self._outstanding += grant
            self._send(p.Results(outcomes, grant, started or []))
        elif grant:
            self._outstanding += grant
            self._send(p.Credit(grant))

    def _announce_starts(self, task_ids: list[str]) -> None:
        self._flush(started=task_ids)

    def _fit(self, outcome: p.Outcome) -> p.Outcome:
        """An outcome too large for the broker becomes an error saying so (sent as it was, the
        broker would drop the connection, and the resend after reconnecting, forever)."""
        size = len(outcome.value)
        KEEPER.saw(size)
        limit = self._max_message
        if not limit or size <= limit - 4096:
            return outcome
        message = (
            f"the result of task [{outcome.task_id}] pickles to {size:,} bytes; "
            f"the broker accepts messages up to {limit:,} bytes (--max-message-bytes)"
        )
        info = p.ErrorInfo(
            qualified_name(SerializationError), message, "", exception_mro(SerializationError)
        )
        blob = pickle_exception(SerializationError(message))
        return p.Outcome(outcome.task_id, p.Status.ERROR, blob, info, outcome.run_s)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        poller = zmq.Poller()
        version = -1
        fds: dict[int, Any] = {}
        while not self._stopping:
            if version != self.pool.version:  # an executor was replaced: poll the new fds
                for fd in fds:
                    poller.unregister(fd)
                fds = self.pool.poll_fds()
                for fd in fds:
                    poller.register(fd, zmq.POLLIN)
                version = self.pool.version
            poller.register(self._sock, zmq.POLLIN)
            poller.register(self._wake_r, zmq.POLLIN)
            now = time.monotonic()
            timeout = self.heartbeat.interval_s
            deadline = self.pool.check_deadlines(now)
            if deadline is not None:
                timeout = min(timeout, max(0.0, deadline - now) + 0.001)
            elif self.pool.has_timed_tasks():
                timeout = min(timeout, 0.05)  # a timed task may start any moment: look often
            events = dict(poller.poll(int(timeout * 1000)))
            poller.unregister(self._sock)
            poller.unregister(self._wake_r)
            now = time.monotonic()
            if self._wake_r in events:
                try:
                    os.read(self._wake_r, 512)
                except BlockingIOError:
                    pass
            if self._sock is not None and self._sock in events:
                for _ in range(1000):
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    try:
                        self._on_message(frames, now)
                    except Exception:
                        log.exception("worker %s: failed to handle a message", self.config.name)
            ready = [fds[fd] for fd in events if fd in fds]
            try:
                if ready:
                    self.pool.on_readable(ready, now)
                self.pool.check_deadlines(now)
                if self._draining_since is not None:
                    self._drain(now)
                self.pool.pump(announce=self._announce_starts)
                self._flush()
                self._keepalive(now)
                if now >= self._heap_tick_at:
                    KEEPER.tick()
                    self._heap_tick_at = now + self.heartbeat.interval_s
            except (zmq.ContextTerminated, KeyboardInterrupt):
                raise
            except Exception:
                # a bug must not take the node down and its heartbeats with it: log, go on
                log.exception("worker %s: error in the supervisor loop", self.config.name)

    def _keepalive(self, now: float) -> None:
        hb = self.heartbeat
        if self._watch is not None and not self._broker_alive:
            refusal = self._watch.refusal()  # a refused worker keeps retrying: keys may change
            if refusal:
                log.error("worker %s: %s", self.config.name, refusal)
                self._refused = True
        if now - self._broker_seen > hb.timeout_s:
            if self._broker_alive:
                log.warning(
                    "broker %s silent for %.1fs; reconnecting",
                    self.config.broker,
                    now - self._broker_seen,
                )
                self._broker_alive = False
                self._next_reconnect = now
                self._lost_since = now
                self._silence_warning_at = now + 2 * hb.timeout_s
            elif now >= self._silence_warning_at and not self._refused:  # refusals say why
                log.warning(
                    "worker %s: no answer from broker %s for %.0fs; still trying "
                    "(is it running, and is that its address?)",
                    self.config.name,
                    self.config.broker,
                    now - self._lost_since,
                )
                self._silence_warning_at = now + 10 * hb.timeout_s
            if now >= self._next_reconnect:
                self._connect(now)
                self._broker_seen = now - hb.timeout_s  # stay "lost" until the broker answers
                self._next_reconnect = now + self._reconnect_delay
                # back off, but never so far that a restarted broker's grace period runs out
                limit = min(self.config.reconnect_max_s, hb.timeout_s)
                self._reconnect_delay = min(self._reconnect_delay * 2, limit)
            return
        if now - self._last_sent >= hb.interval_s:
            self._send(p.Heartbeat())
