"""The broker's durable record: what was promised to producers survives a broker restart.

A small, batch-oriented interface: the broker hands ``write`` one ``JournalBatch`` per loop
iteration (group commit) and acknowledges nothing before ``write`` returns. ``load`` gives back,
after a restart, every task that had not finished and every outcome not yet delivered.

Nothing here is SQLite-specific but ``SqliteJournal``: rows are keyed by the broker's own
sequence number for each task (unique, and increasing, so inserts append and every later change
finds its row without a second index; the broker already refuses a task id it holds, so a
producer that resends after a lost ack creates no second row), and every operation is a batch,
so a shared PostgreSQL journal can implement the same interface. Times are wall-clock seconds
(they must survive a reboot); the scheduler converts to and from its monotonic clock.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sqlite3
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

from taskmesh.histogram import Histogram
from taskmesh.protocol import (
    Outcome,
    PeriodicTask,
    TaskSpec,
    pack_outcome,
    pack_periodic,
    pack_task,
    unpack_outcome,
    unpack_periodic,
    unpack_task,
)

log = logging.getLogger(__name__)


@dataclass(slots=True)  # not frozen: one is built per task, and frozen costs 3x
class PendingTask:
    """A task that had not finished: it is queued again on recovery."""

    spec: TaskSpec
    client_id: str
    seq: int
    lost: int = 0
    errors: int = 0
    not_before: float | None = None  # wall time


@dataclass(slots=True)
class FinishedTask:
    """A task whose outcome its producer may not have received yet."""

    task_id: str
    client_id: str
    state: str
    outcome: Outcome
    finished_at: float  # wall time
    seq: int  # the row to update: the broker's sequence number for this task
    # its producer has it already and no task depends on it: the journal may hold the row back
    # a moment, for a DELIVERED to make it moot (see broker.JournalWriter)
    hold: bool = False


@dataclass(frozen=True, slots=True)
class StoredSchedule:
    """A periodic task and where its clock stands; written in the same transaction as the run
    it just submitted, so a restart neither repeats nor loses a tick."""

    periodic: PeriodicTask
    next_at: float  # wall time of the next tick
    runs: int = 0
    skipped: int = 0  # ticks passed over by the catch-up rule
    last_run_at: float | None = None  # wall time of the tick last run
    last_task_id: str = ""


@dataclass(slots=True)
class JournalBatch:
    """Everything one broker loop iteration changed, written in one transaction."""

    submitted: list[PendingTask] = field(default_factory=list)
    # (seq, lost, errors, not_before): a task's spent budgets after a requeue
    requeued: list[tuple[int, int, int, float | None]] = field(default_factory=list)
    finished: list[FinishedTask] = field(default_factory=list)
    forgotten: list[int] = field(default_factory=list)  # seqs of tasks to drop
    # seqs whose held outcome must be in this transaction: a task about to use it is sent after
    durable: list[int] = field(default_factory=list)
    # by name: the schedule's new state, or None once it is removed; applied in order
    schedules: list[tuple[str, StoredSchedule | None]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(
            self.submitted
            or self.requeued
            or self.finished
            or self.forgotten
            or self.schedules
            or self.durable
        )

    def extend(self, other: JournalBatch) -> None:
        """Append a later batch: applying the result equals applying both in order."""
        self.submitted.extend(other.submitted)
        self.requeued.extend(other.requeued)
        self.finished.extend(other.finished)
        self.forgotten.extend(other.forgotten)
        self.schedules.extend(other.schedules)
        self.durable.extend(other.durable)

    def coalesce(self) -> None:
        """Drop what a forget in the same batch makes moot: the forgotten task's outcome and
        requeues, and, if the task was submitted in this batch too, its row altogether.

        Forgetting is the last thing that happens to a task (its seq is never used again), so
        the result equals applying the batch as it was. Under load most outcomes are delivered
        while the journal thread is busy with the previous commit, and the write of each of
        those outcomes is saved."""
        if not self.forgotten:
            return
        gone = set(self.forgotten)
        if self.finished:
            self.finished = [f for f in self.finished if f.seq not in gone]
        if self.requeued:
            self.requeued = [r for r in self.requeued if r[0] not in gone]
        if self.submitted:
            never_written = {t.seq for t in self.submitted if t.seq in gone}
            if never_written:
                self.submitted = [t for t in self.submitted if t.seq not in never_written]
                self.forgotten = [seq for seq in self.forgotten if seq not in never_written]


@dataclass(frozen=True, slots=True)
class Recovery:
    pending: list[PendingTask]
    finished: list[FinishedTask]
    schedules: list[StoredSchedule] = field(default_factory=list)
    last_seq: int = -1  # the highest seq in the journal, readable or not: never to be reused


class Journal(ABC):
    """The durable store behind the broker."""

    path: str = ":memory:"

    @abstractmethod
    def load(self) -> Recovery:
        """Everything to restore after a restart."""

    @abstractmethod
    def write(self, batch: JournalBatch) -> None:
        """Apply a batch atomically; durable when this returns."""

    def close(self) -> None:  # noqa: B027 - optional for stores with nothing to release
        """Flush and release the store."""


class MemoryJournal(Journal):
    """No persistence (``--journal :memory:``): a broker restart loses every task."""

    def load(self) -> Recovery:
        return Recovery([], [])

    def write(self, batch: JournalBatch) -> None:
        return None


_TASKS_TABLE = """
CREATE TABLE IF NOT EXISTS tasks (
    seq         INTEGER PRIMARY KEY,
    task_id     TEXT NOT NULL,
    client_id   TEXT NOT NULL,
    spec        BLOB NOT NULL,
    lost        INTEGER NOT NULL DEFAULT 0,
    errors      INTEGER NOT NULL DEFAULT 0,
    not_before  REAL,
    state       TEXT NOT NULL DEFAULT 'pending',
    outcome     BLOB,
    finished_at REAL,
    fn_ref      BLOB
);
"""

_SCHEMA = (
    _TASKS_TABLE
    + """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS functions (
    digest BLOB PRIMARY KEY,
    body   BLOB NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS schedules (
    name     TEXT PRIMARY KEY,
    periodic BLOB NOT NULL,
    next_at  REAL NOT NULL,
    runs     INTEGER NOT NULL DEFAULT 0,
    skipped  INTEGER NOT NULL DEFAULT 0,
    last_run_at  REAL,
    last_task_id TEXT NOT NULL DEFAULT ''
);
"""
)

SCHEMA_VERSION = "3"

# schema 1 keyed tasks by task id: a second B-tree, written at a random place by every insert,
# update and delete, cost twice the CPU of the rowid key it has now (same columns otherwise).
# Its seq column was not unique, so rows are numbered afresh, in the same order.
_MIGRATE_FROM_1 = (
    "ALTER TABLE tasks RENAME TO tasks_schema1;"
    + _TASKS_TABLE
    + """
INSERT INTO tasks
    (seq, task_id, client_id, spec, lost, errors, not_before, state, outcome, finished_at)
    SELECT row_number() OVER (ORDER BY seq, rowid) - 1,
        task_id, client_id, spec, lost, errors, not_before, state, outcome, finished_at
    FROM tasks_schema1;
DROP TABLE tasks_schema1;
"""
)
# schema 2 kept every task's function pickle in its row: 460 bytes for a function defined in a
# script's __main__, most of each row, and 15 % of the throughput with the journal on
_MIGRATE_FROM_2 = "ALTER TABLE tasks ADD COLUMN fn_ref BLOB;"


# Rows go in as one multi-row statement per chunk, not one ``executemany`` step per row: the
# sqlite3 module lets go of the interpreter lock around every step, and each step then waits for
# the broker's loop to hand it back, so a busy broker made the journal thread crawl row by row.
# Fixed chunk sizes keep the statements few (and cached); 120 rows of 8 values stay under the
# 999 variables older SQLite builds allow.
_CHUNKS = (120, 30, 6, 1)
# A function pickle of 256 bytes to 8 KiB is kept once, in `functions`, once it repeats. The
# writer remembers at most 1,024 pickles seen once and 1,024 kept (16 MiB at the very most):
# when the second list fills, it is cleared and functions no row refers to are deleted.
_SHARED_FN_MIN = 256
_SHARED_FN_MAX = 8 << 10
_FNS_REMEMBERED = 1024
_DROP_UNUSED_FUNCTIONS = (
    "DELETE FROM functions WHERE digest NOT IN (SELECT fn_ref FROM tasks WHERE fn_ref IS NOT NULL)"
)
_SQLITE_NEEDED = (3, 25, 0)  # upsert (3.24) for finished rows, row_number() (3.25) to migrate


def _statements(head: str, row: str, tail: str = "") -> dict[int, str]:
    return {n: head + ", ".join([row] * n) + tail for n in _CHUNKS}


_INSERT = _statements(
    "INSERT INTO tasks (seq, task_id, client_id, spec, lost, errors, not_before, fn_ref) VALUES ",
    "(?, ?, ?, ?, ?, ?, ?, ?)",
)
# an upsert, so a finished task needs one statement whether or not its row is there yet
_FINISH = _statements(
    "INSERT INTO tasks (seq, task_id, client_id, spec, state, outcome, finished_at) VALUES ",
    "(?, ?, ?, x'', ?, ?, ?)",
    " ON CONFLICT (seq) DO UPDATE SET state = excluded.state, outcome = excluded.outcome,"
    " finished_at = excluded.finished_at, spec = x'', fn_ref = NULL",
)
_DELETE = _statements("DELETE FROM tasks WHERE seq IN (", "?", ")")


def _execute_rows(
    db: sqlite3.Connection, statements: dict[int, str], params: Sequence[object], width: int
) -> None:
    """Run ``statements`` over ``params``, ``width`` values per row, in as few steps as fit."""
    start, rows = 0, len(params) // width
    for size in _CHUNKS:
        while rows >= size:
            end = start + size * width
            db.execute(statements[size], params[start:end])
            start, rows = end, rows - size


class SqliteJournal(Journal):
    """Embedded SQLite in WAL mode through the standard library.

    ``synchronous`` is ``FULL`` by default: a commit survives power loss, not only a killed
    broker. Group commit keeps that affordable: one transaction (one fsync) per batch.
    """

    def __init__(self, path: str, *, synchronous: str = "FULL") -> None:
        if sqlite3.sqlite_version_info < _SQLITE_NEEDED:
            needed = ".".join(map(str, _SQLITE_NEEDED))
            raise ValueError(
                f"the journal needs SQLite {needed} or later (upserts, window functions); "
                f"this Python has SQLite {sqlite3.sqlite_version}"
            )
        if synchronous.upper() not in ("FULL", "NORMAL"):
            raise ValueError(f"journal synchronous mode must be FULL or NORMAL, not {synchronous}")
        self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise ValueError(f"journal folder {folder} does not exist")
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
        self._db.executescript(_SCHEMA)
        row = self._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        if row is None:
            # a new file; or tables an older release made before it could record its schema
            columns = {c[1] for c in self._db.execute("PRAGMA table_info(tasks)")}
            if "fn_ref" not in columns:
                self._db.execute(_MIGRATE_FROM_2)
            self._db.execute("INSERT INTO meta VALUES ('schema', ?)", (SCHEMA_VERSION,))
        elif row[0] in ("1", "2"):
            steps = _MIGRATE_FROM_1 if row[0] == "1" else _MIGRATE_FROM_2
            try:
                self._db.executescript(
                    f"BEGIN; {steps} UPDATE meta SET value = '{SCHEMA_VERSION}'"
                    " WHERE key = 'schema'; COMMIT;"
                )
            except sqlite3.Error:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                self._db.close()
                raise
            log.info("journal %s: migrated from schema %s to %s", path, row[0], SCHEMA_VERSION)
        elif row[0] != SCHEMA_VERSION:
            raise ValueError(
                f"journal {path} has schema {row[0]}; this taskmesh writes schema {SCHEMA_VERSION}"
            )
        # functions no task refers to any more: their tasks finished while the broker ran
        self._db.execute(_DROP_UNUSED_FUNCTIONS)
        self._shared_fns: dict[bytes, bytes] = {}  # function pickle -> digest, kept in a row
        self._seen_fns: dict[bytes, None] = {}  # function pickles seen once (an ordered set)
        self.commits = 0
        self.commit_seconds = 0.0
        self.commit_time = Histogram()

    def load(self) -> Recovery:
        pending: list[PendingTask] = []
        finished: list[FinishedTask] = []
        rows = self._db.execute(
            "SELECT task_id, client_id, seq, spec, lost, errors, not_before, state, outcome,"
            " finished_at, fn_ref, body FROM tasks LEFT JOIN functions ON digest = fn_ref"
            " ORDER BY seq"
        )
        for row in rows:
            task_id, client_id, seq, spec, lost, errors, not_before, state, outcome, at = row[:10]
            fn_ref, fn = row[10:]
            try:
                if state == "pending":
                    task = unpack_task(spec)
                    if fn_ref is not None:
                        if fn is None:
                            raise ValueError(f"its function {fn_ref.hex()} is missing")
                        task.fn = fn
                    pending.append(PendingTask(task, client_id, seq, lost, errors, not_before))
                else:
                    finished.append(
                        FinishedTask(task_id, client_id, state, unpack_outcome(outcome), at, seq)
                    )
            except Exception as exc:  # one corrupt row must not stop the broker from starting
                log.error("journal: skipping unreadable task %s: %s", task_id, exc)
        schedules: list[StoredSchedule] = []
        for name, periodic, next_at, runs, skipped, last_at, last_id in self._db.execute(
            "SELECT name, periodic, next_at, runs, skipped, last_run_at, last_task_id"
            " FROM schedules ORDER BY name"
        ):
            try:
                schedules.append(
                    StoredSchedule(
                        unpack_periodic(periodic), next_at, runs, skipped, last_at, last_id
                    )
                )
            except Exception as exc:
                log.error("journal: skipping unreadable schedule %s: %s", name, exc)
        (last_seq,) = self._db.execute("SELECT coalesce(max(seq), -1) FROM tasks").fetchone()
        return Recovery(pending, finished, schedules, last_seq)

    def _function_ref(self, fn: object, used: dict[bytes, bytes]) -> bytes | None:
        """The digest under which a task's function is kept in ``functions``, or None to keep
        it in the task's row; ``used`` collects the batch's digests, whose rows the batch
        writes (again) itself: no row is assumed to be there from an earlier transaction,
        which may have been rolled back, or cleaned up by another process opening the file.
        Only a function seen before is shared: a closure pickled with different values every
        time would otherwise add a row for every task."""
        if type(fn) is not bytes or not _SHARED_FN_MIN <= len(fn) <= _SHARED_FN_MAX:
            return None
        digest = self._shared_fns.get(fn)
        if digest is None:
            if fn not in self._seen_fns:
                if len(self._seen_fns) >= _FNS_REMEMBERED:
                    self._seen_fns.clear()
                self._seen_fns[fn] = None
                return None
            if len(self._shared_fns) >= _FNS_REMEMBERED:
                self._shared_fns.clear()
                self._db.execute(_DROP_UNUSED_FUNCTIONS)  # in this batch's transaction
            digest = self._shared_fns[fn] = hashlib.blake2b(fn, digest_size=16).digest()
        used[digest] = fn
        return digest

    def write(self, batch: JournalBatch) -> None:
        if not batch:
            return
        started = time.perf_counter()
        db = self._db
        db.execute("BEGIN")
        try:
            if batch.submitted:
                params: list[object] = []
                functions: dict[bytes, bytes] = {}
                for t in batch.submitted:
                    fn_ref = self._function_ref(t.spec.fn, functions)
                    params += (
                        t.seq,
                        t.spec.task_id,
                        t.client_id,
                        pack_task(t.spec, without_fn=fn_ref is not None),
                        t.lost,
                        t.errors,
                        t.not_before,
                        fn_ref,
                    )
                if functions:
                    db.executemany(
                        "INSERT OR IGNORE INTO functions VALUES (?, ?)", functions.items()
                    )
                _execute_rows(db, _INSERT, params, 8)
            if batch.requeued:
                db.executemany(
                    "UPDATE tasks SET lost = ?, errors = ?, not_before = ? WHERE seq = ?",
                    [(lost, errors, nb, seq) for seq, lost, errors, nb in batch.requeued],
                )
            if batch.finished:
                params = []
                for f in batch.finished:
                    params += (
                        f.seq,
                        f.task_id,
                        f.client_id,
                        f.state,
                        pack_outcome(f.outcome),
                        f.finished_at,
                    )
                _execute_rows(db, _FINISH, params, 6)
            if batch.forgotten:
                _execute_rows(db, _DELETE, batch.forgotten, 1)
            for name, stored in batch.schedules:
                if stored is None:
                    db.execute("DELETE FROM schedules WHERE name = ?", (name,))
                else:
                    db.execute(
                        "INSERT OR REPLACE INTO schedules VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (
                            name,
                            pack_periodic(stored.periodic),
                            stored.next_at,
                            stored.runs,
                            stored.skipped,
                            stored.last_run_at,
                            stored.last_task_id,
                        ),
                    )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        elapsed = time.perf_counter() - started
        self.commits += 1
        self.commit_seconds += elapsed
        self.commit_time.observe(elapsed)

    def close(self) -> None:
        try:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error:
            pass
        self._db.close()


def open_journal(path: str, *, synchronous: str = "FULL") -> Journal:
    """``:memory:`` for none, else an SQLite file at ``path``."""
    if path == ":memory:":
        return MemoryJournal()
    return SqliteJournal(path, synchronous=synchronous)
