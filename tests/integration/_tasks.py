"""Task functions for the integration tests.

Workers cannot import the tests folder, so ``conftest.py`` registers this module with
``cloudpickle.register_pickle_by_value``: every function here travels by value.

Tasks that must stay busy until the test says so wait on a *gate*: a folder where the task
writes ``started__X__WORKER__PID`` when it begins, waits (bounded) for a ``release`` file, and
writes ``done__X__WORKER__PID`` just before it returns. The test reads those markers instead of
sleeping.
"""

from __future__ import annotations

import hashlib
import os
import sys
import threading
import time
import types
from pathlib import Path

from taskmesh import task

GATE_WAIT_S = 60.0


def worker_name() -> str:
    return os.environ.get("TASKMESH_WORKER_NAME", "?")


def add(x: int, y: int) -> int:
    return x + y


@task
def square(x: int) -> int:
    return x * x


@task
def whoami() -> dict[str, object]:
    """Which worker node (its name and process group) and which executor process ran this."""
    return {"worker": worker_name(), "pid": os.getpid(), "pgid": os.getpgid(0)}


def echo(value: object) -> object:
    return value


def digest(data: bytes) -> tuple[str, int]:
    return hashlib.sha256(data).hexdigest(), len(data)


def heap_rss_kb(pid: int | None = None) -> int:
    """Resident kB of a process's ``[heap]``, the memory glibc extends with brk (Linux)."""
    total, in_heap = 0, False
    with open(f"/proc/{pid or os.getpid()}/smaps") as smaps:
        for line in smaps:
            if line[:1].isdigit() or line[:1] in "abcdef":
                in_heap = line.rstrip().endswith("[heap]")
            elif in_heap and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


def heap_rss_kb_holding(nbytes: int) -> int:
    """Our heap's resident size while a large buffer is alive: glibc's defaults map it apart."""
    held = bytearray(nbytes)
    held[::4096] = b"x" * len(range(0, nbytes, 4096))  # touch every page
    return heap_rss_kb()


def slow_identity(x: int, delay_s: float) -> int:
    """Simulated work of a chosen length, so results complete out of submission order."""
    time.sleep(delay_s)
    return x


def fail_with_value_error(message: str) -> None:
    raise ValueError(message)


def raise_remote_only(message: str) -> None:
    """Raise an exception whose class exists only on the worker (like a worker-only library):
    it pickles and unpickles there, but the producer cannot import its module."""
    module = sys.modules.get("tm_remote_only")
    if module is None:
        module = types.ModuleType("tm_remote_only")
        exec("class RemoteOnlyError(Exception):\n    pass\n", module.__dict__)
        sys.modules["tm_remote_only"] = module
    raise module.RemoteOnlyError(message)


def return_lock() -> object:
    return threading.Lock()


@task(timeout=0.5)
def sleep_long() -> str:
    time.sleep(30)
    return "should have been killed"


@task
def poison() -> None:
    os._exit(1)


@task(max_attempts=1)
def crash_executor() -> None:
    os._exit(3)


@task
def gated(x: int, gate: str) -> tuple[int, str]:
    """Mark the start, wait for ``gate/release``, mark the end; return ``(x * x, worker)``."""
    folder = Path(gate)
    me = f"{x}__{worker_name()}__{os.getpid()}"
    (folder / f"started__{me}").touch()
    deadline = time.monotonic() + GATE_WAIT_S
    while not (folder / "release").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"gate {gate} was never released")
        time.sleep(0.02)
    (folder / f"done__{me}").touch()
    return x * x, worker_name()


def record_tick(path: str) -> float:
    """Append the time of this run to ``path`` (one line per run): what a periodic task did."""
    now = time.time()
    with open(path, "a") as f:
        f.write(f"{now:.3f}\n")
    return now
