"""Periodic tasks: cron and interval rules, and the broker's ticks (once per tick, also
across a restart; missed ticks coalesced into one run)."""

from __future__ import annotations

import calendar
import time
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from taskmesh.journal import SqliteJournal
from taskmesh.options import TaskOptions, periodic_rule
from taskmesh.periodic import CronError, CronRule, format_every, latest_tick, next_tick
from taskmesh.protocol import (
    PRODUCER,
    Ack,
    Error,
    Hello,
    PeriodicTask,
    Schedule,
    StatusReply,
    StatusRequest,
    TaskSpec,
    Unschedule,
)
from taskmesh.scheduler import Scheduler, SchedulerConfig, TaskState

pytestmark = pytest.mark.timeout(60)

P = b"producer"
WALL = 1_800_000_000.0  # a wall time that is a multiple of 10 s, 60 s and 3600 s


def at(text: str) -> float:
    return float(calendar.timegm(time.strptime(text, "%Y-%m-%d %H:%M")))


# --------------------------------------------------------------------------- cron


@pytest.mark.parametrize(
    ("line", "after", "expected"),
    [
        ("*/5 * * * *", "2026-11-30 08:03", "2026-11-30 08:05"),
        ("*/5 * * * *", "2026-11-30 08:05", "2026-11-30 08:10"),
        ("0 3 * * *", "2026-11-30 08:03", "2026-12-01 03:00"),
        ("30 9 * * mon-fri", "2026-12-04 10:00", "2026-12-07 09:30"),  # Fri -> Mon
        ("0 0 1 jan *", "2026-11-30 08:00", "2027-01-01 00:00"),
        ("0 12 31 * *", "2026-11-30 13:00", "2026-12-31 12:00"),  # November has no 31st
        ("0 0 29 2 *", "2026-03-01 00:00", "2028-02-29 00:00"),
        ("@hourly", "2026-11-30 08:59", "2026-11-30 09:00"),
        ("0 0 * * 7", "2026-11-30 00:00", "2026-12-06 00:00"),  # 7 is Sunday too
        # both day fields restricted: either matches (the 1st, or any Friday)
        ("0 6 1 * fri", "2026-12-01 07:00", "2026-12-04 06:00"),
        ("15,45 */6 * * *", "2026-11-30 06:20", "2026-11-30 06:45"),
        # a day field starting with "*" is unrestricted as in Vixie cron: both must match, so
        # odd days of the month that are also Mondays
        ("0 0 */2 * mon", "2026-11-30 00:00", "2026-12-07 00:00"),
    ],
)
def test_cron_next_after(line: str, after: str, expected: str) -> None:
    assert CronRule.parse(line).next_after(at(after)) == at(expected)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("* * * *", "has 4 fields; expected 5"),
        ("60 * * * *", "minute field: 60 is outside 0-59"),
        ("* 24 * * *", "hour field: 24 is outside 0-23"),
        ("* * 0 * *", "day of month field: 0 is outside 1-31"),
        ("* * * foo *", "month field: 'foo' is not a number or a known name"),
        ("*/0 * * * *", "step '0' is not a number >= 1"),
        ("10-5 * * * *", "range 10-5 runs backwards"),
        ("1,,2 * * * *", "empty list item"),
        ("0 0 31 2 *", "never matches a real date"),
        ("\u00b2 * * * *", "is not a number or a known name"),  # a digit, but not 0-9
        ("*/\u0663 * * * *", "is not a number >= 1"),
    ],
)
def test_cron_errors_name_the_field(line: str, message: str) -> None:
    with pytest.raises(CronError, match=message.replace("*", r"\*").replace("(", r"\(")):
        CronRule.parse(line)


