"""``taskmesh demo``: an embedded broker and local workers running a real workload.

The workload counts the primes below a bound in a few hundred chunks (checked against a local
sieve at the end), plus a batch of record validations of which some fail on purpose. Mid-run one
worker node is killed with SIGKILL: its tasks are requeued and finish elsewhere, and a fresh
worker joins. The summary says what happened; the exit code says whether every task was
accounted for.
"""

from __future__ import annotations

import math
import signal
import threading
import time
from typing import Any, cast

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from taskmesh.client import TaskFuture
from taskmesh.dashboard import DashboardState, render
from taskmesh.errors import TaskmeshError
from taskmesh.task import task
from taskmesh.testing import Mesh

PRIME_BOUND = 6_000_000


@task
def count_primes(lo: int, hi: int) -> int:
    """Primes in [lo, hi) by trial division: honest CPU work of a few tens of milliseconds."""
    count = 0
    for n in range(max(lo, 2), hi):
        if n < 4:
            count += 1
            continue
        if n % 2 == 0:
            continue
        limit = math.isqrt(n)
        for d in range(3, limit + 1, 2):
            if n % d == 0:
                break
        else:
            count += 1
    return count


class InvalidRecord(ValueError):
    pass


@task
def validate_record(record_id: int) -> int:
    """Every seventh record is malformed on purpose, to show remote exceptions coming back."""
    if record_id % 7 == 3:
        raise InvalidRecord(f"record {record_id}: checksum mismatch")
    return record_id


def primes_below(bound: int) -> int:
    sieve = bytearray([1]) * bound
    sieve[0:2] = b"\0\0"
    for i in range(2, math.isqrt(bound) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, bound, i)))
    return sum(sieve)


def run_demo(tasks: int = 300, workers: int = 2, concurrency: int = 2) -> int:
    console = Console()
    n_validations = max(tasks // 6, 7)
    n_chunks = tasks - n_validations
    chunk = math.ceil(PRIME_BOUND / n_chunks)
    console.print(
        f"[bold]taskmesh demo[/]: an embedded broker and {workers} worker nodes of "
        f"{concurrency} executors; {n_chunks} prime-counting tasks and {n_validations} record "
        "validations"
    )
    with Mesh(
        workers=workers, concurrency=concurrency, heartbeat_interval_s=0.25, log_level="WARNING"
    ) as mesh:
        console.print(
            f"broker listening on {mesh.url}; workers: " + ", ".join(w.name for w in mesh.workers)
        )
        with mesh.client() as client:
            started = time.monotonic()
            futures: list[TaskFuture[Any]] = [
                client.submit(count_primes, lo, min(lo + chunk, PRIME_BOUND))
                for lo in range(0, PRIME_BOUND, chunk)
            ]
            futures += [client.submit(validate_record, i) for i in range(n_validations)]
            outcome = _watch(console, mesh, futures, started)
            elapsed = time.monotonic() - started
            counters = mesh.status()["counters"]
    return _summary(console, outcome, counters, elapsed, len(futures))


def _watch(
    console: Console, mesh: Mesh, futures: list[TaskFuture[Any]], started: float
) -> dict[str, Any]:
    from concurrent.futures import as_completed

    primes = 0
    done = failed_on_purpose = unexpected = 0
    victim = mesh.workers[0]
    killed = False
    live = console.is_terminal and not console.is_dumb_terminal
    view = _LiveView(console, mesh, len(futures)) if live else _PlainView(console, len(futures))
    with view:
        for completed in as_completed(futures, timeout=600):
            future = cast(TaskFuture[Any], completed)
            exc = future.exception()
            if exc is None:
                done += 1
                if future.name.endswith("count_primes"):
                    primes += future.result()
            elif isinstance(exc, InvalidRecord):
                failed_on_purpose += 1
            else:
                unexpected += 1
                view.note(f"[red]unexpected failure[/] {future.name}: {exc!r}")
            view.update(done=done, failed=failed_on_purpose + unexpected)
            if not killed and done + failed_on_purpose >= len(futures) * 0.35:
                killed = True
                victim.signal(signal.SIGKILL)
                view.note(
                    f"[yellow]killed worker {victim.name} (pid {victim.pid}) with SIGKILL at "
                    f"{time.monotonic() - started:.1f}s: its tasks will be requeued[/]"
                )
                joined = mesh.add_worker("worker-replacement")
                view.note(f"[green]worker {joined.name} joins the mesh[/]")
    return {
        "primes": primes,
        "done": done,
        "failed_on_purpose": failed_on_purpose,
        "unexpected": unexpected,
    }


class _PlainView:
    """A progress bar and printed notes: for logs, pipes and CI, where a live screen is noise."""

    def __init__(self, console: Console, total: int) -> None:
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("done {task.fields[done]}  failed {task.fields[failed]}"),
            TimeElapsedColumn(),
        )
        self._progress = Progress(*columns, console=console)
        self._bar = self._progress.add_task("tasks", total=total, done=0, failed=0)

    def __enter__(self) -> _PlainView:
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.__exit__(None, None, None)

    def update(self, done: int, failed: int) -> None:
        self._progress.update(self._bar, advance=1, done=done, failed=failed)

    def note(self, markup: str) -> None:
        self._progress.console.print(markup)


