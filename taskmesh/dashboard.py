"""``taskmesh dashboard``: the whole mesh, live, in a terminal.

Three parts, so that everything drawn can be tested without a terminal or a broker:

- ``DashboardState``: a frozen value built from successive status snapshots. The broker keeps
  counters, not clocks, so rates (overall, per worker, per queue) and the one-minute throughput
  history come from counter deltas between the snapshots taken here. Watching the mesh costs the
  broker one status request per refresh and nothing per task.
- ``render(state, now, width, height)``: pure. It lays sections out by priority (header,
  workers, queues, throughput, failures), drops columns and rows that do not fit 80x24, and
  grows into whatever larger screen it is given.
- ``run_dashboard``: the I/O shell: ``fetch_status`` once per refresh, keys from stdin in cbreak
  mode, ``rich.live`` on the alternate screen, the terminal restored however it ends.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import select
import signal
import sys
import termios
import time
import tty
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from types import FrameType
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.styled import Styled
from rich.text import Text

from taskmesh.client import fetch_status
from taskmesh.errors import BrokerUnavailable
from taskmesh.screen import Col, Section, heading, spark_lines, stack, table_section, two_sided
from taskmesh.transport import check_endpoint

HISTORY_S = 60.0  # the throughput sparkline spans the last minute
RATE_WINDOW_S = 5.0  # one 0.5 s refresh is too jumpy (results arrive in batches); 5 s is current
STATE_STYLE = {"alive": "green", "suspect": "bold yellow", "dead": "bold red", "left": "dim"}

# ---------------------------------------------------------------------------- state


@dataclass(frozen=True, slots=True)
class Sample:
    """The counters of one snapshot, kept only as long as a rate or the history needs them."""

    at: float  # monotonic seconds when the snapshot arrived
    broker_id: str  # counters restart from zero with a new broker
    finished: int  # done + failed, made monotonic across broker restarts (for the history)
    raw_finished: int  # done + failed as the broker reported it
    workers: Mapping[str, int]  # worker_id -> done + failed
    queues: Mapping[str, int]  # queue name -> done + failed


@dataclass(frozen=True, slots=True)
class DashboardState:
    """What the dashboard knows: the last snapshot, recent counters, and whether it is current.

    Immutable: ``observe`` and ``unreachable`` return a new state, so a test builds any
    situation from recorded snapshot dicts and an explicit clock.
    """

    broker: str
    snapshot: Mapping[str, Any] | None = None
    fetched_at: float | None = None  # monotonic time of ``snapshot``
    samples: tuple[Sample, ...] = ()
    error: str | None = None  # why the last fetch failed; None while the broker answers
    unreachable_since: float | None = None

    def observe(self, snapshot: Mapping[str, Any], now: float) -> DashboardState:
        """A new snapshot arrived at ``now`` (monotonic seconds)."""
        broker_id = str(snapshot.get("broker_id", ""))
        counters = snapshot.get("counters", {})
        raw = int(counters.get("done", 0)) + int(counters.get("failed", 0))
        finished = raw
        if self.samples:
            last = self.samples[-1]
            same = last.broker_id == broker_id and raw >= last.raw_finished
            finished = last.finished + (raw - last.raw_finished if same else raw)
        sample = Sample(
            at=now,
            broker_id=broker_id,
            finished=finished,
            raw_finished=raw,
            workers={
                str(w.get("worker_id", w.get("name"))): int(w.get("done", 0))
                + int(w.get("failed", 0))
                for w in snapshot.get("workers", [])
            },
            queues={
                str(q["name"]): int(q.get("done", 0)) + int(q.get("failed", 0))
                for q in snapshot.get("queues", [])
            },
        )
        return replace(
            self,
            snapshot=snapshot,
            fetched_at=now,
            samples=_trim((*self.samples, sample), now),
            error=None,
            unreachable_since=None,
        )

    def unreachable(self, error: str, now: float) -> DashboardState:
        """A fetch failed: keep the last snapshot (shown stale) and note since when."""
        since = self.unreachable_since if self.unreachable_since is not None else now
        return replace(self, error=error, unreachable_since=since)

    @property
    def connected(self) -> bool:
        return self.snapshot is not None and self.error is None

    def rate(self) -> float | None:
        """Tasks finished per second (done + failed) over the last few seconds."""
        return self._rate(lambda s: s.finished, across_brokers=True)

    def worker_rate(self, worker_id: str) -> float | None:
        return self._rate(lambda s: s.workers.get(worker_id))

    def queue_rate(self, name: str) -> float | None:
        return self._rate(lambda s: s.queues.get(name))

    def _rate(
        self, value: Callable[[Sample], int | None], across_brokers: bool = False
    ) -> float | None:
        if len(self.samples) < 2:
            return None
        last = self.samples[-1]
        base = self.samples[-2]
        for sample in self.samples[:-1]:  # the oldest one inside the window, if any
            if sample.at >= last.at - RATE_WINDOW_S:
                base = sample
                break
        v0, v1 = value(base), value(last)
        dt = last.at - base.at
        if v0 is None or v1 is None or v1 < v0 or dt <= 0:
            return None
        if not across_brokers and base.broker_id != last.broker_id:
            return None
        return (v1 - v0) / dt

    def throughput(self, buckets: int) -> list[float | None]:
        """Tasks/s in ``buckets`` equal slices of the minute before the last snapshot.

        Finished counts are interpolated linearly between samples, so the history works for any
        number of columns; a slice before the first sample is ``None`` (nothing known).
        """
        if buckets <= 0 or len(self.samples) < 2:
            return [None] * max(buckets, 0)
        times = [s.at for s in self.samples]
        end = times[-1]
        step = HISTORY_S / buckets

        def finished_at(t: float) -> float:
            i = bisect.bisect_right(times, t)
            if i >= len(times):
                return float(self.samples[-1].finished)
            a, b = self.samples[i - 1], self.samples[i]
            return a.finished + (b.finished - a.finished) * (t - a.at) / (b.at - a.at)

        out: list[float | None] = []
        for k in range(buckets):
            t0 = end - HISTORY_S + k * step
            t1 = t0 + step
            if t0 < times[0] - 1e-9:
                out.append(None)
            else:
                out.append(max(0.0, (finished_at(t1) - finished_at(t0)) / step))
        return out


def _trim(samples: tuple[Sample, ...], now: float) -> tuple[Sample, ...]:
    """Keep the last minute plus the sample just before it (the history interpolates from it)."""
    horizon = now - HISTORY_S - RATE_WINDOW_S
    first = 0
    while first + 1 < len(samples) and samples[first + 1].at <= horizon:
        first += 1
    return samples[first:]


# ---------------------------------------------------------------------------- formatting


def _duration(seconds: float) -> str:
    s = int(max(seconds, 0))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def _rate_text(rate: float | None) -> str:
    if rate is None:
        return "—"
    return f"{rate:.1f}" if rate < 100 else f"{rate:,.0f}"


def _seconds(value: Any) -> str:
    """A latency in the unit that keeps it short: 50us, 25ms, 2.5s, 5m00s; "—" if unknown."""
    if value is None:
        return "—"
    s = float(value)
    if s == float("inf"):
        return "inf"
    if s < 0.001:
        return f"{s * 1e6:.0f}us"
    if s < 1:
        return f"{s * 1000:.0f}ms"
    return f"{s:.1f}s" if s < 60 else _duration(s)


def _percentiles(label: str, summary: Mapping[str, Any] | None) -> str:
    """``  wait p50 5ms p95 25ms p99 100ms`` from a broker histogram summary, if it has one.

    The broker's histograms count since it started and report bucket upper bounds."""
    if not summary or not summary.get("count"):
        return ""
    parts = (f"{q} {_seconds(summary.get(f'{q}_s'))}" for q in ("p50", "p95", "p99"))
    return f"  {label} " + " ".join(parts)


