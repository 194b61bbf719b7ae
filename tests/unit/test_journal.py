"""The SQLite journal on its own: what a batch writes is what a restart loads."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from taskmesh.journal import (
    SCHEMA_VERSION,
    FinishedTask,
    JournalBatch,
    PendingTask,
    SqliteJournal,
)
from taskmesh.protocol import Outcome, Status, TaskSpec, pack_outcome, pack_task


def spec(task_id: str) -> TaskSpec:
    return TaskSpec(task_id, "mod.f", "default", b"fn", b"args-" + task_id.encode())


def test_a_task_is_found_by_its_seq_through_its_whole_life(tmp_path: Path) -> None:
    path = str(tmp_path / "j.db")
    journal = SqliteJournal(path)
    journal.write(
        JournalBatch(submitted=[PendingTask(spec(f"t{i}"), "c1", 10 + i) for i in range(4)])
    )
    journal.write(JournalBatch(requeued=[(11, 1, 0, 1234.5)]))
    done = Outcome("t2", Status.OK, b"value", None, 0.25)
    journal.write(JournalBatch(finished=[FinishedTask("t2", "c1", "done", done, 99.0, 12)]))
    journal.write(JournalBatch(forgotten=[13]))
    journal.close()

    recovered = SqliteJournal(path).load()
    assert [(t.spec, t.seq, t.lost, t.not_before) for t in recovered.pending] == [
        (spec("t0"), 10, 0, None),
        (spec("t1"), 11, 1, 1234.5),
    ]
    assert [(f.task_id, f.state, f.outcome, f.finished_at, f.seq) for f in recovered.finished] == [
        ("t2", "done", done, 99.0, 12)
    ]


def test_a_task_id_submitted_again_after_it_was_forgotten_is_a_new_row(tmp_path: Path) -> None:
    """The broker gives the second submit a new seq; the first row's deletion must not touch it."""
    path = str(tmp_path / "j.db")
    journal = SqliteJournal(path)
    journal.write(JournalBatch(submitted=[PendingTask(spec("t"), "c1", 1)]))
    journal.write(
        JournalBatch(forgotten=[1], submitted=[PendingTask(spec("t"), "c1", 2)])
    )  # the forget is applied after the insert of the same batch: seq 2 must survive
    journal.close()
    assert [t.seq for t in SqliteJournal(path).load().pending] == [2]


_COLUMNS = """spec BLOB NOT NULL, lost INTEGER NOT NULL DEFAULT 0,
    errors INTEGER NOT NULL DEFAULT 0, not_before REAL,
    state TEXT NOT NULL DEFAULT 'pending', outcome BLOB, finished_at REAL"""
# the tasks table as schema 1 (keyed by task id) and schema 2 (by seq) made it
_OLD_TASKS = {
    "1": "task_id TEXT PRIMARY KEY, client_id TEXT NOT NULL, seq INTEGER NOT NULL, " + _COLUMNS,
    "2": "seq INTEGER PRIMARY KEY, task_id TEXT NOT NULL, client_id TEXT NOT NULL, " + _COLUMNS,
}


def _old_journal(path: str, schema: str) -> sqlite3.Connection:
    """An empty journal as an older taskmesh wrote it."""
    db = sqlite3.connect(path)
    db.executescript(
        f"CREATE TABLE tasks ({_OLD_TASKS[schema]});"
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        f"INSERT INTO meta VALUES ('schema', '{schema}');"
    )
    return db


def _schema_1_journal(path: str) -> None:
    """A journal as version 1 wrote it: tasks keyed by task id."""
    db = _old_journal(path, "1")
    db.execute(
        "INSERT INTO tasks (task_id, client_id, seq, spec, lost) VALUES (?, ?, ?, ?, ?)",
        ("old-pending", "c1", 7, pack_task(spec("old-pending")), 2),
    )
    db.execute(  # schema 1 did not keep seqs unique
        "INSERT INTO tasks (task_id, client_id, seq, spec) VALUES (?, ?, ?, ?)",
        ("same-seq", "c1", 7, pack_task(spec("same-seq"))),
    )
    outcome = Outcome("old-done", Status.OK, b"v", None, 0.1)
    db.execute(
        "INSERT INTO tasks (task_id, client_id, seq, spec, state, outcome, finished_at)"
        " VALUES (?, ?, ?, x'', 'done', ?, 5.0)",
        ("old-done", "c1", 3, pack_outcome(outcome)),
    )
    db.commit()
    db.close()


def test_a_schema_1_journal_is_migrated_and_keeps_every_task(tmp_path: Path) -> None:
    path = str(tmp_path / "j.db")
    _schema_1_journal(path)
    journal = SqliteJournal(path)
    recovered = journal.load()
    # numbered afresh in their old order, none lost to a shared seq
    assert [(t.spec.task_id, t.seq, t.lost) for t in recovered.pending] == [
        ("old-pending", 1, 2),
        ("same-seq", 2, 0),
    ]
    assert [(f.task_id, f.seq, f.outcome.value) for f in recovered.finished] == [
        ("old-done", 0, b"v")
    ]
    assert recovered.last_seq == 2
    journal.write(JournalBatch(forgotten=[1]))  # rows are now found by seq
    journal.close()
    reopened = SqliteJournal(path)
    assert [t.spec.task_id for t in reopened.load().pending] == ["same-seq"]
    (version,) = reopened._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    assert version == SCHEMA_VERSION
    reopened.close()