class _LiveView:
    """The live dashboard of the demo's own mesh, under a progress line and the latest notes.

    A thread takes one status snapshot per refresh (as ``taskmesh dashboard`` does) while the
    main thread collects results; the final frame stays on screen above the summary.
    """

    def __init__(self, console: Console, mesh: Mesh, total: int, refresh_s: float = 0.5) -> None:
        self._console = console
        self._mesh = mesh
        self._total = total
        self._refresh_s = refresh_s
        self._done = self._failed = 0
        self._notes: list[str] = []
        self._started = time.monotonic()
        self._state = DashboardState(mesh.url)
        self._live = Live(console=console, auto_refresh=False, vertical_overflow="crop")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="taskmesh-demo-view", daemon=True)

    def __enter__(self) -> _LiveView:
        self._live.__enter__()
        self._tick()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
        try:
            self._tick()  # the final counts, not those of half a refresh ago
        finally:
            self._live.__exit__(None, None, None)

    def update(self, done: int, failed: int) -> None:
        self._done, self._failed = done, failed

    def note(self, markup: str) -> None:
        self._notes.append(markup)

    def _run(self) -> None:
        while not self._stop.wait(self._refresh_s):
            self._tick()

    def _tick(self) -> None:
        try:
            snapshot = self._mesh.status(timeout_s=1.0)
        except TaskmeshError as exc:
            self._state = self._state.unreachable(str(exc), time.monotonic())
        else:
            self._state = self._state.observe(snapshot, time.monotonic())
        width, height = self._console.size
        notes = [Text.from_markup(n, overflow="ellipsis") for n in self._notes[-2:]]
        for line in notes:
            line.no_wrap = True
        rows = max(height - 2 - len(notes), 4)  # the last line stays free: no scrolling
        board = render(self._state, time.monotonic(), width, rows, hint="")
        self._live.update(Group(self._progress_line(width), *notes, board), refresh=True)

    def _progress_line(self, width: int) -> Text:
        finished = self._done + self._failed
        cells = max(min(width - 48, 40), 10)
        filled = cells * finished // max(self._total, 1)
        line = Text("demo ", style="bold")
        line.append("█" * filled, style="green")
        line.append("░" * (cells - filled), style="dim")
        line.append(f" {finished}/{self._total} tasks  done {self._done}  failed {self._failed}")
        line.append(f"  {time.monotonic() - self._started:.1f}s", style="dim")
        line.no_wrap = True
        line.overflow = "ellipsis"
        return line


def _summary(
    console: Console, outcome: dict[str, Any], counters: dict[str, Any], elapsed: float, total: int
) -> int:
    expected_primes = primes_below(PRIME_BOUND)
    table = Table(title="summary", title_justify="left", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("tasks submitted", str(total))
    table.add_row("done", str(outcome["done"]))
    table.add_row("failed on purpose (InvalidRecord)", str(outcome["failed_on_purpose"]))
    table.add_row("failed unexpectedly", str(outcome["unexpected"]))
    table.add_row("requeued after the worker was killed", str(counters.get("requeued", 0)))
    table.add_row("workers lost", str(counters.get("workers_lost", 0)))
    table.add_row("elapsed", f"{elapsed:.2f} s")
    table.add_row("throughput", f"{total / elapsed:.0f} tasks/s")
    table.add_row(
        f"primes below {PRIME_BOUND:,}", f"{outcome['primes']:,} (sieve says {expected_primes:,})"
    )
    console.print(table)
    ok = (
        outcome["unexpected"] == 0
        and outcome["done"] + outcome["failed_on_purpose"] == total
        and outcome["primes"] == expected_primes
    )
    console.print(
        "[bold green]every task accounted for[/]" if ok else "[bold red]the demo found a problem[/]"
    )
    return 0 if ok else 1
