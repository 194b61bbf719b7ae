"""What happens when tasks fail: retries, remote exceptions, time limits and poison tasks.

    python examples/retries_and_failures.py                 # embedded broker and two workers
    TASKMESH_BROKER=tcp://host:5555 python examples/retries_and_failures.py   # your own mesh

Five tasks, in three rounds:

- ``fetch`` is flaky: it raises ``ConnectionError`` on its first runs. ``@task(retries=3,
  retry_backoff=0.05, retry_on=(ConnectionError,))`` has the broker run it again after 0.05 s,
  0.1 s, 0.2 s (with jitter): one that fails twice succeeds on its third run; one that keeps
  failing raises its last ``ConnectionError`` after 1 + 3 runs. Both run beside ``parse``.
- ``parse`` raises ``ValueError``, which is not in its ``retry_on``: it runs once, and the error
  is re-raised here as a ``ValueError`` with the remote traceback in ``exc.__notes__``.
- ``render`` overruns its ``timeout``: its executor is killed and it fails with ``TaskTimeout``.
- ``crash`` kills its executor with ``os._exit``: the worker replaces the executor and the task
  runs again, up to ``max_attempts`` runs, then fails with ``WorkerLost`` (a poison task must not
  take down worker after worker).

Tasks run in other processes, so each run appends a line to a file named after the task in a
temporary folder, and the script counts the lines. (That needs the workers to share this
machine's file system; on a mesh of many machines, count in a shared store instead.) The script
exits 0 only if every task ended as described, with the expected number of runs.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import taskmesh
from taskmesh import task
from taskmesh.testing import connected


def record_run(folder: str, name: str) -> int:
    """Append one line to ``folder/name``; return how many runs it now records."""
    path = Path(folder, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(f"{os.getpid()}\n")
    return len(path.read_text(encoding="utf-8").splitlines())


@task(retries=3, retry_backoff=0.05, retry_on=(ConnectionError,))
def fetch(folder: str, name: str, failures: int) -> str:
    """Fails with ``ConnectionError`` on its first ``failures`` runs."""
    run = record_run(folder, name)
    if run <= failures:
        raise ConnectionError(f"{name}: connection reset on run {run}")
    return f"fetched on run {run}"


@task(retries=3, retry_backoff=0.05, retry_on=(ConnectionError,))
def parse(folder: str, name: str, raw: str) -> int:
    """``int("12a")`` raises ``ValueError``: not a ``ConnectionError``, so never retried."""
    record_run(folder, name)
    return int(raw)


@task(timeout=0.5)
def render(folder: str, name: str) -> str:
    """Runs far past its 0.5 s time limit."""
    record_run(folder, name)
    time.sleep(30)
    return "too late"


@task(max_attempts=2)
def crash(folder: str, name: str) -> None:
    """Ends its executor process on every run, as a segfaulting extension would."""
    record_run(folder, name)
    os._exit(1)


def outcome(future: taskmesh.TaskFuture[Any]) -> tuple[str, BaseException | None]:
    """``("ok: <result>", None)`` or ``("<ExceptionType>: <message>", exception)``."""
    try:
        return f"ok: {future.result(timeout=60)!r}", None
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}", exc


def main() -> int:
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="taskmesh-runs-") as folder, connected():

        def runs(name: str) -> int:
            path = Path(folder, name)
            return len(path.read_text().splitlines()) if path.exists() else 0

        # (name, how to submit it, the exception type expected or None, the runs expected)
        Case = tuple[str, Callable[[], taskmesh.TaskFuture[Any]], type[BaseException] | None, int]
        rounds: list[list[Case]] = [
            [  # side by side: their retries are scheduled by the broker, with backoff
                ("fetch-flaky", lambda: fetch.submit(folder, "fetch-flaky", 2), None, 3),
                ("fetch-down", lambda: fetch.submit(folder, "fetch-down", 99), ConnectionError, 4),
                ("parse", lambda: parse.submit(folder, "parse", "12a"), ValueError, 1),
            ],
            # one at a time: an executor that is killed or dies takes with it the outcomes it
            # had not reported yet, and those tasks run again (delivery is at-least-once), so
            # the run counts printed here would no longer be those of the task alone
            [("render", lambda: render.submit(folder, "render"), taskmesh.TaskTimeout, 1)],
            [("crash", lambda: crash.submit(folder, "crash"), taskmesh.WorkerLost, 2)],
        ]
        checks: dict[str, Callable[[BaseException | None], bool]] = {
            # the remote traceback arrives as a note, down to the frame that raised
            "parse": lambda exc: ", in parse\n" in "\n".join(getattr(exc, "__notes__", [])),
        }
        errors: dict[str, BaseException | None] = {}
        for cases in rounds:
            futures = [(name, submit(), expected, n) for name, submit, expected, n in cases]
            for name, future, expected, expected_runs in futures:
                text, exc = outcome(future)
                errors[name] = exc
                print(f"{name:<12} {runs(name)} run(s)  {text}")
                if expected is None and exc is not None:
                    problems.append(f"{name}: expected a result, got {text}")
                if expected is not None and not isinstance(exc, expected):
                    problems.append(f"{name}: expected {expected.__name__}, got {text}")
                if runs(name) != expected_runs:
                    problems.append(f"{name}: expected {expected_runs} run(s), saw {runs(name)}")
                check = checks.get(name)
                if check is not None and not check(exc):
                    problems.append(f"{name}: the remote traceback is missing from __notes__")

        print("\nthe remote traceback of parse, from ValueError.__notes__:")
        for note in getattr(errors["parse"], "__notes__", []):
            print("    " + note.rstrip().replace("\n", "\n    "))

        # the crashes and the time limit cost executors, not workers: the mesh still serves
        after = fetch.submit(folder, "fetch-after", 0)
        text, _ = outcome(after)
        print(f"\nafterwards   {text}")
        if text != "ok: 'fetched on run 1'":
            problems.append(f"the mesh no longer serves: {text}")

    if problems:
        print("\nUNEXPECTED:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    print("every failure was handled as expected")
    return 0


if __name__ == "__main__":
    sys.exit(main())