def _short(name: str) -> str:
    """``taskmesh.demo.InvalidRecord`` -> ``InvalidRecord``: the last dotted part is what users
    recognise, and columns are narrow."""
    return name.rsplit(".", 1)[-1] or name


def _slots(busy: int, total: int) -> Text:
    """One cell per slot (a proportional 8-cell bar past 8 slots), then busy/total."""
    cells = min(total, 8)
    filled = min(cells, busy if total <= 8 else round(busy / max(total, 1) * cells))
    text = Text("█" * filled, style="green")
    text.append("░" * (cells - filled), style="dim")
    text.append(f" {busy}/{total}")
    return text


def _running(names: Sequence[str]) -> str:
    counts = Counter(_short(n) for n in names)
    return ", ".join(name if n == 1 else f"{name} x{n}" for name, n in counts.items())


# ---------------------------------------------------------------------------- sections


WORKER_COLS = (
    Col("name", 0),
    Col("host", 7),
    Col("pid", 8, "right"),
    Col("queues", 6),
    Col("slots", 1),
    Col("done", 3, "right"),
    Col("failed", 3, "right"),
    Col("tasks/s", 2, "right"),
    Col("heartbeat", 5, "right"),
    Col("state", 0),
    Col("running now", 4, flexible=14),
)


def _dead_workers(snapshot: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """Workers that died or left, newest first, minus any that came back (same name and pid)."""
    live = {(w.get("name"), w.get("host"), w.get("pid")) for w in snapshot.get("workers", [])}
    seen: set[tuple[Any, Any, Any]] = set()
    out = []
    for d in reversed(snapshot.get("dead_workers", [])):
        key = (d.get("name"), d.get("host"), d.get("pid"))
        if key not in live and key not in seen:
            seen.add(key)
            out.append(d)
    return out


def _worker_rows(state: DashboardState, snapshot: Mapping[str, Any]) -> list[list[Text]]:
    current = state.connected  # a rate from before the broker went quiet is not a rate now
    rows = []
    for w in snapshot.get("workers", []):
        st = str(w.get("state", "alive"))
        age = float(w.get("heartbeat_age_s", 0.0))
        rate = state.worker_rate(str(w.get("worker_id", w.get("name")))) if current else None
        rows.append(
            [
                Text(str(w.get("name", "?"))),
                Text(str(w.get("host", ""))),
                Text(str(w.get("pid", ""))),
                Text(",".join(w.get("queues", []))),
                _slots(int(w.get("busy", 0)), int(w.get("concurrency", 0))),
                Text(f"{int(w.get('done', 0)):,}"),
                Text(f"{int(w.get('failed', 0)):,}", style="red" if w.get("failed") else ""),
                Text(_rate_text(rate)),
                Text(f"{age:.1f}s", style=STATE_STYLE.get(st, "") if st != "alive" else ""),
                Text(st, style=STATE_STYLE.get(st, "")),
                Text(
                    _running(w.get("running", [])) or "idle",
                    style="cyan" if w.get("running") else "dim",
                ),
            ]
        )
    gone = _dead_workers(snapshot)
    gone.sort(key=lambda d: d.get("reason") == "left")  # the dead before those that left
    for d in gone:
        reason = str(d.get("reason", ""))
        st = "left" if reason == "left" else "dead"
        rows.append(
            [
                Text(str(d.get("name", "?")), style="dim"),
                Text(str(d.get("host", "")), style="dim"),
                Text(str(d.get("pid", "")), style="dim"),
                *(Text("") for _ in range(6)),
                Text(st, style=STATE_STYLE[st]),
                Text(reason if st == "dead" else "", style="dim"),
            ]
        )
    return rows


QUEUE_COLS = (
    Col("queue", 0),
    Col("pending", 0, "right"),
    Col("oldest", 2, "right"),
    Col("delayed", 3, "right"),
    Col("waiting", 3, "right"),
    Col("running", 1, "right"),
    Col("done", 1, "right"),
    Col("failed", 1, "right"),
    Col("tasks/s", 2, "right"),
)


def _queue_rows(state: DashboardState, snapshot: Mapping[str, Any]) -> list[list[Text]]:
    rows = []
    for q in snapshot.get("queues", []):
        failed = int(q.get("failed", 0))
        rows.append(
            [
                Text(str(q["name"])),
                Text(f"{int(q.get('pending', 0)):,}", style="bold" if q.get("pending") else ""),
                Text(_seconds(q.get("head_wait_s"))),
                Text(f"{int(q.get('delayed', 0)):,}"),
                Text(f"{int(q.get('waiting', 0)):,}"),
                Text(f"{int(q.get('running', 0)):,}"),
                Text(f"{int(q.get('done', 0)):,}"),
                Text(f"{failed:,}", style="red" if failed else ""),
                Text(_rate_text(state.queue_rate(str(q["name"])) if state.connected else None)),
            ]
        )
    return rows


FAILURE_COLS = (
    Col("time", 1),
    Col("task", 0),
    Col("exception", 0),
    Col("message", 1, flexible=24),  # after time, before worker when the width is short
    Col("worker", 1),
    Col("task_id", 5),
)


def _failure_rows(snapshot: Mapping[str, Any]) -> list[list[Text]]:
    rows = []
    for f in reversed(snapshot.get("recent_failures", [])):
        at = f.get("at")
        clock = time.strftime("%H:%M:%S", time.localtime(float(at))) if at else ""
        rows.append(
            [
                Text(clock, style="dim"),
                Text(_short(str(f.get("name", "?")))),
                Text(_short(str(f.get("type", "?"))), style="red"),
                Text(str(f.get("message", "")).replace("\n", " ")),
                Text(str(f.get("worker") or "—")),
                Text(str(f.get("task_id", "")), style="dim"),
            ]
        )
    return rows


# ---------------------------------------------------------------------------- the screen


def _header(state: DashboardState, now: float, hint: str) -> list[RenderableType]:
    """Two lines: where the broker is and how long it has run; the mesh's totals and rate."""
    snap = state.snapshot or {}
    info = snap.get("broker", {})
    left = Text("taskmesh ", style="bold")
    left.append(state.broker, style="bold cyan")
    if "uptime_s" in info and state.fetched_at is not None:
        stale = 0.0 if state.error else now - state.fetched_at
        left.append(f"  up {_duration(float(info['uptime_s']) + stale)}")
    if info.get("journal"):
        left.append(f"  journal {info['journal']}", style="dim")
    if state.error is not None:
        since = state.unreachable_since if state.unreachable_since is not None else now
        right = Text(f"reconnecting… {_duration(now - since)}", style="bold yellow reverse")
    elif state.snapshot is None:
        right = Text("connecting…", style="bold yellow")
    else:
        right = Text("● live", style="bold green")
        if hint:
            right.append(f"  {hint}", style="dim")

    counters = snap.get("counters", {})
    states = Counter(str(w.get("state", "alive")) for w in snap.get("workers", []))
    for d in _dead_workers(snap):
        states["left" if d.get("reason") == "left" else "dead"] += 1
    line = Text("workers ", style="bold")
    line.append(f"{states['alive']} alive", style="green")
    for st in ("suspect", "dead"):  # workers that left on purpose are only in the table
        if states[st]:
            line.append(f" {states[st]} {st}", style=STATE_STYLE[st])
    for key in ("done", "failed", "requeued"):
        value = int(counters.get(key, 0))
        line.append(f"  {key} ", style="bold")
        line.append(f"{value:,}", style="red" if key == "failed" and value else "")
    rate = Text(_rate_text(state.rate() if state.connected else None), style="bold cyan")
    rate.append(" tasks/s", style="")
    return [two_sided(left, right), two_sided(line, rate)]


def _throughput_section(
    state: DashboardState, run: Mapping[str, Any] | None, width: int, height: int
) -> Section:
    """The sparkline over the last minute, taller on a taller screen (8 levels a line)."""
    history = state.throughput(max(width, 1))
    known = [v for v in history if v is not None]
    detail = f"last {HISTORY_S:.0f}s"
    if known:
        mean = sum(known) / len(known)
        detail += f"  peak {_rate_text(max(known))}/s  mean {_rate_text(mean)}/s"
    detail += _percentiles("run", run)
    title = heading("throughput", detail)
    return Section(1, max(2, min(8, height // 10)), 1, lambda n: [title, *spark_lines(history, n)])


def render(
    state: DashboardState, now: float, width: int, height: int, *, hint: str = "q quits"
) -> RenderableType:
    """The whole screen for ``state`` at monotonic time ``now``, at most ``height`` lines.

    Pure: no I/O and no clock, so the layout is tested by rendering recorded snapshots. ``hint``
    names the keys the caller listens to (the demo listens to none).
    """
    header = _header(state, now, hint)
    snap = state.snapshot
    if snap is None:
        why = state.error or "waiting for the first status snapshot"
        waiting = Text(f"no answer yet from {state.broker}: {why}", style="yellow")
        return Group(*header, Text(""), waiting)

    workers = snap.get("workers", [])
    busy = sum(int(w.get("busy", 0)) for w in workers)
    slots = sum(int(w.get("concurrency", 0)) for w in workers)
    pending = sum(int(q.get("pending", 0)) for q in snap.get("queues", []))
    latency = snap.get("latency", {})
    sections = [
        table_section(
            "workers",
            f"{busy}/{slots} slots busy",
            WORKER_COLS,
            _worker_rows(state, snap),
            width,
            "workers",
            3,
        ),
        table_section(
            "queues",
            f"{pending:,} pending" + _percentiles("wait", latency.get("queue_wait")),
            QUEUE_COLS,
            _queue_rows(state, snap),
            width,
            "queues",
            2,
        ),
        _throughput_section(state, latency.get("run"), width, height),
        table_section(
            "last failures",
            "newest first",
            FAILURE_COLS,
            _failure_rows(snap),
            width,
            "failures",
            2,
        ),
    ]
    body = stack(sections, height - len(header))
    if state.error is not None:
        return Group(*header, Styled(Group(*body), "dim"))
    return Group(*header, *body)


# ---------------------------------------------------------------------------- the live loop


class _Keys:
    """Keys from a terminal in cbreak mode: no Enter needed, no echo; Ctrl-C still interrupts."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def quit_before(self, deadline: float) -> bool:
        """Wait until ``deadline``; True as soon as ``q`` is pressed."""
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.fd is None:
                time.sleep(left)  # paces the refresh; nothing to read
                continue
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                data = os.read(self.fd, 64)
                if not data:  # end of input: no more keys, keep refreshing
                    self.fd = None
                elif b"q" in data or b"Q" in data:
                    return True


@contextlib.contextmanager
def _cbreak(stream: Any) -> Iterator[int | None]:
    """Put a terminal stdin in cbreak mode and always restore its previous settings."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        yield None
        return
    if not os.isatty(fd):
        yield fd
        return
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the terminal is restored on ``kill`` too."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, interrupt)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_dashboard(
    broker: str,
    refresh_s: float = 0.5,
    *,
    timeout_s: float | None = None,
    console: Console | None = None,
) -> None:
    """Show the mesh behind ``broker`` until ``q``, Ctrl-C or SIGTERM.

    One ``fetch_status`` per refresh. A fetch that fails marks the view "reconnecting…" and the
    next refresh simply tries again (each fetch opens a fresh connection), so the dashboard
    recovers by itself when the broker returns. ``timeout_s`` bounds one fetch (default: two
    refreshes, at least a second), which also bounds how long ``q`` can wait to be read.
    """
    if refresh_s <= 0:
        raise ValueError(f"refresh_s must be > 0, got {refresh_s!r}")
    check_endpoint(broker)  # a malformed address is an error now, not "reconnecting" forever
    timeout = timeout_s if timeout_s is not None else max(1.0, 2 * refresh_s)
    console = console or Console()
    state = DashboardState(broker)

    def show(live: Live) -> None:
        width, height = console.size  # read every frame: the terminal may have been resized
        live.update(render(state, time.monotonic(), width, height), refresh=True)

    try:
        with (
            _cbreak(sys.stdin) as fd,
            _sigterm_interrupts(),
            Live(console=console, screen=True, auto_refresh=False, redirect_stdout=False) as live,
        ):
            keys = _Keys(fd)
            show(live)  # "connecting…" at once, not a blank screen for a whole fetch timeout
            while True:
                started = time.monotonic()
                try:
                    snapshot = fetch_status(broker, timeout)
                except BrokerUnavailable as exc:
                    state = state.unreachable(str(exc), time.monotonic())
                else:
                    state = state.observe(snapshot, time.monotonic())
                show(live)
                if keys.quit_before(started + refresh_s):
                    return
    except KeyboardInterrupt:
        return  # the with-block has restored the screen and the terminal modes


__all__ = ["DashboardState", "Sample", "render", "run_dashboard"]