def test_a_journal_from_a_newer_taskmesh_is_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "j.db")
    SqliteJournal(path).close()
    db = sqlite3.connect(path)
    db.execute("UPDATE meta SET value = '99' WHERE key = 'schema'")
    db.commit()
    db.close()
    with pytest.raises(ValueError, match="schema 99"):
        SqliteJournal(path)


# --------------------------------------------------------------------------- coalescing


def _finished(seq: int) -> FinishedTask:
    outcome = Outcome(f"t{seq}", Status.OK, b"v%d" % seq, None, 0.1)
    return FinishedTask(f"t{seq}", "c1", "done", outcome, 1.0, seq)


def test_a_forget_makes_the_outcome_and_requeues_of_its_batch_moot() -> None:
    batch = JournalBatch(
        submitted=[PendingTask(spec("t1"), "c1", 1), PendingTask(spec("t2"), "c1", 2)],
        requeued=[(1, 1, 0, None), (3, 1, 0, None)],
        finished=[_finished(1), _finished(3), _finished(4)],
        forgotten=[1, 3],
    )
    batch.coalesce()
    assert [t.seq for t in batch.submitted] == [2]  # t1 came and went within the batch
    assert batch.requeued == []
    assert [f.seq for f in batch.finished] == [4]
    assert batch.forgotten == [3]  # t3's row was written by an earlier batch: delete it


@given(
    st.lists(st.integers(min_value=0, max_value=3), min_size=1, max_size=12),
    st.lists(st.integers(min_value=1, max_value=24), min_size=1, max_size=8),
)
@example(lifetimes=[3, 3], cuts=[1, 24])  # a forget of an older row beside a task come and gone
@settings(max_examples=100, deadline=None)
def test_coalesced_batches_leave_the_journal_as_the_batches_one_by_one_would(
    tmp_path_factory: pytest.TempPathFactory, lifetimes: list[int], cuts: list[int]
) -> None:
    """Each task goes through up to four steps (submitted, requeued, finished, forgotten);
    the steps of all tasks, interleaved, are cut into batches and written once one by one and
    once merged into groups and coalesced, as the journal thread does."""
    steps: list[JournalBatch] = []
    for seq, last in enumerate(lifetimes):
        for step in range(last + 1):
            batch = JournalBatch()
            if step == 0:
                batch.submitted.append(PendingTask(spec(f"t{seq}"), "c1", seq))
            elif step == 1:
                batch.requeued.append((seq, 1, 0, None))
            elif step == 2:
                batch.finished.append(_finished(seq))
            else:
                batch.forgotten.append(seq)
            steps.insert(min(len(steps), seq + 2 * step), batch)  # interleave the tasks
    folder = tmp_path_factory.mktemp("coalesce")
    plain = SqliteJournal(str(folder / "plain.db"))
    grouped = SqliteJournal(str(folder / "grouped.db"))
    for batch in steps:
        plain.write(batch)
    start, i = 0, 0
    while start < len(steps):
        end = start + cuts[i % len(cuts)]
        merged = JournalBatch()
        for batch in steps[start:end]:
            merged.extend(batch)
        merged.coalesce()
        grouped.write(merged)
        start, i = end, i + 1

    def state(journal: SqliteJournal) -> tuple[object, ...]:
        loaded = journal.load()
        return (
            [(t.seq, t.lost) for t in loaded.pending],
            [(f.seq, f.outcome) for f in loaded.finished],
        )

    assert state(grouped) == state(plain)
    plain.close()
    grouped.close()


def test_the_last_seq_counts_rows_that_cannot_be_read(tmp_path: Path) -> None:
    """A restarted broker numbers new tasks past every row, or a new task would overwrite an
    unreadable one (and a plain INSERT refuses to)."""
    path = str(tmp_path / "j.db")
    journal = SqliteJournal(path)
    journal.write(JournalBatch(submitted=[PendingTask(spec("t1"), "c1", 1)]))
    journal._db.execute(
        "INSERT INTO tasks (seq, task_id, client_id, spec) VALUES (9, 'bad', 'c1', x'c1')"
    )
    recovered = journal.load()
    assert [t.seq for t in recovered.pending] == [1] and recovered.last_seq == 9
    with pytest.raises(sqlite3.IntegrityError):
        journal.write(JournalBatch(submitted=[PendingTask(spec("t9"), "c1", 9)]))
    journal.close()


# --------------------------------------------------------------------------- shared functions


