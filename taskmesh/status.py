"""``taskmesh status``: one broker snapshot as rich tables."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.table import Table


def status_tables(snapshot: dict[str, Any]) -> list[Table]:
    """The snapshot as three tables: workers, queues, counters."""
    workers = Table(title="workers", title_justify="left")
    for column in ("name", "host", "pid", "queues", "slots", "done", "failed", "heartbeat"):
        workers.add_column(
            column, justify="right" if column in ("pid", "done", "failed") else "left"
        )
    for w in snapshot.get("workers", []):
        workers.add_row(
            str(w["name"]),
            str(w["host"]),
            str(w["pid"]),
            ",".join(w["queues"]),
            f"{w['busy']}/{w['concurrency']}",
            str(w["done"]),
            str(w["failed"]),
            f"{w['heartbeat_age_s']:.1f}s ago",
        )
    queues = Table(title="queues", title_justify="left")
    for column in ("queue", "pending", "waiting", "running", "done", "failed"):
        queues.add_column(column, justify="left" if column == "queue" else "right")
    for q in snapshot.get("queues", []):
        queues.add_row(
            q["name"],
            str(q["pending"]),
            str(q.get("waiting", 0)),
            str(q["running"]),
            str(q["done"]),
            str(q["failed"]),
        )
    counters = Table(title="counters", title_justify="left")
    counters.add_column("counter")
    counters.add_column("value", justify="right")
    for key, value in sorted(snapshot.get("counters", {}).items()):
        counters.add_row(key, str(value))
    tables = [workers, queues, counters]
    if snapshot.get("schedules"):
        tables.insert(2, schedules_table(snapshot["schedules"]))
    return tables


def schedules_table(schedules: list[dict[str, Any]]) -> Table:
    """Periodic tasks: rule, next and last tick (UTC), runs and ticks skipped."""
    table = Table(title="periodic tasks (UTC)", title_justify="left")
    for column in ("name", "queue", "rule", "next", "last", "state", "runs", "skipped"):
        table.add_column(column, justify="right" if column in ("runs", "skipped") else "left")
    for s in schedules:
        table.add_row(
            s["name"],
            s["queue"],
            s["rule"],
            _utc(s.get("next_at")),
            _utc(s.get("last_run_at")),
            s.get("last_state") or "",
            str(s["runs"]),
            str(s["skipped"]),
        )
    return table


def _utc(at: float | None) -> str:
    if at is None:
        return "-"
    try:
        return time.strftime("%m-%d %H:%M:%S", time.gmtime(at))
    except (OverflowError, ValueError, OSError):
        return "?"


def failures_table(failures: list[dict[str, Any]]) -> Table:
    table = Table(title="last failures", title_justify="left")
    for column in ("task", "task_id", "exception", "message", "worker"):
        table.add_column(column, overflow="fold")
    for f in failures:
        table.add_row(f["name"], f["task_id"], f["type"], f["message"], f.get("worker", ""))
    return table


def print_failures(failures: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console()
    if not failures:
        console.print("no task has failed")
        return
    console.print(failures_table(failures))


def print_status(snapshot: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    broker = snapshot.get("broker", {})
    console.print(
        f"[bold]taskmesh broker[/] {snapshot.get('broker_id', '?')} at "
        f"{broker.get('endpoint', '?')}, up {broker.get('uptime_s', 0):.0f}s, "
        f"journal {broker.get('journal', '?')}, {snapshot.get('workers_alive', 0)} workers alive"
    )
    for table in status_tables(snapshot):
        console.print(table)


def print_bench(report: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title="taskmesh bench (medians)", title_justify="left")
    for column in ("workload", "metric", "taskmesh", "baseline", "ratio"):
        table.add_column(column, justify="left" if column in ("workload", "metric") else "right")
    for f in report["figures"]:
        ratio = f["ratio"]
        baseline = "" if f["baseline"] is None else f"{f['baseline']:,.2f} {f['unit']}"
        table.add_row(
            f["workload"],
            f["metric"],
            f"{f['taskmesh']:,.2f} {f['unit']}",
            baseline,
            "" if ratio is None else f"{ratio:.2f}x",
        )
    console.print(table)
    console.print(
        f"start-up to first result: {report['startup_to_first_result_s']:.2f}s; ratio > 1 means "
        "taskmesh is better than the baseline"
    )
