"""A rich progress bar over a batch of futures: ``for f in taskmesh.progress(futures): ...``.

It yields futures as they complete (like ``as_completed``) while the bar shows how many are
done and how many failed, so a long job is never a silent wait.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import Future, as_completed
from typing import Any, TypeVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

F = TypeVar("F", bound=Future[Any])


def progress(
    futures: Iterable[F],
    *,
    description: str = "tasks",
    timeout: float | None = None,
    console: Console | None = None,
    transient: bool = False,
) -> Iterator[F]:
    """Yield ``futures`` as they complete, drawing a progress bar with done and failed counts."""
    pending = list(futures)
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    failed = 0
    with Progress(*columns, console=console, transient=transient) as bar:
        job = bar.add_task(description, total=len(pending), failed=0)
        for future in as_completed(pending, timeout=timeout):
            if future.cancelled() or future.exception() is not None:
                failed += 1
            bar.update(job, advance=1, failed=failed)
            yield future  # type: ignore[misc]