def big_spec(task_id: str, fn: bytes) -> TaskSpec:
    return TaskSpec(task_id, "__main__.f", "default", fn, b"args-" + task_id.encode())


def test_a_function_that_repeats_is_kept_once_and_every_task_gets_it_back(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "j.db")
    shared, once = b"f" * 460, b"g" * 460  # pickles of functions defined in a script
    journal = SqliteJournal(path)
    journal.write(
        JournalBatch(
            submitted=[PendingTask(big_spec(f"t{i}", shared), "c1", i) for i in range(3)]
            + [PendingTask(big_spec("t3", once), "c1", 3)]
        )
    )
    db = sqlite3.connect(path)
    refs = [r for (r,) in db.execute("SELECT fn_ref FROM tasks ORDER BY seq")]
    assert refs[0] is None and refs[1] == refs[2] is not None and refs[3] is None
    assert db.execute("SELECT count(*) FROM functions").fetchone() == (1,)
    assert max(len(s) for (s,) in db.execute("SELECT spec FROM tasks WHERE seq IN (1, 2)")) < 200
    db.close()
    journal.close()
    recovered = SqliteJournal(path).load()
    assert [t.spec for t in recovered.pending] == [
        big_spec("t0", shared),
        big_spec("t1", shared),
        big_spec("t2", shared),
        big_spec("t3", once),
    ]


def test_functions_of_finished_tasks_are_dropped_when_the_journal_is_opened(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "j.db")
    shared = b"f" * 460
    journal = SqliteJournal(path)
    journal.write(
        JournalBatch(submitted=[PendingTask(big_spec(f"t{i}", shared), "c1", i) for i in range(3)])
    )
    done = Outcome("t1", Status.OK, b"v", None, 0.1)
    journal.write(
        JournalBatch(
            finished=[FinishedTask(f"t{i}", "c1", "done", done, 1.0, i) for i in (1, 2)],
        )
    )
    journal.close()
    reopened = SqliteJournal(path)  # t0 kept its function in its row; t1 and t2 are done
    assert reopened._db.execute("SELECT count(*) FROM functions").fetchone() == (0,)
    assert [t.spec.fn for t in reopened.load().pending] == [shared]
    reopened.close()


def test_a_schema_2_journal_is_migrated_and_keeps_every_task(tmp_path: Path) -> None:
    path = str(tmp_path / "j.db")
    db = _old_journal(path, "2")
    db.execute(
        "INSERT INTO tasks (seq, task_id, client_id, spec) VALUES (4, 'old', 'c1', ?)",
        (pack_task(spec("old")),),
    )
    db.commit()
    db.close()
    journal = SqliteJournal(path)
    assert [(t.seq, t.spec) for t in journal.load().pending] == [(4, spec("old"))]
    journal.write(JournalBatch(submitted=[PendingTask(spec("new"), "c1", 5)]))
    (version,) = journal._db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
    assert version == SCHEMA_VERSION
    journal.close()


def test_a_shared_function_survives_a_rolled_back_write_and_another_opener(
    tmp_path: Path,
) -> None:
    """Every batch writes the functions it refers to: no row is taken to exist from an earlier
    transaction, which may have been rolled back, or cleaned up by a second opener."""
    path = str(tmp_path / "j.db")
    shared = b"f" * 460
    journal = SqliteJournal(path)
    journal.write(JournalBatch(submitted=[PendingTask(big_spec("t0", shared), "c1", 0)]))
    with pytest.raises(sqlite3.IntegrityError):  # shares the function, then fails: rolled back
        journal.write(
            JournalBatch(
                submitted=[
                    PendingTask(big_spec("t1", shared), "c1", 1),
                    PendingTask(big_spec("t0-again", shared), "c1", 0),
                ]
            )
        )
    journal.write(JournalBatch(submitted=[PendingTask(big_spec("t2", shared), "c1", 2)]))
    done = Outcome("t2", Status.OK, b"v", None, 0.1)
    journal.write(JournalBatch(finished=[FinishedTask("t2", "c1", "done", done, 1.0, 2)]))
    SqliteJournal(path).close()  # a second opener drops the function no row refers to now
    journal.write(JournalBatch(submitted=[PendingTask(big_spec("t3", shared), "c1", 3)]))
    journal.close()
    assert [(t.spec.task_id, t.spec.fn) for t in SqliteJournal(path).load().pending] == [
        ("t0", shared),
        ("t3", shared),
    ]


def test_tables_without_a_recorded_schema_get_the_function_column(tmp_path: Path) -> None:
    """An older release that died between making its tables and recording its schema."""
    path = str(tmp_path / "j.db")
    db = sqlite3.connect(path)
    db.execute(f"CREATE TABLE tasks ({_OLD_TASKS['2']})")
    db.commit()
    db.close()
    journal = SqliteJournal(path)
    journal.write(JournalBatch(submitted=[PendingTask(spec("t"), "c1", 1)]))
    assert [t.spec for t in journal.load().pending] == [spec("t")]
    journal.close()
