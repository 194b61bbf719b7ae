"""The dashboard drawn from hand-made status snapshots into a recording Console: no broker, no
terminal, an explicit clock."""

from __future__ import annotations

import copy
import io
import re
import time
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text

from taskmesh.dashboard import HISTORY_S, DashboardState, render
from taskmesh.screen import Col, Section, allocate, fit_table, spark_lines

pytestmark = pytest.mark.timeout(30)

BROKER = "tcp://10.0.0.5:5555"
AT = 1_760_000_000.0  # wall time of the recorded failures


def worker(
    name: str,
    *,
    worker_id: str | None = None,
    host: str = "node-a",
    pid: int = 4100,
    queues: tuple[str, ...] = ("default",),
    concurrency: int = 4,
    busy: int = 0,
    done: int = 0,
    failed: int = 0,
    age: float = 0.2,
    state: str = "alive",
    running: tuple[str, ...] = (),
) -> dict[str, Any]:
    """One worker as ``Scheduler.snapshot`` reports it."""
    return {
        "worker_id": worker_id or f"id-{name}",
        "name": name,
        "host": host,
        "pid": pid,
        "queues": list(queues),
        "concurrency": concurrency,
        "busy": busy,
        "credit": concurrency - busy,
        "done": done,
        "failed": failed,
        "heartbeat_age_s": age,
        "state": state,
        "running": list(running),
    }


def failure(i: int, *, worker_name: str = "cruncher-1") -> dict[str, Any]:
    return {
        "task_id": f"c0ffee-{i}",
        "name": "shop.tasks.validate_record",
        "type": "shop.tasks.InvalidRecord",
        "message": f"record {i}: checksum mismatch",
        "worker": worker_name,
        "at": AT + i,
    }


def snapshot(done: int = 500, *, broker_id: str = "b-1", scale: int = 0) -> dict[str, Any]:
    """A mesh with a busy worker, a suspect one, an idle one, one dead and one that left.

    ``scale`` adds finished tasks: 10 per step to cruncher-1, 5 to cruncher-2 (queue "default")
    and 3 to gpu-box-17 (queue "gpu")."""
    w1, w2, w3 = 300 + 10 * scale, 180 + 5 * scale, 20 + 3 * scale
    return {
        "broker_id": broker_id,
        "workers": [
            worker(
                "cruncher-1",
                host="node-a",
                pid=4101,
                busy=3,
                done=w1,
                failed=4,
                running=("shop.tasks.count_primes", "shop.tasks.count_primes", "resize"),
            ),
            worker(
                "cruncher-2",
                host="node-b",
                pid=4102,
                queues=("default", "cpu"),
                concurrency=2,
                busy=2,
                done=w2,
                age=2.4,
                state="suspect",
                running=("crunch", "crunch"),
            ),
            worker(
                "gpu-box-17",
                host="gpu17.example.internal",
                pid=88123,
                queues=("gpu",),
                concurrency=16,
                busy=0,
                done=w3,
                failed=1,
            ),
        ],
        "queues": [
            {
                "name": "cpu",
                "pending": 12,
                "head_wait_s": 0.8,
                "delayed": 0,
                "running": 0,
                "done": 40,
                "failed": 0,
            },
            {
                "name": "default",
                "pending": 1234,
                "head_wait_s": 12.5,
                "delayed": 3,
                "running": 5,
                "done": w1 + w2 - 40,
                "failed": 4,
            },
            {
                "name": "gpu",
                "pending": 0,
                "head_wait_s": None,
                "delayed": 0,
                "running": 0,
                "done": w3,
                "failed": 1,
            },
        ],
        "counters": {
            "submitted": 4000,
            "done": w1 + w2 + w3,
            "failed": 5,
            "cancelled": 0,
            "requeued": 7,
            "retried": 2,
            "workers_lost": 1,
        },
        "workers_alive": 3,
        "delayed": 3,
        "latency": {
            "queue_wait": {"count": 900, "p50_s": 0.005, "p95_s": 0.025, "p99_s": 0.1},
            "run": {"count": 900, "p50_s": 0.01, "p95_s": 0.05, "p99_s": 2.5},
        },
        "recent_failures": [failure(i) for i in range(4)]
        + [
            {
                "task_id": "c0ffee-99",
                "name": "crunch",
                "type": "taskmesh.errors.WorkerLost",
                "message": "task crunch [c0ffee-99] was lost 3 times (max_attempts=3)",
                "worker": "",
                "at": AT + 100,
            }
        ],
        "dead_workers": [
            {"name": "cruncher-3", "host": "node-c", "pid": 4103, "reason": "missed heartbeats"},
            {"name": "batch-9", "host": "node-d", "pid": 4109, "reason": "left"},
        ],
        "broker": {
            "endpoint": "tcp://0.0.0.0:5555",
            "journal": "/var/lib/taskmesh/taskmesh.db",
            "journal_commits": 321,
            "uptime_s": 3723.4,
        },
    }


