"""The broker shell: one ROUTER socket, one poll loop, the ``Scheduler`` making every decision.

Each loop iteration drains every message that is waiting (up to a bound), feeds them to the
scheduler, runs the periodic tick when it is due, and then sends everything the scheduler
batched. A malformed message is logged and answered with an ``Error`` where the peer can be
addressed; nothing a peer sends can stop the loop. Payloads are opaque bytes: the broker never
unpickles them, so it never runs user code.

With ``curve_secret`` the socket is a CurveZMQ server: the same loop answers the ZAP requests
(``security.ZapHandler``), and every message is checked against its key's roles before the
scheduler sees it (``_refusal``); see docs/security.md.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import signal
import sqlite3
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any

import zmq

from taskmesh import protocol as p
from taskmesh.config import BrokerConfig
from taskmesh.errors import ProtocolError, TaskmeshError
from taskmesh.heap import KEEPER
from taskmesh.journal import FinishedTask, Journal, JournalBatch, MemoryJournal, open_journal
from taskmesh.metrics import BrokerCollector
from taskmesh.metrics import serve as serve_metrics
from taskmesh.scheduler import Route, Scheduler, SchedulerConfig, Send
from taskmesh.security import (
    KEY_PROPERTY,
    KeyRing,
    Role,
    ZapHandler,
    load_secret_key,
    make_server,
    may_send,
    parse_roles,
    roles_text,
)
from taskmesh.transport import check_endpoint

log = logging.getLogger(__name__)

_DRAIN = 2000  # messages handled per loop iteration before sending
# how long the journal thread, idle, holds run outcomes back for a DELIVERED to make them moot
_HOLD_S = 0.005


def is_loopback(url: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if url.startswith(("ipc://", "inproc://")):
        return True
    host = url[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class Broker:
    """Runs until SIGTERM/SIGINT or ``stop()``."""

    def __init__(self, config: BrokerConfig) -> None:
        check_endpoint(config.bind, what="bind address")
        if not is_loopback(config.bind) and not config.insecure and not config.curve_secret:
            raise TaskmeshError(
                f"refusing to bind {config.bind} without keys: anyone who can reach it could run "
                "code on every worker. Bind a loopback address, set up keys (--curve-secret with "
                "--producers and --workers; see docs/security.md), or pass --insecure on a "
                "trusted network."
            )
        self.config = config
        self.keyring = _keyring(config)  # None: plain text
        server_keys = load_secret_key(config.curve_secret) if config.curve_secret else None
        self.broker_id = uuid.uuid4().hex[:12]
        hb = config.heartbeat
        try:
            self.journal = open_journal(config.journal, synchronous=config.journal_sync)
            recovery = self.journal.load()
        except (OSError, ValueError, sqlite3.Error) as exc:
            raise TaskmeshError(f"cannot open journal {config.journal}: {exc}") from None
        self.scheduler = Scheduler(
            SchedulerConfig(
                heartbeat_interval_s=hb.interval_s,
                heartbeat_liveness=hb.liveness,
                result_ttl_s=config.result_ttl_s,
                max_message_bytes=config.max_message_bytes,
                routes=parse_routes(config.routes),
                priority_aging_s=config.priority_aging_s,
                journaled=not isinstance(self.journal, MemoryJournal),
            ),
            broker_id=self.broker_id,
            wall_offset=time.time() - time.monotonic(),
        )
        self.scheduler.restore(recovery, time.monotonic())
        if recovery.pending or recovery.finished:
            log.info(
                "journal %s recovered %d unfinished tasks and %d undelivered outcomes",
                config.journal,
                len(recovery.pending),
                len(recovery.finished),
            )
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.SNDHWM, 0)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self._sock.setsockopt(zmq.MAXMSGSIZE, config.max_message_bytes)
        self._zap: ZapHandler | None = None
        if self.keyring is not None and server_keys is not None:
            # the handler first: a CURVE socket bound with no ZAP handler lets everyone in
            self._zap = ZapHandler(self._ctx, self.keyring)
            make_server(self._sock, *server_keys)
        self._forbidden_logged: set[bytes] = set()  # peers whose refusal is logged
        self._reload_keys = False
        self._keys_checked = 0.0
        bind = config.bind
        if bind.startswith("tcp://") and bind.endswith(":0"):
            bind = bind[:-2] + ":*"
        try:
            self._sock.bind(bind)
        except zmq.ZMQError as exc:
            self._close_sockets_and_journal()
            raise TaskmeshError(f"cannot bind {config.bind}: {exc}") from None
        self.endpoint: str = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.started_at = time.monotonic()
        self._stopping = False
        self._writer: JournalWriter | None = None
        self.failed = False  # the journal failed: the broker stopped rather than lie
        self._metrics: BrokerCollector | None = None
        self._stop_metrics: Callable[[], None] | None = None
        if config.metrics_port is not None:
            self._metrics = BrokerCollector()
            try:
                self._stop_metrics = serve_metrics(
                    self._metrics, config.metrics_port, config.metrics_host
                )
            except OSError as exc:
                self._close_sockets_and_journal()
                raise TaskmeshError(
                    f"cannot serve metrics on {config.metrics_host}:{config.metrics_port}: {exc}"
                ) from None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    def _close_sockets_and_journal(self) -> None:
        """What the constructor opened: closed when it gives up, or when ``run()`` ends."""
        self._sock.close(0)
        if self._zap is not None:
            self._zap.close()
        self._ctx.term()
        self.journal.close()

    def stop(self) -> None:
        self._stopping = True
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass

    def run(self) -> None:
        in_main = _in_main_thread()
        old_handlers: dict[signal.Signals, Any] = {}
        old_wakeup = -1
        if in_main:
            old_wakeup = signal.set_wakeup_fd(self._wake_w)
            for sig in (signal.SIGTERM, signal.SIGINT):
                old_handlers[sig] = signal.signal(sig, lambda s, f: self.stop())
            # SIGHUP re-reads the key folders; without keys it must not kill the broker either
            # (the systemd units' reload sends it)
            old_handlers[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_sighup)
        try:
            if self.config.port_file:  # once signals are ours: it says we are up
                try:
                    _write_atomically(self.config.port_file, self.endpoint + "\n")
                except OSError as exc:
                    raise TaskmeshError(
                        f"cannot write the port file {self.config.port_file}: {exc.strerror or exc}"
                    ) from None
            log.info(
                "broker %s listening on %s (journal %s)",
                self.broker_id,
                self.endpoint,
                self.config.journal,
            )
            if self.keyring is not None:
                log.info(
                    "CurveZMQ on: peers must hold a key from %s",
                    ", ".join(f"{r.value}s {d}" for r, d in self.keyring.folders.items()),
                )
            if not isinstance(self.journal, MemoryJournal):
                self._writer = JournalWriter(self.journal, self._wake_w)
            self._loop()
        finally:
            if self._writer is not None:
                for ready in self._writer.close():
                    for send in ready:
                        self._send(send)
            if in_main:
                signal.set_wakeup_fd(old_wakeup)
                for sig, handler in old_handlers.items():
                    signal.signal(sig, handler)
            self._close_sockets_and_journal()
            os.close(self._wake_r)
            os.close(self._wake_w)
            if self._stop_metrics is not None:
                self._stop_metrics()
            log.info("broker %s stopped", self.broker_id)

    def _loop(self) -> None:
        sched = self.scheduler
        interval = self.config.heartbeat.interval_s
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        if self._zap is not None:
            poller.register(self._zap.socket, zmq.POLLIN)
        next_tick = time.monotonic() + interval
        while not self._stopping:
            now = time.monotonic()
            wait = next_tick - now
            due = sched.next_deadline(now)
            if due is not None:
                wait = min(wait, due - now)
            events = dict(poller.poll(int(max(0.0, wait) * 1000)))
            if self._wake_r in events:
                try:
                    os.read(self._wake_r, 512)
                except BlockingIOError:
                    pass
            now = time.monotonic()
            if self._zap is not None:
                self._serve_keys(events, now)
            sends: list[Send] = []
            if self._sock in events:
                for _ in range(_DRAIN):
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    sends.extend(self._on_frames(frames, now))
            if now >= next_tick:
                sends.extend(self._tick(now))
                next_tick = now + interval
            elif due is not None and now >= due:
                sched.due(now)  # delayed tasks and periodic ticks: no heartbeats between
            sends.extend(sched.flush(now))
            if sched.notices:
                for level, message, args in sched.notices:
                    log.log(level, message, *args)
                sched.notices.clear()
            batch = sched.take_journal()
            if self._writer is None:
                for send in sends:
                    self._send(send)
            elif batch or (sends and self._writer.in_flight):
                gated, late = [], []
                for send in sends:
                    if send.early:  # outcomes of runs: see scheduler.RAN_OUTCOMES
                        self._send(send)
                    elif isinstance(send.message, p.ResultsAck):
                        late.append(send)  # waits for the outcomes it acknowledges
                    else:
                        gated.append(send)
                if batch or gated or late:
                    self._writer.submit(batch, gated, late)  # sent once the batch is durable
            else:
                for send in sends:  # nothing to persist and nothing ahead of it: send now
                    self._send(send)
            if self._writer is not None:
                for ready in self._writer.take_ready():
                    for send in ready:
                        self._send(send)
                if self._writer.failed:
                    # nothing unpersisted may be acknowledged: stop rather than lie
                    log.critical("journal write failed; stopping the broker")
                    self.failed = True
                    self._stopping = True

    def _tick(self, now: float) -> list[Send]:
        sched = self.scheduler
        sends = sched.tick(now)
        KEEPER.tick()
        if self._metrics is not None:
            snapshot = sched.snapshot(now)
            snapshot["broker"] = self._broker_info()
            histograms = {"queue_wait": sched.queue_wait, "run": sched.run_time}
            commit_time = getattr(self.journal, "commit_time", None)
            if commit_time is not None:
                histograms["journal_commit"] = commit_time
            self._metrics.publish(snapshot, histograms)
        return sends

    def _on_frames(self, frames: list[Any], now: float) -> list[Send]:
        if len(frames) < 2:
            return []
        address = frames[0].bytes
        limit = self.config.max_message_bytes
        size = sum(len(f) for f in frames) if len(frames) > 4 else 0  # out-of-band payloads
        if limit and size > limit:
            # MAXMSGSIZE bounds each frame; a payload split over many frames is bounded here
            log.warning("dropped a message of %d frames over --max-message-bytes", len(frames))
            sig = bytes(frames[1].bytes[:4])
            if sig in p.SIGNATURES:
                return [Send(address, sig, p.Error("protocol", "message over the size limit"))]
            return []
        try:
            signature, msg = p.decode(frames[1:])
        except ProtocolError as exc:
            log.warning("dropped a malformed message: %s", exc)
            sig = bytes(frames[1].bytes[:4]) if len(frames) > 1 else b""
            if sig in p.SIGNATURES:
                return [Send(address, sig, p.Error("protocol", str(exc)))]
            return []
        if not p.allowed(signature, msg):
            log.warning("dropped a %s message sent as %r", msg.KIND.name, signature)
            return [Send(address, signature, p.Error("protocol", f"{msg.KIND.name} not allowed"))]
        if self.keyring is not None:
            refusal = self._refusal(frames[1], signature, msg.KIND)
            if refusal is not None:
                return [self._forbid(address, frames[1], signature, msg, refusal)]
        KEEPER.saw(size)
        try:
            return self.scheduler.handle(address, signature, msg, now)
        except Exception:
            # a scheduler bug must not take the mesh down: log it loudly and go on
            log.exception("broker failed to handle a %s message", msg.KIND.name)
            return [Send(address, signature, p.Error("internal", "the broker failed to handle it"))]

    # ------------------------------------------------------------------ keys and roles

    def _on_sighup(self, signum: int, frame: Any) -> None:
        if self.keyring is None:
            log.info("SIGHUP: no key folders to reload")
            return
        self._reload_keys = True
        try:
            os.write(self._wake_w, b"h")
        except OSError:
            pass

    def _serve_keys(self, events: dict[Any, int], now: float) -> None:
        """Answer handshakes; re-read the key folders on SIGHUP, and once per heartbeat
        interval if they changed (a handshake re-reads them too)."""
        assert self._zap is not None and self.keyring is not None
        if self._reload_keys:
            self._reload_keys = False
            log.info("SIGHUP: reloading the allowed keys")
            self.keyring.refresh(force=True)
            self._keys_checked = now
        elif now - self._keys_checked >= self.config.heartbeat.interval_s:
            self.keyring.refresh()
            self._keys_checked = now
        if self._zap.socket in events:
            self._zap.handle()

    def _refusal(self, frame: Any, signature: bytes, kind: p.Kind) -> str | None:
        """Why this peer may not send ``kind``, or ``None``. The roles are those its key had
        at the handshake (User-Id) and still has now (a removed key loses them at once), never
        what the message's signature claims."""
        assert self.keyring is not None
        try:
            granted = parse_roles(frame.get("User-Id"))
            key: str = frame.get(KEY_PROPERTY)
        except zmq.ZMQError:
            return "the connection carries no authenticated key"
        roles = granted & self.keyring.roles_of(key.encode())
        if not roles:
            return "the key is no longer allowed"
        if not may_send(roles, signature, kind):
            claimed = "worker" if signature == p.WORKER else "producer"
            return f"a {roles_text(roles)} key may not send {kind.name} as a {claimed}"
        return None

    def _forbid(
        self, address: bytes, frame: Any, signature: bytes, msg: p.Message, reason: str
    ) -> Send:
        if address not in self._forbidden_logged:  # once per connection: no log floods
            if len(self._forbidden_logged) > 10_000:
                self._forbidden_logged.clear()
            self._forbidden_logged.add(address)
            try:
                peer = f"{frame.get('Peer-Address')} with key {frame.get(KEY_PROPERTY)}"
            except zmq.ZMQError:
                peer = "a peer"
            log.warning("refused %s from %s: %s", msg.KIND.name, peer, reason)
        task_ids = [t.task_id for t in msg.tasks] if isinstance(msg, p.Submit) else []
        return Send(address, signature, p.Error("forbidden", reason, task_ids))

    def _broker_info(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "journal": self.config.journal,
            "journal_commits": getattr(self.journal, "commits", 0),
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "wall_time": round(time.time(), 3),
        }

    def _send(self, send: Send) -> None:
        msg = send.message
        if isinstance(msg, p.StatusReply):
            msg.snapshot["broker"] = self._broker_info()
        try:
            self._sock.send_multipart([send.address, *p.encode(send.signature, msg)], copy=False)
        except zmq.ZMQError as exc:
            log.debug("send to a peer failed: %s", exc)


