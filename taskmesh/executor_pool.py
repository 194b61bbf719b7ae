"""The supervisor's side of its executor processes: feed them, collect outcomes, enforce time
limits, and replace any that die.

Short tasks are pipelined: an executor receives several tasks in one pipe message and returns
their outcomes in one, so a no-op task costs a fraction of a pipe round trip. How many tasks an
executor may hold adapts to how long tasks take (``target_backlog_s`` of work at most), so long
tasks are handed out one at a time and a worker never hoards a queue.

When an executor dies, the shared progress array says which task it was running: that one is
reported ``LOST`` (or ``TIMEOUT``/``CANCELLED`` when the supervisor killed it for that); the
others it held go back to the front of the backlog without being charged an attempt.
"""

from __future__ import annotations

import logging
import os
import select
import signal
from collections import deque
from collections.abc import Callable, Iterable
from multiprocessing.connection import Connection
from typing import Any

from taskmesh import executor as executor_module
from taskmesh import protocol as p
from taskmesh.errors import TaskCancelled, TaskTimeout, WorkerLost
from taskmesh.executor import (
    IDLE,
    LARGE_BLOB,
    PROGRESS_SEQ,
    PROGRESS_STARTED,
    exception_mro,
    from_pipe,
    out_of_band,
    recv_message,
    send_message,
    to_pipe,
)
from taskmesh.serialize import qualified_name

log = logging.getLogger(__name__)

_MAX_DEPTH = 64  # tasks one executor may hold at most


