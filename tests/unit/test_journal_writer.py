"""The broker's journal thread with a real SQLite journal: what waits for which commit, and
which outcomes it never has to write."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taskmesh import protocol as p
from taskmesh.broker import _HOLD_S, JournalWriter
from taskmesh.journal import FinishedTask, JournalBatch, PendingTask, SqliteJournal
from taskmesh.scheduler import Send

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[SqliteJournal]:
    j = SqliteJournal(str(tmp_path / "j.db"))
    try:
        yield j
    finally:
        j.close()


@pytest.fixture
def writer(journal: SqliteJournal) -> Iterator[JournalWriter]:
    read_fd, write_fd = os.pipe()
    os.set_blocking(write_fd, False)
    w = JournalWriter(journal, write_fd)
    try:
        yield w
    finally:
        w.close()
        os.close(read_fd)
        os.close(write_fd)


def spec(seq: int) -> p.TaskSpec:
    return p.TaskSpec(f"t{seq}", "mod.f", "default", b"fn", b"args")


def finished(seq: int, hold: bool = True) -> FinishedTask:
    """A finished task's row; ``hold``: what the scheduler sets for a run nothing depends on."""
    outcome = p.Outcome(f"t{seq}", p.Status.OK, b"value", None, 0.1)
    return FinishedTask(f"t{seq}", "c1", "done", outcome, 1.0, seq, hold=hold)


def ack(*seqs: int) -> Send:
    return Send(b"producer", p.PRODUCER, p.Ack([f"t{s}" for s in seqs]))


def results_ack(*seqs: int) -> Send:
    return Send(b"worker", p.WORKER, p.ResultsAck([f"t{s}" for s in seqs]))


def released(w: JournalWriter, count: int, timeout: float = 5.0) -> list[Send]:
    """Wait (bounded) until ``count`` sends are handed back; return them in order."""
    got: list[Send] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        for sends in w.take_ready():
            got.extend(sends)
        if len(got) < count:
            time.sleep(0.001)  # polling the writer's output, bounded by the deadline
    return got


def rows(journal: SqliteJournal) -> dict[int, str]:
    db = sqlite3.connect(journal.path)
    try:
        return dict(db.execute("SELECT seq, state FROM tasks").fetchall())
    finally:
        db.close()


def test_a_run_outcome_delivered_within_the_hold_is_never_written(
    writer: JournalWriter, journal: SqliteJournal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("taskmesh.broker._HOLD_S", 2.0)  # a slow machine must not matter
    written: list[FinishedTask] = []
    write = journal.write
    monkeypatch.setattr(journal, "write", lambda b: (written.extend(b.finished), write(b)))
    writer.submit(JournalBatch(submitted=[PendingTask(spec(1), "c1", 1)]), [ack(1)], [])
    assert released(writer, 1) == [ack(1)]
    assert rows(journal) == {1: "pending"}
    writer.submit(JournalBatch(finished=[finished(1)]), [], [results_ack(1)])
    writer.submit(JournalBatch(forgotten=[1]), [], [])
    assert released(writer, 1) == [results_ack(1)]  # after the forget is durable
    assert rows(journal) == {}
    assert written == []
    assert writer.in_flight == 0


def test_a_run_outcome_not_delivered_is_written_after_the_hold_and_then_acknowledged(
    writer: JournalWriter, journal: SqliteJournal
) -> None:
    writer.submit(JournalBatch(submitted=[PendingTask(spec(1), "c1", 1)]), [], [])
    started = time.monotonic()
    writer.submit(JournalBatch(finished=[finished(1)]), [ack(9)], [results_ack(1)])
    assert released(writer, 1) == [ack(9)]  # the other sends of the iteration do not wait
    assert rows(journal) == {1: "pending"}
    assert released(writer, 1) == [results_ack(1)]
    assert time.monotonic() - started >= _HOLD_S
    assert rows(journal) == {1: "done"}  # durable before the worker may forget it
    assert writer.in_flight == 0


def test_outcomes_not_to_be_held_are_written_at_once(
    writer: JournalWriter, journal: SqliteJournal
) -> None:
    writer.submit(JournalBatch(submitted=[PendingTask(spec(1), "c1", 1)]), [], [])
    writer.submit(JournalBatch(finished=[finished(1, hold=False)]), [ack(9)], [results_ack(1)])
    assert released(writer, 2) == [ack(9), results_ack(1)]
    assert rows(journal) == {1: "done"}


def test_a_held_outcome_a_new_task_needs_is_written_before_that_task_goes_out(
    writer: JournalWriter, journal: SqliteJournal, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("taskmesh.broker._HOLD_S", 30.0)  # held for the whole test otherwise
    writer.submit(JournalBatch(submitted=[PendingTask(spec(1), "c1", 1)]), [], [])
    writer.submit(JournalBatch(finished=[finished(1)]), [], [results_ack(1)])
    # a dependent of task 1 arrives: its ACK (and its TASKS) must follow task 1's row
    dependent = JournalBatch(submitted=[PendingTask(spec(2), "c1", 2)], durable=[1])
    writer.submit(dependent, [ack(2)], [])
    assert released(writer, 2) == [ack(2), results_ack(1)]
    assert rows(journal) == {1: "done", 2: "pending"}


def test_a_results_ack_waits_behind_an_earlier_held_outcome(
    writer: JournalWriter, journal: SqliteJournal, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker resending an outcome whose row is held gets its RESULTS_ACK only after."""
    monkeypatch.setattr("taskmesh.broker._HOLD_S", 0.3)
    writer.submit(JournalBatch(submitted=[PendingTask(spec(1), "c1", 1)]), [], [])
    writer.submit(JournalBatch(finished=[finished(1)]), [], [results_ack(1)])
    writer.submit(JournalBatch(), [], [results_ack(1)])  # the resend: nothing new to write
    assert released(writer, 1, timeout=0.1) == []  # neither goes before the row is written
    assert released(writer, 2) == [results_ack(1), results_ack(1)]
    assert rows(journal) == {1: "done"}


def test_closing_writes_every_held_outcome(tmp_path: Path) -> None:
    journal = SqliteJournal(str(tmp_path / "j.db"))
    read_fd, write_fd = os.pipe()
    writer = JournalWriter(journal, write_fd)
    writer.submit(JournalBatch(submitted=[PendingTask(spec(1), "c1", 1)]), [], [])
    writer.submit(JournalBatch(finished=[finished(1)]), [], [results_ack(1)])
    sends = [s for batch in writer.close() for s in batch]
    assert results_ack(1) in sends
    assert rows(journal) == {1: "done"}
    journal.close()
    os.close(read_fd)
    os.close(write_fd)