class JournalWriter:
    """Writes journal batches on a thread of its own, so that one batch's fsync overlaps the
    broker's work on the next. Each batch travels with the sends of its loop iteration, and
    those are handed back only once the batch, and every batch before it, is durable: no
    acknowledgement ever runs ahead of the journal, and sends keep their order.

    The outcomes of runs that nothing depends on (``FinishedTask.hold``) are the exception
    that saves most writes: their producers have them already, so the thread holds their rows
    back for ``_HOLD_S``, and by then a ``DELIVERED`` has usually made them moot. The
    ``RESULTS_ACK``s (``late`` sends) wait for them, and keep their order behind them; the
    worker keeps each outcome until then, and resends it to a restarted broker. A task about to
    use a held outcome (``JournalBatch.durable``) has it written in its own transaction.
    """

    def __init__(self, journal: Journal, wake_fd: int) -> None:
        self._journal = journal
        self._wake_fd = wake_fd
        self._queue: queue.SimpleQueue[_Item | None] = queue.SimpleQueue()
        self._ready: deque[tuple[list[Send], int]] = deque()  # sends, iterations completed
        self.in_flight = 0  # iterations whose sends are not all handed back yet
        self.failed = False
        self._thread = threading.Thread(target=self._run, name="taskmesh-journal", daemon=True)
        self._thread.start()

    def submit(self, batch: JournalBatch, sends: list[Send], late: list[Send]) -> None:
        self.in_flight += 1
        self._queue.put((batch, sends, late))

    def take_ready(self) -> list[list[Send]]:
        ready = []
        while self._ready:
            sends, completed = self._ready.popleft()
            ready.append(sends)
            self.in_flight -= completed
        return ready

    def close(self) -> list[list[Send]]:
        """Finish what is queued and stop; returns the sends released meanwhile."""
        self._queue.put(None)
        self._thread.join(timeout=30.0)
        return self.take_ready()

    def _run(self) -> None:
        try:
            self._write_batches()
        except Exception:  # a bug here must stop the broker, not leave its sends stuck
            log.critical("journal thread failed", exc_info=True)
            self.failed = True
            self._wake_loop()

    def _wake_loop(self) -> None:
        try:
            os.write(self._wake_fd, b"j")
        except OSError:
            pass  # the pipe is full: the loop is awake already

    def _write_batches(self) -> None:
        held: dict[int, FinishedTask] = {}  # run outcomes not written yet, by seq
        # per loop iteration that had to wait: when due, the seqs it waits for, its late sends
        waiting: deque[tuple[float, list[int], list[Send]]] = deque()
        stop = False
        while not stop and not self.failed:
            # everything queued while the last commit ran goes into one transaction
            timeout = max(0.0, waiting[0][0] - time.monotonic()) if waiting else None
            items, stop = self._take(timeout)
            now = time.monotonic()
            merged = JournalBatch()
            ready: list[Send] = []
            completed = 0
            for batch, sends, late in items:
                ready.extend(sends)
                seqs: list[int] = []
                if batch.finished and not stop:
                    written = []
                    for finished in batch.finished:
                        if finished.hold:
                            held[finished.seq] = finished
                            seqs.append(finished.seq)
                        else:
                            written.append(finished)
                    batch.finished = written
                for seq in batch.forgotten:
                    held.pop(seq, None)  # delivered first: never written
                # a task is about to use these outcomes: written now
                batch.finished += _unhold(held, batch.durable)
                merged.extend(batch)
                if seqs or waiting:  # late sends keep their order behind those waiting
                    waiting.append((now + _HOLD_S, seqs, late))
                else:
                    ready.extend(late)
                    completed += 1
            # due, or every outcome it waited for written or delivered (oldest first: in order)
            while waiting and (
                stop or waiting[0][0] <= now or not any(seq in held for seq in waiting[0][1])
            ):
                _, seqs, late = waiting.popleft()
                merged.finished += _unhold(held, seqs)
                ready.extend(late)
                completed += 1
            merged.coalesce()
            try:
                if merged:
                    self._journal.write(merged)
            except Exception:
                log.critical("journal write failed", exc_info=True)
                self.failed = True
            else:
                self._ready.append((ready, completed))
            self._wake_loop()

    def _take(self, timeout: float | None) -> tuple[list[_Item], bool]:
        """Everything queued, waiting up to ``timeout`` for the first; True once told to stop."""
        items: list[_Item] = []
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return items, False
        while item is not None:
            items.append(item)
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return items, False
        return items, True


