"""When periodic tasks are due: interval and cron rules as pure functions of wall time (UTC).

Ticks are points in time that do not depend on when a schedule was registered or when the
broker started: an interval's ticks are the multiples of the interval since the Unix epoch
(``every=timedelta(hours=1)`` runs on the hour), and a cron line's ticks are the minutes it
matches. A tick is therefore a stable identity, which is what makes "exactly once per tick"
checkable across a broker restart: a run's task id is derived from its tick.

Catch-up rule (the broker applies it; see ``Scheduler``): when one or more ticks passed while
the broker was down, the task runs once, at start-up, for the latest of them; the ticks missed
before it are skipped (and counted), never replayed as a storm.
"""

from __future__ import annotations

import calendar
import math
import re
import time
from dataclasses import dataclass

_MONTHS = {m.lower(): i for i, m in enumerate(calendar.month_abbr) if m}
_DAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
# (name, lowest, highest, names)
_NO_NAMES: dict[str, int] = {}
_FIELDS: tuple[tuple[str, int, int, dict[str, int]], ...] = (
    ("minute", 0, 59, _NO_NAMES),
    ("hour", 0, 23, _NO_NAMES),
    ("day of month", 1, 31, _NO_NAMES),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)
_SEARCH_YEARS = 8
_DIGITS = re.compile(r"[0-9]+")
#: the shortest and longest interval a periodic task may have
MIN_EVERY_S = 0.1
MAX_EVERY_S = 10 * 366 * 86400.0
#: how far back the catch-up rule looks for a cron rule's latest tick, in widening windows
_LOOK_BACK_S = (3600.0, 86400.0, 32 * 86400.0, 366 * 86400.0, 8 * 366 * 86400.0)
_COUNT_CAP = 10_000  # skipped cron ticks are counted up to this many


def check_every(every_s: float) -> float:
    """An interval must be finite and between MIN_EVERY_S and MAX_EVERY_S."""
    if not (isinstance(every_s, int | float) and math.isfinite(every_s)):
        raise ValueError(f"a periodic interval must be a finite number of seconds, got {every_s!r}")
    if not MIN_EVERY_S <= every_s <= MAX_EVERY_S:
        raise ValueError(
            f"a periodic interval must be between {MIN_EVERY_S:g} s and ten years, "
            f"got {every_s:g} s"
        )
    return float(every_s)  # "30 2 29 2 *" (Feb 29) recurs within 8 years; nothing valid is rarer


class CronError(ValueError):
    """A cron line that cannot be parsed; the message says which field and why."""