def _brute_force(rule: CronRule, after: float) -> float:
    t = int(after // 60 + 1) * 60
    while True:
        g = time.gmtime(t)
        if (
            g.tm_min in rule.minutes
            and g.tm_hour in rule.hours
            and g.tm_mon in rule.months
            and rule.matches_day(g.tm_year, g.tm_mon, g.tm_mday)
        ):
            return float(t)
        t += 60


_field = st.one_of(
    st.just("*"),
    st.integers(1, 4).map(lambda n: f"*/{n}"),
)


@settings(max_examples=60, deadline=None)
@given(
    minute=st.sampled_from(["*", "*/7", "0", "15,45", "10-20/5"]),
    hour=st.sampled_from(["*", "*/3", "9", "0-6"]),
    day=st.sampled_from(["*", "1", "13-15", "*/10"]),
    month=st.sampled_from(["*", "*/2", "mar,jun"]),
    weekday=st.sampled_from(["*", "mon-fri", "0", "sat"]),
    after=st.floats(1.6e9, 1.9e9),
)
def test_cron_agrees_with_a_minute_by_minute_search(
    minute: str, hour: str, day: str, month: str, weekday: str, after: float
) -> None:
    rule = CronRule.parse(f"{minute} {hour} {day} {month} {weekday}")
    assert rule.next_after(after) == _brute_force(rule, after)


def test_interval_ticks_fall_on_multiples_of_the_interval() -> None:
    assert next_tick(10.0, None, WALL + 3) == WALL + 10
    assert next_tick(10.0, None, WALL) == WALL + 10  # strictly after
    assert latest_tick(10.0, None, WALL, WALL + 35) == (WALL + 30, 3)
    assert latest_tick(10.0, None, WALL, WALL + 5) == (WALL, 0)
    cron = CronRule.parse("*/5 * * * *")
    assert latest_tick(None, cron, WALL, WALL + 16 * 60) == (WALL + 15 * 60, 3)
    # down for 200 days: the latest tick still, found without walking every minute since
    minutely = CronRule.parse("* * * * *")
    started = time.perf_counter()
    latest, skipped = latest_tick(None, minutely, WALL, WALL + 200 * 86400 + 30)
    assert latest == WALL + 200 * 86400 and skipped == 10_000  # counted up to a cap
    assert time.perf_counter() - started < 1.0
    assert format_every(90) == "1m30s" and format_every(0.5) == "0.5s"


def test_periodic_options_are_checked_when_declared() -> None:
    assert periodic_rule(timedelta(minutes=5), None) == (300.0, None)
    with pytest.raises(ValueError, match="exactly one of every= and cron="):
        periodic_rule(5, "* * * * *")
    with pytest.raises(ValueError, match=r"between 0\.1 s and ten years, got -1 s"):
        TaskOptions(every=-1)
    for bad in (1e-30, float("inf"), float("nan"), 1e20):
        with pytest.raises(ValueError, match="periodic interval"):
            periodic_rule(bad, None)
    with pytest.raises(CronError, match="minute field"):
        TaskOptions(cron="99 * * * *")
    with pytest.raises(ValueError, match="route must be one of"):
        TaskOptions(route="fastest")


# --------------------------------------------------------------------------- the broker


def template(name: str = "beat") -> TaskSpec:
    return TaskSpec("template", name, "default", b"fn", b"args")


class Clock:
    """A scheduler whose wall clock is WALL + monotonic ``now``."""

    def __init__(self, scheduler: Scheduler | None = None) -> None:
        self.s = scheduler or Scheduler(SchedulerConfig(), wall_offset=WALL)
        self.s.handle(P, PRODUCER, Hello("c1"), 0.0)

    def schedule(self, periodic: PeriodicTask, now: float = 0.0) -> list[object]:
        self.s.handle(P, PRODUCER, Hello("c1"), now)  # idle producers are dropped by tick()
        sends = self.s.handle(P, PRODUCER, Schedule([periodic]), now)
        sends += self.s.flush(now)
        return [s.message for s in sends]

    def runs(self) -> list[str]:
        return sorted(t for t in self.s.tasks if t.startswith("periodic:"))


def test_a_periodic_task_runs_once_per_tick() -> None:
    c = Clock()
    replies = c.schedule(PeriodicTask("beat", 10.0, None, template()), now=3.0)
    assert replies == [Ack(["schedule:beat"])]
    assert c.s.next_deadline(3.0) == 10.0
    for now in (3.0, 9.9, 10.0, 10.5, 19.0, 20.0, 20.0, 31.0):
        c.s.tick(now)
    assert c.runs() == [f"periodic:beat:{int((WALL + t) * 1000)}" for t in (10, 20, 30)]
    record = c.s.tasks[c.runs()[0]]
    assert record.state is TaskState.PENDING and record.spec.fn == b"fn"
    snapshot = c.s.snapshot(31.0)["schedules"][0]
    assert snapshot["runs"] == 3 and snapshot["skipped"] == 0
    assert snapshot["next_at"] == WALL + 40 and snapshot["rule"] == "every 10s"


def test_registering_again_keeps_the_clock_and_a_new_rule_resets_it() -> None:
    c = Clock()
    c.schedule(PeriodicTask("beat", 10.0, None, template()), now=1.0)
    c.s.tick(10.0)
    c.schedule(PeriodicTask("beat", 10.0, None, template("beat-v2")), now=12.0)
    assert c.s.schedules["beat"].runs == 1 and c.s.schedules["beat"].next_at == WALL + 20
    c.s.tick(20.0)
    assert c.s.tasks[c.runs()[-1]].spec.name == "beat-v2"
    c.schedule(PeriodicTask("beat", None, "0 * * * *", template()), now=21.0)
    assert c.s.schedules["beat"].next_at == WALL + 3600


def test_unschedule_stops_it_and_an_unknown_name_is_an_error() -> None:
    c = Clock()
    c.schedule(PeriodicTask("beat", 10.0, None, template()))
    c.s.handle(P, PRODUCER, Unschedule(["beat"]), 1.0)
    c.s.tick(2.0)
    c.s.tick(50.0)
    assert c.runs() == []
    c.s.handle(P, PRODUCER, Hello("c1"), 51.0)
    replies = c.s.handle(P, PRODUCER, Unschedule(["beat"]), 51.0)
    assert [type(s.message) for s in replies] == [Error]
    assert replies[0].message.task_ids == ["schedule:beat"]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("periodic", "message"),
    [
        (PeriodicTask("x", None, "61 * * * *", template()), "minute field"),
        (PeriodicTask("x", None, "\u00b2 * * * *", template()), "minute field"),
        (PeriodicTask("x", 1e-30, None, template()), "between 0.1 s and ten years"),
        (PeriodicTask("x", 1e300, None, template()), "between 0.1 s and ten years"),
    ],
)
def test_a_bad_schedule_from_the_wire_is_refused_and_leaves_no_trace(
    periodic: PeriodicTask, message: str
) -> None:
    c = Clock()
    replies = c.schedule(periodic)
    errors = [m for m in replies if isinstance(m, Error)]
    assert errors and message in errors[0].message and errors[0].task_ids == ["schedule:x"]
    assert c.s.schedules == {} and not c.s.take_journal().schedules
    c.s.tick(100.0)  # and the broker goes on
    assert c.s.snapshot(100.0)["schedules"] == []