def steady_state(steps: int = 2, every_s: float = 1.0, start: float = 100.0) -> DashboardState:
    state = DashboardState(BROKER)
    for k in range(steps):
        state = state.observe(snapshot(scale=k), start + k * every_s)
    return state


def draw(state: DashboardState, width: int, height: int, now: float | None = None) -> list[str]:
    """The screen as plain lines, as a terminal of ``width`` x ``height`` would show it."""
    console = recording_console(width, height)
    when = now if now is not None else (state.fetched_at or 0.0)
    console.print(render(state, when, width, height))
    lines = console.export_text(styles=False).rstrip("\n").split("\n")
    assert len(lines) <= height, "\n".join(lines)
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    return lines


def recording_console(width: int, height: int) -> Console:
    return Console(record=True, width=width, height=height, file=io.StringIO(), color_system=None)


def row(lines: list[str], name: str) -> str:
    """The one line of a table that starts with ``name``."""
    found = [line for line in lines if line.startswith(name + " ")]
    assert len(found) == 1, f"{name!r} in\n" + "\n".join(lines)
    return found[0]


def words(line: str) -> list[str]:
    return line.split()


# ------------------------------------------------------------------ layouts


def test_wide_screen_shows_every_column_and_section() -> None:
    lines = draw(steady_state(), 160, 50)
    text = "\n".join(lines)

    assert lines[0].startswith(
        f"taskmesh {BROKER}  up 1h02m  journal /var/lib/taskmesh/taskmesh.db"
    )
    assert lines[0].rstrip().endswith("● live  q quits")
    assert "workers 2 alive 1 suspect 1 dead  done 518  failed 5  requeued 7" in lines[1]
    for header in ("host", "pid", "queues", "slots", "heartbeat", "state", "running now"):
        assert header in text

    busy = words(row(lines, "cruncher-1"))
    assert busy[:4] == ["cruncher-1", "node-a", "4101", "default"]
    assert "███░" in busy and "3/4" in busy
    assert busy[-3:] == ["count_primes", "x2,", "resize"]
    assert "alive" in busy

    suspect = row(lines, "cruncher-2")
    assert "default,cpu" in suspect and "2.4s" in suspect and " suspect " in suspect
    assert "crunch x2" in suspect

    idle = words(row(lines, "gpu-box-17"))
    assert idle[1:3] == ["gpu17.example.internal", "88123"]
    assert "░░░░░░░░" in idle and "0/16" in idle and idle[-2:] == ["alive", "idle"]

    dead = words(row(lines, "cruncher-3"))
    assert dead == ["cruncher-3", "node-c", "4103", "dead", "missed", "heartbeats"]
    assert words(row(lines, "batch-9")) == ["batch-9", "node-d", "4109", "left"]

    assert words(row(lines, "default")) == [
        "default",
        "1,234",
        "12.5s",
        "3",
        "0",  # waiting: this snapshot predates dependencies
        "5",
        "455",
        "4",
        "15.0",
    ]
    assert words(row(lines, "cpu"))[:3] == ["cpu", "12", "800ms"]
    assert words(row(lines, "gpu"))[:3] == ["gpu", "0", "—"]
    assert "queues  1,246 pending  wait p50 5ms p95 25ms p99 100ms" in text
    assert "run p50 10ms p95 50ms p99 2.5s" in text

    assert any(line.startswith("throughput  last 60s") for line in lines)
    assert "last failures  newest first" in text
    newest = words(row(lines, time.strftime("%H:%M:%S", time.localtime(AT + 100))))
    assert newest[1:3] == ["crunch", "WorkerLost"] and newest[-2:] == ["—", "c0ffee-99"]
    oldest = row(lines, time.strftime("%H:%M:%S", time.localtime(AT)))
    assert "validate_record InvalidRecord record 0: checksum mismatch" in oldest
    assert "cruncher-1" in oldest and "c0ffee-0" in oldest