class _Executor:
    """One executor process and the tasks it holds, oldest first."""

    __slots__ = (
        "cancelled",
        "completed",
        "conn",
        "index",
        "kill_reason",
        "killed_seq",
        "process",
        "progress",
        "tasks",
    )

    def __init__(self, index: int, process: Any, conn: Connection, progress: Any) -> None:
        self.index = index
        self.process = process
        self.conn = conn
        self.progress = progress
        self.tasks: deque[tuple[int, p.Assignment]] = deque()
        self.kill_reason: p.Status | None = None
        self.killed_seq = -1
        self.cancelled: set[int] = set()
        self.completed = 0

    def running(self) -> tuple[int, float] | None:
        """The seq and start time of the task running now, if any."""
        seq = self.progress[PROGRESS_SEQ]
        if seq == IDLE:
            return None
        started = self.progress[PROGRESS_STARTED]
        if self.progress[PROGRESS_SEQ] != seq:  # it moved on while we read: read again later
            return None
        return int(seq), started

    def kill(self, reason: p.Status, seq: int) -> None:
        if self.kill_reason is None:
            self.kill_reason = reason
            self.killed_seq = seq
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "unknown"
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class ExecutorPool:
    """N executor processes behind one backlog."""

    def __init__(
        self,
        concurrency: int,
        worker_name: str,
        *,
        target_backlog_s: float = 0.005,
        mp_context: Any | None = None,
        max_tasks_per_child: int = 0,
        max_memory_per_child_mb: int = 0,
        preload: tuple[str, ...] = (),
    ) -> None:
        import multiprocessing

        self.concurrency = concurrency
        self.worker_name = worker_name
        self.target_backlog_s = target_backlog_s
        self.max_tasks_per_child = max_tasks_per_child
        self.max_memory_per_child = max_memory_per_child_mb * 1024 * 1024
        self._mp = mp_context or multiprocessing.get_context("forkserver")
        if self._mp.get_start_method() == "forkserver":
            # modules imported once in the fork server are already loaded in every executor
            self._mp.set_forkserver_preload(["taskmesh.executor", *preload])
        self._executors: list[_Executor] = []
        self.backlog: deque[p.Assignment] = deque()
        self._outcomes: list[p.Outcome] = []
        self._seq = 0
        self._timed_held = 0  # tasks with a time limit in executors' hands
        self.avg_run_s = 0.01  # pessimistic until measured: long tasks go one at a time
        self.version = 0  # bumps whenever the set of file descriptors to poll changes
        self.done = 0
        self.failed = 0
        self.stopping = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._executors = [self._spawn(i) for i in range(self.concurrency)]
        self.version += 1

    def stop(self) -> None:
        self.stopping = True
        for ex in self._executors:
            ex.kill(p.Status.CANCELLED, -1)
        for ex in self._executors:
            ex.process.join(timeout=2.0)
            ex.conn.close()

    def _spawn(self, index: int) -> _Executor:
        parent_conn, child_conn = self._mp.Pipe(duplex=True)
        progress = self._mp.RawArray("d", 2)
        progress[PROGRESS_SEQ] = IDLE
        process = self._mp.Process(
            target=executor_module.executor_main,
            args=(child_conn, progress, self.worker_name),
            name=f"taskmesh-executor-{index}",
            daemon=True,
        )
        process.start()
        child_conn.close()
        return _Executor(index, process, parent_conn, progress)

    # ------------------------------------------------------------------ queries

    def depth(self) -> int:
        """How many tasks one executor may hold: about ``target_backlog_s`` of work."""
        return max(1, min(_MAX_DEPTH, int(self.target_backlog_s / max(self.avg_run_s, 1e-6))))

    def capacity(self) -> int:
        return self.concurrency * self.depth()

    def held(self) -> list[str]:
        ids = [t.task_id for t in self.backlog]
        for ex in self._executors:
            ids.extend(task.task_id for _, task in ex.tasks)
        return ids

    def handed(self) -> list[str]:
        """The tasks given to executors: running, or queued in an executor's pipe."""
        return [task.task_id for ex in self._executors for _, task in ex.tasks]

    def held_count(self) -> int:
        return len(self.backlog) + sum(len(ex.tasks) for ex in self._executors)

    def busy(self) -> int:
        return sum(1 for ex in self._executors if ex.tasks)

    def poll_fds(self) -> dict[int, tuple[str, _Executor]]:
        fds: dict[int, tuple[str, _Executor]] = {}
        for ex in self._executors:
            fds[ex.conn.fileno()] = ("conn", ex)
            fds[ex.process.sentinel] = ("sentinel", ex)
        return fds

    def take_outcomes(self) -> list[p.Outcome]:
        outcomes, self._outcomes = self._outcomes, []
        return outcomes

    # ------------------------------------------------------------------ feeding

    def offer(self, assignments: Iterable[p.Assignment]) -> None:
        self.backlog.extend(assignments)

    def pump(self, announce: Callable[[list[str]], None] | None = None) -> None:
        """Hand backlog tasks to executors with room, one pipe message per executor.
        ``announce`` is given the ids of every task about to be handed over, before any is:
        the broker must hear of a start before it can happen (see ``Results.started``)."""
        if not self.backlog:
            return
        depth = self.depth()
        handoffs: list[tuple[_Executor, list[tuple[int, str, str, Any, Any, Any]]]] = []
        # idle executors first, so a lone long task never waits behind another
        for ex in sorted(self._executors, key=lambda e: len(e.tasks)):
            if not self.backlog:
                break
            room = depth - len(ex.tasks)
            if room <= 0 or ex.kill_reason is not None:
                continue
            batch: list[tuple[int, str, str, Any, Any, Any]] = []
            while self.backlog and room > 0:
                task = self.backlog[0]
                large = len(task.fn) + len(task.args) + _deps_size(task) > LARGE_BLOB
                if large and (ex.tasks or batch):
                    # a big payload only goes to an idle executor, alone: writing it to a busy
                    # one would block this loop (and its heartbeats) until that one reads it
                    break
                self.backlog.popleft()
                self._seq += 1
                ex.tasks.append((self._seq, task))
                if task.timeout_s:
                    self._timed_held += 1
                batch.append(
                    (
                        self._seq,
                        task.task_id,
                        task.name,
                        out_of_band(task.fn),
                        to_pipe(task.args),
                        tuple((dep_id, to_pipe(value)) for dep_id, value in task.deps),
                    )
                )
                room -= 1
                if large:
                    break
            if batch:
                handoffs.append((ex, batch))
        if not handoffs:
            return
        if announce is not None:
            announce([item[1] for _, batch in handoffs for item in batch])
        for ex, batch in handoffs:
            try:
                send_message(ex.conn, batch)
            except OSError:
                # it is dying; its sentinel will say so and the tasks go back then
                continue

    # ------------------------------------------------------------------ events

    def on_readable(self, ready: Iterable[tuple[str, _Executor]], now: float) -> None:
        dead: list[_Executor] = []
        for kind, ex in ready:
            if kind == "conn":
                self._read(ex)
                self._retire_if_spent(ex)
            # only a readable sentinel means an exit: is_alive() builds a selector every call
            elif not ex.process.is_alive() and ex not in dead:
                dead.append(ex)
        for ex in dead:
            self._died(ex)

    def _retire_if_spent(self, ex: _Executor) -> None:
        """Replace an idle executor that ran its quota of tasks or grew past its memory cap
        (leaky libraries, fragmented heaps): the same as Celery's per-child limits."""
        if ex.tasks or ex.kill_reason is not None:
            return
        why = ""
        if self.max_tasks_per_child and ex.completed >= self.max_tasks_per_child:
            why = f"after {ex.completed} tasks"
        elif self.max_memory_per_child:
            rss = _rss_bytes(ex.process.pid)
            if rss > self.max_memory_per_child:
                why = f"at {rss / 2**20:.0f} MB"
        if why:
            log.info("replacing executor %d %s", ex.index, why)
            ex.kill(p.Status.CANCELLED, -1)  # it holds no task: nothing is reported

    def _read(self, ex: _Executor) -> None:
        # Connection.poll() builds a selector on every call: a poll object of our own is a tenth
        # of that (and, unlike select, takes any descriptor number), and this runs for every
        # batch of outcomes
        if ex.conn.closed:
            return
        readable = select.poll()
        readable.register(ex.conn.fileno(), select.POLLIN)
        while True:
            try:
                if not readable.poll(0):
                    return
                results = recv_message(ex.conn)
            except (EOFError, OSError):
                return
            for seq, status, value, error, run_s in results:
                if not ex.tasks or ex.tasks[0][0] != seq:
                    log.error("executor %d returned task seq %s out of order", ex.index, seq)
                    continue
                _, task = ex.tasks.popleft()
                if task.timeout_s:
                    self._timed_held -= 1
                ex.completed += 1
                self.avg_run_s += 0.2 * (run_s - self.avg_run_s)
                if seq in ex.cancelled:
                    ex.cancelled.discard(seq)
                    self._report(task, p.Status.CANCELLED, TaskCancelled, "was cancelled", run_s)
                    continue
                info = None if error is None else p.ErrorInfo(*error)
                if status == p.Status.OK:
                    self.done += 1
                else:
                    self.failed += 1
                    log.info(
                        "task %s [%s] raised %s",
                        task.name,
                        task.task_id,
                        info.type_name if info else "?",
                    )
                outcome = p.Outcome(
                    task.task_id, p.STATUS_OF[status], from_pipe(value), info, run_s
                )
                self._outcomes.append(outcome)

    def _died(self, ex: _Executor) -> None:
        ex.process.join(timeout=1.0)
        self._read(ex)  # outcomes it flushed before dying still count
        seq = ex.killed_seq if ex.kill_reason is not None else -1
        running = ex.running()
        if seq < 0 and running is not None:
            seq = running[0]
        held = list(ex.tasks)
        ex.tasks.clear()
        self._timed_held -= sum(1 for _, task in held if task.timeout_s)
        ex.conn.close()
        how = _signal_name(ex.process.exitcode)
        back: list[p.Assignment] = []
        for task_seq, task in held:
            if task_seq != seq and task_seq in ex.cancelled:
                self._report(task, p.Status.CANCELLED, TaskCancelled, "was cancelled")
                continue
            if task_seq != seq:
                back.append(task)  # finished unreported, or never started: run it (again) here
                continue
            if ex.kill_reason is p.Status.TIMEOUT:
                limit = f"{task.timeout_s:g}s" if task.timeout_s else "its time limit"
                self._report(
                    task,
                    p.Status.TIMEOUT,
                    TaskTimeout,
                    f"exceeded its time limit of {limit} on worker {self.worker_name}",
                )
            elif ex.kill_reason is p.Status.CANCELLED:
                self._report(task, p.Status.CANCELLED, TaskCancelled, "was cancelled while running")
            else:
                log.warning(
                    "the executor running task %s [%s] died (%s)", task.name, task.task_id, how
                )
                self._report(
                    task,
                    p.Status.LOST,
                    WorkerLost,
                    f"was running when its executor on worker {self.worker_name} died ({how})",
                )
        if not self.stopping:
            self.backlog.extendleft(reversed(back))
            self._executors[ex.index] = self._spawn(ex.index)
            self.version += 1

    def _report(
        self,
        task: p.Assignment,
        status: p.Status,
        error_type: type[BaseException],
        what: str,
        run_s: float = 0.0,
    ) -> None:
        message = f"task {task.name} [{task.task_id}] {what}"
        info = p.ErrorInfo(qualified_name(error_type), message, "", exception_mro(error_type))
        if status is not p.Status.LOST and status is not p.Status.CANCELLED:
            self.failed += 1
        self._outcomes.append(p.Outcome(task.task_id, status, b"", info, run_s))

    # ------------------------------------------------------------------ control

    def check_deadlines(self, now: float) -> float | None:
        """Kill executors whose running task overran; return the next deadline, if any."""
        soonest: float | None = None
        for ex in self._executors:
            if ex.kill_reason is not None or not ex.tasks:
                continue
            running = ex.running()
            if running is None:
                continue
            seq, started = running
            task = next((t for s, t in ex.tasks if s == seq), None)
            if task is None or not task.timeout_s:
                continue
            deadline = started + task.timeout_s
            if now >= deadline:
                log.warning(
                    "task %s [%s] exceeded its time limit of %gs; killing its executor",
                    task.name,
                    task.task_id,
                    task.timeout_s,
                )
                ex.kill(p.Status.TIMEOUT, seq)
            elif soonest is None or deadline < soonest:
                soonest = deadline
        return soonest

    def has_timed_tasks(self) -> bool:
        # a count kept as tasks come and go: the supervisor asks on every loop iteration, and
        # a scan of every held task (hundreds, for short tasks) cost more than the answer
        return self._timed_held > 0

    def abort(self, task_ids: set[str], terminate: bool = True) -> None:
        """Cancel tasks here: drop them from the backlog and, with ``terminate``, kill the
        executor running one (a task already handed to an executor otherwise runs)."""
        kept: deque[p.Assignment] = deque()
        for task in self.backlog:
            if task.task_id in task_ids:
                self._report(task, p.Status.CANCELLED, TaskCancelled, "was cancelled")
            else:
                kept.append(task)
        self.backlog = kept
        if not terminate:
            return
        for ex in self._executors:
            running = ex.running()
            for seq, task in ex.tasks:
                if task.task_id not in task_ids:
                    continue
                if running is not None and running[0] == seq:
                    ex.kill(p.Status.CANCELLED, seq)
                else:
                    ex.cancelled.add(seq)  # queued in its pipe: report it cancelled when done


def _deps_size(task: p.Assignment) -> int:
    return sum(len(value) for _, value in task.deps) if task.deps else 0