def test_status_lists_schedules() -> None:
    c = Clock()
    c.schedule(PeriodicTask("nightly", None, "0 3 * * *", template()))
    reply = c.s.handle(P, PRODUCER, StatusRequest(), 0.0)[0].message
    assert isinstance(reply, StatusReply)
    assert reply.snapshot["schedules"][0]["rule"] == "cron 0 3 * * *"


def _journaled(tmp_path: Path) -> tuple[Clock, SqliteJournal]:
    journal = SqliteJournal(str(tmp_path / "j.db"))
    c = Clock()
    c.schedule(PeriodicTask("beat", 10.0, None, template()), now=1.0)
    c.s.tick(10.0)
    journal.write(c.s.take_journal())  # the run and the advanced clock, in one transaction
    return c, journal


def test_a_restart_right_after_a_tick_does_not_run_it_again(tmp_path: Path) -> None:
    first, journal = _journaled(tmp_path)
    recovery = journal.load()
    assert [s.next_at for s in recovery.schedules] == [WALL + 20]
    again = Clock(Scheduler(SchedulerConfig(), wall_offset=WALL + 10.5))  # back 0.5 s later
    again.s.restore(recovery, 0.0)
    again.s.tick(0.0)
    assert again.runs() == first.runs()  # the tick at +10 is the journal's; no second one
    assert again.s.schedules["beat"].last_task_id == first.runs()[0]
    again.s.tick(10.0)  # wall +20.5
    assert len(again.runs()) == 2


def test_ticks_missed_while_down_are_coalesced_into_one_run(tmp_path: Path) -> None:
    _, journal = _journaled(tmp_path)
    # down from +10 until +65: the ticks at +20..+60 passed; one run, for +60
    again = Clock(Scheduler(SchedulerConfig(), wall_offset=WALL + 65))
    again.s.restore(journal.load(), 0.0)
    again.s.tick(0.0)
    runs = again.runs()
    assert runs[-1] == f"periodic:beat:{int((WALL + 60) * 1000)}"
    assert len([r for r in runs if r.startswith("periodic:beat")]) == 2  # +10 and +60
    record = again.s.schedules["beat"]
    assert (record.runs, record.skipped, record.next_at) == (2, 4, WALL + 70)
