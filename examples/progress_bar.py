"""A long-running job of a few hundred tasks, with a live progress bar.

    python examples/progress_bar.py               # embedded broker and two workers
    python examples/progress_bar.py 1000          # more tasks
    TASKMESH_BROKER=tcp://host:5555 python examples/progress_bar.py   # your own mesh

Every task "processes one record": a little I/O wait and a checksum. Every 40th record is
corrupt and its task raises ``ValueError``. All tasks are submitted at once; the bar (from
``rich``) advances as ``taskmesh.as_completed`` hands back each finished future, in whatever
order the workers finish them, and counts the failures as it goes. The script then checks the
checksums against a local computation and the failures against the corrupt records; it exits 0
only if both agree.
"""

from __future__ import annotations

import hashlib
import sys
import time
from concurrent.futures import Future

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

import taskmesh
from taskmesh import task
from taskmesh.testing import connected

CORRUPT_EVERY = 40


def record(i: int) -> bytes:
    return f"record {i}: ".encode() * (50 + i % 50)


@task(retries=2, retry_backoff=0.1, retry_on=(OSError,), timeout=30.0)
def process(i: int) -> str:
    """Wait 5-35 ms (as if for a disk or a service), then checksum record ``i``."""
    time.sleep(0.005 + (i * 7919 % 31) / 1000)
    if i % CORRUPT_EVERY == CORRUPT_EVERY - 1:
        raise ValueError(f"record {i} is corrupt")
    return hashlib.sha256(record(i)).hexdigest()


def main() -> int:
    try:
        n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
        if n < 1:
            raise ValueError
    except ValueError:
        print(
            f"usage: {sys.argv[0]} [RECORDS] (a count from 1, not {sys.argv[1]!r})", file=sys.stderr
        )
        return 2
    console = Console()
    checksums: dict[int, str] = {}
    failed: dict[int, str] = {}
    with connected():
        started = time.monotonic()
        futures: dict[Future[str], int] = {process.submit(i): i for i in range(n)}
        columns = (
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("[red]{task.fields[failed]} failed"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("records", total=n, failed=0)
            for future in taskmesh.as_completed(futures, timeout=120):
                i = futures[future]
                try:
                    checksums[i] = future.result()
                except Exception as exc:  # the corrupt records, or anything unexpected
                    failed[i] = f"{type(exc).__name__}: {exc}"
                progress.update(bar, advance=1, failed=len(failed))
        elapsed = time.monotonic() - started

    expected_failed = {i for i in range(n) if i % CORRUPT_EVERY == CORRUPT_EVERY - 1}
    wrong = [
        i for i, digest in checksums.items() if digest != hashlib.sha256(record(i)).hexdigest()
    ]
    print(f"{n} tasks in {elapsed:.2f}s ({n / elapsed:.0f}/s): ", end="")
    print(f"{len(checksums)} processed, {len(failed)} corrupt")
    if set(failed) != expected_failed or wrong or len(checksums) + len(failed) != n:
        print(f"UNEXPECTED: failed {sorted(failed)}, wrong checksums {wrong}", file=sys.stderr)
        return 1
    print(f"progress OK: {n} of {n} done, the corrupt ones were {sorted(failed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