def test_wide_screen_grows_the_tables_and_the_sparkline_into_the_height() -> None:
    state = DashboardState(BROKER).observe(big_mesh(workers=30, failures=20), 100.0)
    state = state.observe(big_mesh(workers=30, failures=20, done=100), 101.0)
    short = draw(state, 160, 24)
    tall = draw(state, 160, 60)
    assert len(tall) > 50
    assert sum("worker-" in line for line in tall) > sum("worker-" in line for line in short)
    assert any("more workers" in line for line in short)

    spark_rows = [line for line in tall if line.strip() and set(line.strip()) <= set(" ▁▂▃▄▅▆▇█")]
    assert len(spark_rows) >= 3


def big_mesh(workers: int, failures: int, done: int = 0) -> dict[str, Any]:
    snap = snapshot()
    snap["workers"] = [worker(f"worker-{i:02d}", done=done, pid=5000 + i) for i in range(workers)]
    snap["recent_failures"] = [failure(i) for i in range(failures)]
    snap["counters"]["done"] = done * workers
    return snap


def test_80x24_keeps_what_matters_and_fits() -> None:
    lines = draw(steady_state(), 80, 24)
    text = "\n".join(lines)

    assert lines[0].startswith(f"taskmesh {BROKER}  up 1h02m")
    assert lines[1].rstrip().endswith("18.0 tasks/s")  # the rate is never ellipsized away
    for name in ("cruncher-1", "cruncher-2", "gpu-box-17", "cruncher-3"):
        assert name in text
    # the lowest-priority columns are dropped, not wrapped
    assert "node-a" not in text and "4101" not in text and "gpu17.example" not in text
    assert " suspect " in row(lines, "cruncher-2")
    assert words(row(lines, "cruncher-3"))[:2] == ["cruncher-3", "dead"]
    cruncher = words(row(lines, "cruncher-1"))
    assert cruncher[:4] == ["cruncher-1", "███░", "3/4", "310"]
    assert "10.0" in cruncher  # tasks/s
    assert "queues  1,246 pending" in text
    assert "throughput" in text
    assert "last failures" in text and "WorkerLost" in text


def test_at_80_columns_the_failure_message_outranks_a_long_worker_name() -> None:
    snap = snapshot()
    snap["recent_failures"] = [failure(i, worker_name="worker-replacement") for i in range(3)]
    lines = draw(DashboardState(BROKER).observe(snap, 1.0), 80, 24)
    line = row(lines, time.strftime("%H:%M:%S", time.localtime(AT + 2)))
    assert "record 2: checksum mismatch" in line and "worker-replacement" not in line
    assert "worker-replacement" in "\n".join(
        draw(DashboardState(BROKER).observe(snap, 1.0), 120, 24)
    )


def test_a_short_screen_drops_sections_by_priority() -> None:
    lines = draw(steady_state(), 100, 12)
    text = "\n".join(lines)
    assert "cruncher-1" in text and "queues" in text
    assert "last failures" not in text and "throughput" not in text
    assert any(line.startswith("… ") and "more workers" in line for line in lines)


def test_a_narrow_screen_keeps_name_and_state() -> None:
    lines = draw(steady_state(), 40, 24)
    assert words(row(lines, "cruncher-2"))[-1] == "suspect"
    assert words(row(lines, "cruncher-3"))[-1] == "dead"


def test_a_broker_without_latency_figures_still_renders() -> None:
    snap = snapshot()
    del snap["latency"]
    for queue in snap["queues"]:
        del queue["head_wait_s"]
    lines = draw(DashboardState(BROKER).observe(snap, 1.0), 160, 50)
    text = "\n".join(lines)
    assert "queues  1,246 pending" in [line.rstrip() for line in lines]
    assert " p50 " not in text
    assert words(row(lines, "default"))[:3] == ["default", "1,234", "—"]


