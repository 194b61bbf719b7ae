"""A periodic task: the broker runs it on its own clock, with no separate beat process.

    python examples/periodic_report.py                 # an embedded mesh
    TASKMESH_BROKER=tcp://host:5555 python examples/periodic_report.py   # your own mesh

``@task(every=...)`` (or ``cron="*/5 * * * *"``, UTC) declares the schedule and ``.schedule()``
registers it with the broker, which from then on submits one run per tick, by itself: the
producer may exit. The schedule lives in the broker's journal, so a broker restart keeps it;
ticks missed while the broker was down are run once, not replayed (docs/guarantees.md).
This script registers a report every second, watches three runs arrive, lists the schedule
(as ``taskmesh schedule list`` does) and removes it again.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from taskmesh import task
from taskmesh.testing import connected, wait_until


@task(every=timedelta(seconds=1))
def report(log_path: str) -> int:
    """What a nightly job would do, every second here: write one line, return how many."""
    with open(log_path, "a", encoding="utf-8") as log:
        log.write(f"report from worker {os.environ.get('TASKMESH_WORKER_NAME', '?')} "
                  f"at {time.strftime('%H:%M:%S')}\n")  # fmt: skip
    return len(Path(log_path).read_text(encoding="utf-8").splitlines())


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="periodic-") as tmp, connected() as client:
        log_path = Path(tmp) / "reports.log"
        name = report.schedule(str(log_path), _client=client, _name="example-report")
        print(f"registered {name}; waiting for three runs")

        def lines() -> list[str]:
            return log_path.read_text(encoding="utf-8").splitlines() if log_path.exists() else []

        wait_until(lambda: len(lines()) >= 3, 30, "three periodic runs")
        for line in lines()[:3]:
            print(" ", line)
        (entry,) = [s for s in client.schedules() if s["name"] == name]
        print(f"schedule {entry['name']}: {entry['rule']}, {entry['runs']} runs so far")
        report.unschedule(_client=client, _name=name)
        if any(s["name"] == name for s in client.schedules()):
            print("the schedule is still listed after removal", file=sys.stderr)
            return 1
    print("periodic OK: 3 runs, schedule removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