_Item = tuple[JournalBatch, list[Send], list[Send]]


def _unhold(held: dict[int, FinishedTask], seqs: list[int]) -> list[FinishedTask]:
    """Take these outcomes out of ``held`` (those still there) to be written."""
    return [row for seq in seqs if (row := held.pop(seq, None)) is not None]


def _keyring(config: BrokerConfig) -> KeyRing | None:
    folders = {
        role: folder
        for role, folder in (
            (Role.PRODUCER, config.producers),
            (Role.WORKER, config.workers),
            (Role.READER, config.readers),
        )
        if folder
    }
    if not config.curve_secret:
        if folders:
            raise TaskmeshError("key folders need --curve-secret, the broker's own secret key")
        return None
    if not folders:
        raise TaskmeshError("--curve-secret needs allowed keys: --producers DIR and --workers DIR")
    return KeyRing(folders)


def parse_routes(routes: tuple[tuple[str, str], ...]) -> tuple[tuple[str, Route], ...]:
    """Check ``(queue, strategy)`` pairs; an unknown strategy is a clear error."""
    parsed = []
    for name, strategy in routes:
        try:
            parsed.append((name, Route(strategy)))
        except ValueError:
            choices = ", ".join(r.value for r in Route)
            raise ValueError(
                f"unknown routing strategy {strategy!r} for queue {name!r}; choose {choices}"
            ) from None
    return tuple(parsed)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _write_atomically(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