@dataclass(frozen=True, slots=True)
class CronRule:
    """A standard five-field cron line: minute hour day-of-month month day-of-week (UTC).

    As in Vixie cron, when both day fields are restricted a day matches either of them.
    """

    text: str
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # day of month starts with "*" (Vixie cron's rule for "either day")
    any_weekday: bool  # day of week starts with "*"

    @classmethod
    def parse(cls, text: str) -> CronRule:
        if not isinstance(text, str):
            raise CronError(f"a cron line must be a string, got {text!r}")
        line = _MACROS.get(text.strip().lower(), text)
        parts = line.split()
        if len(parts) != 5:
            raise CronError(
                f"cron line {text!r} has {len(parts)} fields; expected 5: "
                "minute hour day-of-month month day-of-week"
            )
        sets = [_parse_field(part, *spec) for part, spec in zip(parts, _FIELDS, strict=True)]
        weekdays = frozenset(d % 7 for d in sets[4])
        rule = cls(
            text,
            sets[0],
            sets[1],
            sets[2],
            sets[3],
            weekdays,
            parts[2].startswith("*"),  # as in Vixie cron: "*/2" leaves the day unrestricted
            parts[4].startswith("*"),
        )
        if rule.next_after(0.0) is None:
            raise CronError(f"cron line {text!r} never matches a real date")
        return rule

    def matches_day(self, year: int, month: int, day: int) -> bool:
        weekday = (calendar.weekday(year, month, day) + 1) % 7  # Python: Monday=0
        in_month = day in self.days
        in_week = weekday in self.weekdays
        if self.any_day or self.any_weekday:
            return in_month and in_week  # a "*" field holds every day: the other one decides
        return in_month or in_week

    def next_after(self, after: float) -> float | None:
        """The first matching minute strictly after ``after`` (Unix seconds), or None."""
        start = int(after // 60 + 1) * 60
        t = time.gmtime(start)
        year, month, day, hour, minute = t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min
        last_year = year + _SEARCH_YEARS
        while year <= last_year:
            if month not in self.months:
                year, month = (year + 1, 1) if month == 12 else (year, month + 1)
                day, hour, minute = 1, 0, 0
                continue
            if day > calendar.monthrange(year, month)[1]:
                year, month = (year + 1, 1) if month == 12 else (year, month + 1)
                day, hour, minute = 1, 0, 0
                continue
            if not self.matches_day(year, month, day):
                day, hour, minute = day + 1, 0, 0
                continue
            later_hour = next((h for h in sorted(self.hours) if h >= hour), None)
            if later_hour is None:
                day, hour, minute = day + 1, 0, 0
                continue
            if later_hour > hour:
                hour, minute = later_hour, 0
            later_minute = next((m for m in sorted(self.minutes) if m >= minute), None)
            if later_minute is None:
                hour, minute = hour + 1, 0
                if hour > 23:
                    day, hour = day + 1, 0
                continue
            return float(calendar.timegm((year, month, day, hour, later_minute, 0)))
        return None


def _parse_field(
    part: str, name: str, low: int, high: int, names: dict[str, int]
) -> frozenset[int]:
    values: set[int] = set()
    for item in part.split(","):
        if not item:
            raise CronError(f"{name} field {part!r}: empty list item")
        base, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not _DIGITS.fullmatch(step_text) or int(step_text) < 1:
                raise CronError(f"{name} field {part!r}: step {step_text!r} is not a number >= 1")
            step = int(step_text)
        if base == "*":
            first, last = low, high
        elif "-" in base:
            a, _, b = base.partition("-")
            first, last = _value(a, name, low, high, names), _value(b, name, low, high, names)
            if first > last:
                raise CronError(f"{name} field {part!r}: range {base} runs backwards")
        else:
            first = _value(base, name, low, high, names)
            last = high if step_text else first
        values.update(range(first, last + 1, step))
    return frozenset(values)


def _value(text: str, name: str, low: int, high: int, names: dict[str, int]) -> int:
    key = text.strip().lower()
    if key in names:
        return names[key]
    if not _DIGITS.fullmatch(key):
        raise CronError(f"{name} field: {text!r} is not a number or a known name")
    value = int(key)
    if not low <= value <= high:
        raise CronError(f"{name} field: {value} is outside {low}-{high}")
    return value


def next_tick(every_s: float | None, cron: CronRule | None, after: float) -> float | None:
    """The first tick strictly after ``after`` (wall seconds) of an interval or a cron rule."""
    if cron is not None:
        return cron.next_after(after)
    if every_s is None or not every_s > 0:
        return None
    return (math.floor(after / every_s) + 1) * every_s


def latest_tick(
    every_s: float | None, cron: CronRule | None, first: float, now: float
) -> tuple[float, int]:
    """The last tick in ``[first, now]`` (``first`` is a tick, ``first <= now``) and how many
    ticks before it were passed over: the catch-up rule runs the last one only."""
    if every_s is not None and every_s > 0:
        passed = max(0, math.floor((now - first) / every_s))
        return first + passed * every_s, passed
    if cron is None:
        return first, 0
    latest = first
    for window in _LOOK_BACK_S:  # the latest tick is usually recent: look there first
        start = max(first, now - window)
        found = _last_before(cron, start, now)
        if found is not None:
            latest = max(latest, found)
            break
    return latest, _count_between(cron, first, latest)


def _last_before(cron: CronRule, start: float, now: float) -> float | None:
    """The last tick in ``[start, now]``, or None."""
    last = None
    tick = cron.next_after(start - 1.0)
    while tick is not None and tick <= now:
        last = tick
        tick = cron.next_after(tick)
    return last


def _count_between(cron: CronRule, first: float, latest: float) -> int:
    """Ticks in ``[first, latest)``, counted up to _COUNT_CAP."""
    count = 0
    tick: float | None = first
    while tick is not None and tick < latest and count < _COUNT_CAP:
        count += 1
        tick = cron.next_after(tick)
    return count


def format_every(seconds: float) -> str:
    """``every 90s`` as people write it: 1m30s, 2h, 1d."""
    if not math.isfinite(seconds):
        return f"{seconds}s"
    whole = int(seconds)
    if whole != seconds or whole == 0:
        return f"{seconds:g}s"
    parts = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if whole >= size:
            parts.append(f"{whole // size}{unit}")
            whole %= size
    return "".join(parts)