def test_an_empty_mesh_says_so() -> None:
    snap = snapshot()
    snap.update(workers=[], queues=[], recent_failures=[], dead_workers=[], workers_alive=0)
    lines = draw(DashboardState(BROKER).observe(snap, 1.0), 80, 24)
    text = "\n".join(lines)
    assert "workers  0/0 slots busy  (none yet)" in text
    assert "last failures  newest first  (none yet)" in text
    assert "— tasks/s" in lines[1]  # one snapshot is not a rate


# ------------------------------------------------------------------ rates and history


def test_rates_come_from_two_snapshots() -> None:
    state = DashboardState(BROKER).observe(snapshot(scale=0), 10.0)
    assert state.rate() is None and state.worker_rate("id-cruncher-1") is None
    state = state.observe(snapshot(scale=4), 12.0)  # 2 s later: 40 + 20 + 12 done

    assert state.rate() == pytest.approx(36.0)
    assert state.worker_rate("id-cruncher-1") == pytest.approx(20.0)
    assert state.worker_rate("id-cruncher-2") == pytest.approx(10.0)
    assert state.queue_rate("default") == pytest.approx(30.0)
    assert state.queue_rate("gpu") == pytest.approx(6.0)
    assert state.queue_rate("cpu") == pytest.approx(0.0)

    lines = draw(state, 160, 50)
    assert lines[1].rstrip().endswith("36.0 tasks/s")
    assert "20.0" in words(row(lines, "cruncher-1"))
    assert words(row(lines, "default"))[-1] == "30.0"


def test_the_rate_spans_the_last_few_seconds_not_one_refresh() -> None:
    state = DashboardState(BROKER)
    for k, finished in enumerate([0, 0, 0, 0, 0, 0, 0, 0, 50, 50, 50, 50]):
        snap = snapshot()
        snap["counters"]["done"], snap["counters"]["failed"] = finished, 0
        state = state.observe(snap, 100.0 + 0.5 * k)
    # one batch of 50 results 1.5 s ago: averaged over the 5 s window, not "0 tasks/s"
    assert state.rate() == pytest.approx(50 / 5.0)


def test_a_restarted_broker_does_not_make_rates_negative_or_huge() -> None:
    state = DashboardState(BROKER).observe(snapshot(scale=50), 10.0)
    state = state.observe(snapshot(scale=0, broker_id="b-2"), 11.0)  # counters from zero
    assert state.worker_rate("id-cruncher-1") is None
    assert state.queue_rate("default") is None
    finished = [s.finished for s in state.samples]
    assert finished == sorted(finished)
    state = state.observe(snapshot(scale=1, broker_id="b-2"), 12.0)
    assert state.worker_rate("id-cruncher-1") is None  # the window still spans the restart
    state = state.observe(snapshot(scale=2, broker_id="b-2"), 17.0)
    assert state.worker_rate("id-cruncher-1") == pytest.approx(10 / 5.0)


def test_throughput_history_covers_the_last_minute() -> None:
    state = DashboardState(BROKER)
    for k in range(121):  # two minutes, one snapshot a second; 10 tasks/s, then 30 tasks/s
        snap = snapshot()
        snap["counters"]["done"] = 10 * k if k <= 90 else 900 + 30 * (k - 90)
        snap["counters"]["failed"] = 0
        state = state.observe(snap, 1000.0 + k)
    assert state.samples[0].at <= 1000.0 + 120 - HISTORY_S  # older samples are dropped
    assert len(state.samples) <= 70
    history = state.throughput(60)
    assert history[:30] == pytest.approx([10.0] * 30)
    assert history[30:] == pytest.approx([30.0] * 30)

    line = spark_lines(history, 1)[0].plain
    assert set(line[:30]) == {"▃"} and set(line[30:]) == {"█"}


def test_history_before_the_first_snapshot_is_blank() -> None:
    state = steady_state(steps=31, every_s=1.0)  # 30 s of data in a 60 s window
    history = state.throughput(60)
    assert history[:30] == [None] * 30
    assert all(v is not None for v in history[30:])
    lines = draw(state, 80, 24)
    spark = next(line for line in lines if line.strip() and set(line.strip()) <= set("▁▂▃▄▅▆▇█"))
    assert spark.startswith(" " * 38) and spark.rstrip().endswith("█")


