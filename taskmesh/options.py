"""What a submission may set, validated once: a ``@task`` checks its options when it is
decorated, a per-call override when it is given, so the submit hot path checks nothing."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

from taskmesh.config import DEFAULT_QUEUE
from taskmesh.periodic import CronRule, check_every
from taskmesh.scheduler import Route
from taskmesh.serialize import qualified_name

#: per-call options: leading underscore so they never collide with the user's keyword arguments
CALL_OPTIONS = frozenset(
    {
        "_queue",
        "_priority",
        "_timeout",
        "_retries",
        "_retry_backoff",
        "_retry_on",
        "_max_attempts",
        "_countdown",
        "_key",
        "_rate_limit",
        "_eta",
        "_route",
    }
)


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """How a task is queued and run; every field can be overridden per call as ``_name=``."""

    queue: str = DEFAULT_QUEUE
    priority: int = 0
    timeout: float | None = None
    retries: int = 0
    retry_backoff: float = 0.0
    retry_on: tuple[type[BaseException], ...] = ()
    max_attempts: int = 3
    countdown: float = 0.0
    key: str | None = None
    rate_limit: str | float | None = None  # "100/s", "30/m", "5/h", or runs per second
    route: str | None = None  # a routing strategy for this task; None: its queue's
    every: float | timedelta | None = None  # periodic: run this often (see Task.schedule)
    cron: str | None = None  # periodic: run on this cron line (UTC)
    retry_names: tuple[str, ...] = field(init=False, default=())
    rate_per_s: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if not isinstance(self.queue, str) or not self.queue:
            raise ValueError(f"queue must be a non-empty string, got {self.queue!r}")
        if not isinstance(self.priority, int) or isinstance(self.priority, bool):
            raise TypeError(f"priority must be an int, got {self.priority!r}")
        if self.timeout is not None and not (
            isinstance(self.timeout, int | float) and self.timeout > 0
        ):
            raise ValueError(f"timeout must be a positive number of seconds, got {self.timeout!r}")
        if not isinstance(self.retries, int) or self.retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {self.retries!r}")
        if not isinstance(self.max_attempts, int) or self.max_attempts < 1:
            raise ValueError(f"max_attempts must be an int >= 1, got {self.max_attempts!r}")
        if not isinstance(self.countdown, int | float) or self.countdown < 0:
            raise ValueError(f"countdown must be >= 0 seconds, got {self.countdown!r}")
        if not isinstance(self.retry_backoff, int | float) or self.retry_backoff < 0:
            raise ValueError(f"retry_backoff must be >= 0 seconds, got {self.retry_backoff!r}")
        if self.key is not None and not isinstance(self.key, str):
            raise TypeError(f"key must be a string, got {self.key!r}")
        if self.route is not None and self.route not in _ROUTES:
            raise ValueError(f"route must be one of {', '.join(_ROUTES)}; got {self.route!r}")
        if self.every is not None or self.cron is not None:
            periodic_rule(self.every, self.cron)
        retry_on: Any = self.retry_on
        if isinstance(retry_on, type):
            retry_on = (retry_on,)
        for exc_type in retry_on:
            if not (isinstance(exc_type, type) and issubclass(exc_type, BaseException)):
                raise TypeError(f"retry_on takes exception classes, got {exc_type!r}")
        object.__setattr__(self, "retry_on", tuple(retry_on))
        object.__setattr__(self, "rate_per_s", parse_rate(self.rate_limit))
        object.__setattr__(self, "retry_names", tuple(qualified_name(t) for t in retry_on))

    def merged(self, overrides: dict[str, Any]) -> TaskOptions:
        """These options with per-call overrides (names without the underscore)."""
        if not overrides:
            return self
        unknown = set(overrides) - {f"{k[1:]}" for k in CALL_OPTIONS} - {"eta"}
        if unknown:
            raise TypeError(f"unknown task option(s): {', '.join(sorted(unknown))}")
        return replace(self, **overrides)


_PER = {"s": 1.0, "m": 60.0, "h": 3600.0}
_ROUTES = tuple(str(r) for r in Route)


def periodic_rule(
    every: float | timedelta | None, cron: str | None
) -> tuple[float | None, str | None]:
    """Check a periodic rule: exactly one of an interval (seconds or timedelta) and a cron line.
    Returns ``(every_s, cron)``."""
    if (every is None) == (cron is None):
        raise ValueError("a periodic task needs exactly one of every= and cron=")
    if cron is not None:
        CronRule.parse(cron)  # raises CronError (a ValueError) naming the bad field
        return None, cron
    seconds = every.total_seconds() if isinstance(every, timedelta) else every
    if isinstance(seconds, bool) or not isinstance(seconds, int | float):
        raise TypeError(f"every must be a number of seconds or a timedelta, got {every!r}")
    return check_every(seconds), None


def parse_rate(rate: str | float | None) -> float | None:
    """``"100/s"``, ``"30/m"``, ``"5/h"`` or a number of runs per second; None for no limit."""
    if rate is None:
        return None
    if isinstance(rate, int | float) and not isinstance(rate, bool):
        per_s = float(rate)
    elif isinstance(rate, str) and rate.count("/") == 1:
        count, unit = rate.split("/")
        try:
            per_s = float(count) / _PER[unit.strip()]
        except (ValueError, KeyError):
            raise ValueError(f"rate_limit {rate!r}: expected N/s, N/m or N/h") from None
    else:
        raise ValueError(f"rate_limit {rate!r}: expected N/s, N/m or N/h, or runs per second")
    if not per_s > 0:
        raise ValueError(f"rate_limit must be positive, got {rate!r}")
    return per_s


DEFAULT_OPTIONS = TaskOptions()


def split_call_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Pop the ``_option=`` keyword arguments out of a call's kwargs (names without ``_``)."""
    if not kwargs:
        return {}
    options = {name[1:]: kwargs.pop(name) for name in [k for k in kwargs if k in CALL_OPTIONS]}
    if "eta" in options:
        options["countdown"] = countdown_until(options.pop("eta"))
    return options


def countdown_until(eta: datetime) -> float:
    """Seconds from now until ``eta`` (a naive datetime is local time); 0 if it has passed."""
    if not isinstance(eta, datetime):
        raise TypeError(f"_eta must be a datetime, got {eta!r}")
    now = datetime.now(eta.tzinfo) if eta.tzinfo is not None else datetime.now()
    return max(0.0, (eta - now).total_seconds())