def test_spark_lines_scale_to_the_peak() -> None:
    assert [t.plain for t in spark_lines([0.0, None, 1.0, 4.0, 8.0], 1)] == ["  ▁▄█"]
    tall = [t.plain for t in spark_lines([0.0, 2.0, 8.0, 16.0], 2)]
    assert tall == ["   █", " ▂██"]
    assert [t.plain for t in spark_lines([None, None], 1)] == ["  "]


# ------------------------------------------------------------------ reconnecting


def test_reconnecting_keeps_the_last_picture_and_says_so() -> None:
    state = steady_state().unreachable("no broker answered within 1s", 101.5)
    state = state.unreachable("no broker answered within 1s", 105.0)
    assert not state.connected and state.unreachable_since == 101.5
    lines = draw(state, 80, 24, now=105.0)
    assert "reconnecting… 3s" in lines[0]
    assert "live" not in lines[0]
    assert lines[1].rstrip().endswith("— tasks/s")
    assert "cruncher-1" in "\n".join(lines)  # the last known mesh, shown stale
    stale = words(row(lines, "cruncher-1"))
    assert "—" in stale and "10.0" not in stale  # no rate from before the silence

    back = state.observe(snapshot(scale=2), 106.0)
    assert back.connected and back.error is None
    assert "● live" in draw(back, 80, 24)[0]


def test_reconnecting_before_any_snapshot() -> None:
    state = DashboardState(BROKER).unreachable("no broker answered at X within 1s", 5.0)
    lines = draw(state, 80, 24, now=7.0)
    assert "reconnecting… 2s" in lines[0]
    assert "no answer yet from tcp://10.0.0.5:5555" in "\n".join(lines)


def test_connecting_before_the_first_fetch() -> None:
    lines = draw(DashboardState(BROKER), 80, 24)
    assert lines[0].rstrip().endswith("connecting…")


# ------------------------------------------------------------------ dead workers


def test_a_dead_worker_that_came_back_is_shown_alive_only() -> None:
    snap = snapshot()
    snap["dead_workers"].append(
        {"name": "cruncher-1", "host": "node-a", "pid": 4101, "reason": "missed heartbeats"}
    )
    snap["dead_workers"].append(dict(snap["dead_workers"][0]))  # the same death, twice
    lines = draw(DashboardState(BROKER).observe(snap, 1.0), 160, 50)
    assert words(row(lines, "cruncher-1"))[-1] != "heartbeats"
    assert sum(line.startswith("cruncher-3 ") for line in lines) == 1
    assert "1 dead" in lines[1]


def test_render_leaves_the_state_and_snapshot_untouched() -> None:
    snap = snapshot()
    before = copy.deepcopy(snap)
    state = DashboardState(BROKER).observe(snap, 1.0)
    draw(state, 80, 24)
    assert snap == before
    with pytest.raises(AttributeError):
        state.error = "x"  # type: ignore[misc]


# ------------------------------------------------------------------ screen primitives


def test_allocate_gives_least_sizes_by_priority_then_the_rest() -> None:
    def section(need: int, least: int) -> Section:
        return Section(2, need, least, lambda n: [])

    sections = [section(10, 3), section(3, 2), section(4, 1)]
    assert allocate(sections, 100) == [10, 3, 4]
    assert allocate(sections, 12) == [3, 2, 1]  # exactly the least sizes (5 + 4 + 3 lines)
    assert allocate(sections, 14) == [5, 2, 1]  # two more lines go to the first
    assert allocate(sections, 7) == [5, None, None]  # the lines no other section fits in
    assert allocate(sections, 4) == [None, 2, None]  # a smaller section still fits


def test_fit_table_drops_low_priority_columns_first() -> None:
    cols = [Col("name", 0), Col("detail", 5), Col("n", 1, "right"), Col("msg", 2, flexible=8)]
    rows = [[Text("alpha"), Text("x" * 30), Text("42"), Text("hello world, it is long")]]
    console = recording_console(30, 5)
    console.print(fit_table(cols, rows, 30))
    header, line = console.export_text().rstrip("\n").split("\n")
    assert words(header) == ["name", "n", "msg"]
    assert re.match(r"alpha +42 hello world, it is l?…", line), line
