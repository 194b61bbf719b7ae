"""More of operating a mesh, each with real processes: ``taskmesh failed``, cancelling queued and
running tasks, a broker stopped with SIGTERM and restarted on its journal, ``--import``,
``--max-memory-per-child`` and the default worker name."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from pathlib import Path
from typing import Any

import _tasks
import cloudpickle
import pytest

import taskmesh
from taskmesh import task
from taskmesh.testing import ManagedProcess, Mesh, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])

CLI_TIMEOUT_S = 30.0


@task
def pid_of(i: int) -> int:
    return os.getpid()


@task
def hog(mb: int) -> int:
    """Allocate ``mb`` MB (every page touched) and keep it alive in a module global."""
    module = sys.modules.setdefault("tm_ballast", types.ModuleType("tm_ballast"))
    module.ballast = b"\x01" * (mb << 20)  # type: ignore[attr-defined]
    return os.getpid()


@task
def preloaded(module: str) -> bool:
    """Whether ``module`` was already imported when the task began."""
    return module in sys.modules


# ------------------------------------------------------------------ helpers


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskmesh", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "COLUMNS": "250"},  # rich tables: no folded cells
    )


def pid_running(pid: int) -> bool:
    """Whether ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


def queue_stats(mesh: Mesh, name: str) -> dict[str, Any]:
    for q in mesh.status()["queues"]:
        if q["name"] == name:
            return dict(q)
    return {"name": name, "pending": 0, "delayed": 0, "running": 0, "done": 0, "failed": 0}


def wait_for_queue(
    mesh: Mesh,
    name: str,
    check: Callable[[dict[str, Any]], bool],
    timeout: float,
    what: str,
) -> None:
    """``wait_until`` on one queue's figures; the last ones seen go in the timeout's message."""
    last: dict[str, Any] = {}

    def ok() -> bool:
        last.update(queue_stats(mesh, name))
        return check(last)

    try:
        wait_until(ok, timeout, what)
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; last seen: {last}") from None


def counter(mesh: Mesh, name: str) -> int:
    return int(mesh.status()["counters"].get(name, 0))


def describe(fut: Future[Any]) -> str:
    """How a future ended, for an assertion's message."""
    if fut.cancelled():
        return f"{fut!r}: cancelled"
    if not fut.done():
        return f"{fut!r}: not done"
    exc = fut.exception()
    return f"{fut!r}: raised {exc!r}" if exc else f"{fut!r}: returned {fut.result()!r}"


def single_slot_mesh(make_mesh: Callable[..., Mesh]) -> Mesh:
    """A mesh with one worker named ``single``: one executor, no prefetch.

    It keeps the default heartbeat (1 s), the one a producer starts with: a producer's I/O loop
    keeps the interval it started with even after adopting a faster broker's, so under a
    faster heartbeat an idle producer is dropped by the broker now and then, and a CANCEL
    it sends meanwhile is lost (CANCEL is not resent)."""
    mesh = make_mesh(workers=0)
    mesh.add_worker("single", concurrency=1, extra_args=["--prefetch", "0"])
    mesh.wait_for_workers(1)
    return mesh


# ------------------------------------------------------------------ taskmesh failed


@pytest.mark.timeout(90)
def test_failed_lists_a_task_that_failed_for_good(make_mesh) -> None:  # type: ignore[no-untyped-def]
    mesh = single_slot_mesh(make_mesh)
    message = "the-failed-command-sees-this"
    with mesh.client() as client:
        fut = client.submit(_tasks.fail_with_value_error, message, _retries=2)
        with pytest.raises(ValueError, match=message):
            fut.result(timeout=30)
        assert client.submit(_tasks.add, 2, 3).result(timeout=20) == 5  # a success: not listed

    proc = run_cli("failed", "--broker", mesh.url, "--json")
    assert proc.returncode == 0, proc.stderr
    failures = json.loads(proc.stdout)
    assert isinstance(failures, list)
    ours = [f for f in failures if f["task_id"] == fut.task_id]
    assert len(ours) == 1, failures  # listed once, after its retries, not once per attempt
    entry = ours[0]
    assert entry["type"] == "ValueError"
    assert entry["name"] == "fail_with_value_error"
    assert message in entry["message"]
    assert entry["worker"] == "single"
    assert len(failures) == 1, failures
    assert mesh.status()["counters"]["retried"] == 2

    proc = run_cli("failed", "--broker", mesh.url)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for text in (fut.task_id, "ValueError", "fail_with_value_error", message, "single"):
        assert text in proc.stdout, (text, proc.stdout)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("as_json", [False, True], ids=["table", "json"])
def test_failed_without_a_broker_exits_1_with_one_line(dead_url: str, as_json: bool) -> None:
    extra = ["--json"] if as_json else []
    proc = run_cli("failed", "--broker", dead_url, "--timeout", "1", *extra)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert dead_url in lines[0]
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------------------ cancellation


@pytest.mark.timeout(90)
def test_cancel_a_task_queued_behind_a_busy_worker(make_mesh, gate, recording_client) -> None:  # type: ignore[no-untyped-def]
    mesh = single_slot_mesh(make_mesh)
    client = recording_client(mesh)
    first = client.submit(_tasks.gated, 0, str(gate))
    wait_until(lambda: [x for x, _, _ in gate.started()] == [0], 20, "the first task to start")
    second = client.submit(_tasks.gated, 1, str(gate))
    target = client.submit(_tasks.gated, 2, str(gate))
    wait_for_queue(
        mesh,
        "default",
        lambda q: q["pending"] == 2,
        10,
        "two tasks to wait at the broker behind the running one",
    )

    assert not target.done(), describe(target)
    assert target.cancel() is True, describe(target)
    assert target.cancelled()
    wait_until(lambda: counter(mesh, "cancelled") == 1, 10, "the broker to count it cancelled")
    wait_until(
        lambda: client.outcomes_seen[target.task_id] == 1,
        10,
        "the broker to send the cancelled outcome",
    )
    assert queue_stats(mesh, "default")["pending"] == 1

    gate.release()
    assert first.result(timeout=30) == (0, "single")
    assert second.result(timeout=30) == (1, "single")
    # a later task on the same single slot: had the cancelled one still been queued, it would
    # have run before this one
    assert client.submit(_tasks.add, 1, 1).result(timeout=20) == 2
    assert [x for x, _, _ in gate.started()] == [0, 1]  # the cancelled task never ran
    with pytest.raises(CancelledError):
        target.result(timeout=5)
    status = mesh.status()
    assert status["counters"]["cancelled"] == 1
    assert status["counters"]["done"] == 3
    assert queue_stats(mesh, "default")["pending"] == 0


@pytest.mark.timeout(90)
def test_cancel_a_task_prefetched_by_a_busy_worker(make_mesh, gate, recording_client) -> None:  # type: ignore[no-untyped-def]
    mesh = make_mesh(workers=0)
    mesh.add_worker("single", concurrency=1)  # the default prefetch: one task waits there
    mesh.wait_for_workers(1)
    client = recording_client(mesh)
    first = client.submit(_tasks.gated, 0, str(gate))
    wait_until(lambda: [x for x, _, _ in gate.started()] == [0], 20, "the first task to start")
    target = client.submit(_tasks.gated, 1, str(gate))
    wait_for_queue(
        mesh, "default", lambda q: q["running"] == 2, 10, "the worker to take the second"
    )
    assert target.cancel() is True
    wait_until(
        lambda: client.outcomes_seen[target.task_id] == 1,
        10,
        "the worker to drop it and the broker to report it cancelled",
    )
    gate.release()
    assert first.result(timeout=30) == (0, "single")
    assert client.submit(_tasks.add, 1, 1).result(timeout=20) == 2
    assert [x for x, _, _ in gate.started()] == [0]  # the cancelled task never ran
    assert counter(mesh, "cancelled") == 1


@pytest.mark.timeout(90)
def test_cancel_terminate_kills_a_running_task(make_mesh, gate, recording_client) -> None:  # type: ignore[no-untyped-def]
    mesh = single_slot_mesh(make_mesh)
    supervisor = mesh.workers[0]
    client = recording_client(mesh)
    fut = client.submit(_tasks.gated, 0, str(gate))
    wait_until(lambda: len(gate.started()) == 1, 20, "the gated task to start")
    [(_, worker, executor_pid)] = gate.started()
    assert worker == "single"
    assert pid_running(executor_pid)

    taskmesh.cancel(fut, terminate=True)
    wait_until(lambda: not pid_running(executor_pid), 10, "the task's executor to be killed")
    wait_until(lambda: counter(mesh, "cancelled") == 1, 10, "the broker to count it cancelled")
    wait_until(
        lambda: client.outcomes_seen[fut.task_id] == 1,
        10,
        "the broker to send the cancelled outcome",
    )
    assert fut.cancelled()
    with pytest.raises(CancelledError):
        fut.result(timeout=5)

    gate.release()  # a rerun of the cancelled task would now get past the gate
    # the worker keeps serving, from a fresh executor
    after = client.submit(_tasks.whoami).result(timeout=30)
    assert after["worker"] == "single"
    assert after["pid"] != executor_pid
    assert client.submit(_tasks.gated, 1, str(gate)).result(timeout=30) == (1, "single")
    assert [x for x, _, _ in gate.started()] == [0, 1]  # the cancelled task never ran again
    assert [x for x, _, _ in gate.done()] == [1]  # and never got past its gate
    assert supervisor.alive()
    status = mesh.status()
    assert status["workers_alive"] == 1
    assert status["counters"]["workers_lost"] == 0
    assert status["counters"]["cancelled"] == 1
    assert status["counters"]["done"] == 2
    assert "died" not in supervisor.output()  # a cancel, not an executor crash


# ------------------------------------------------------------------ broker SIGTERM and journal


@pytest.mark.timeout(120)
def test_broker_sigterm_keeps_pending_tasks_in_the_journal(make_mesh, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    journal = tmp_path / "journal.db"
    n = 25
    mesh: Mesh = make_mesh(workers=0, heartbeat_interval_s=0.2, journal=str(journal))
    with mesh.client() as client:
        futures = [client.submit(_tasks.add, i, 1000, _queue="parked") for i in range(n)]
        wait_for_queue(
            mesh,
            "parked",
            lambda q: q["pending"] == n,
            20,
            f"{n} tasks to be pending on a queue no worker serves",
        )
        assert not any(f.done() for f in futures)

        old = mesh.broker
        assert old is not None
        assert old.stop(grace_s=10.0) == 0  # SIGTERM: a clean exit, not the SIGKILL fallback
        assert "stopped" in old.output()

        mesh.start_broker()  # same address, same journal
        assert mesh.broker is not old
        status = mesh.status()
        assert status["counters"]["recovered"] == n  # from the journal, not a client resend
        parked = queue_stats(mesh, "parked")
        assert parked["pending"] + parked["delayed"] == n
        assert f"recovered {n} unfinished tasks" in mesh.broker.output()

        mesh.add_worker("parked-worker", queues=["parked"], concurrency=2)
        results = [f.result(timeout=60) for f in futures]
    assert results == [i + 1000 for i in range(n)]
    status = mesh.status()
    assert status["counters"]["done"] == n
    assert queue_stats(mesh, "parked")["pending"] == 0


# ------------------------------------------------------------------ --import


@pytest.mark.timeout(90)
def test_worker_import_preloads_a_module(make_mesh, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "tm_preload_mod.py").write_text("ANSWER = 42\n")
    path = os.pathsep.join(p for p in (str(modules), os.environ.get("PYTHONPATH", "")) if p)
    mesh: Mesh = make_mesh(workers=0, env={"PYTHONPATH": path})
    mesh.add_worker(
        "preloading", concurrency=1, queues=["pre"], extra_args=["--import", "tm_preload_mod"]
    )
    mesh.add_worker("plain", concurrency=1, queues=["plain"])  # same path, no --import
    mesh.wait_for_workers(2)
    with mesh.client() as client:
        assert client.submit(preloaded, "tm_preload_mod", _queue="pre").result(timeout=30)
        assert not client.submit(preloaded, "tm_preload_mod", _queue="plain").result(timeout=30)


@pytest.mark.timeout(60)
def test_worker_import_of_a_missing_module_fails_at_start(make_mesh) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(workers=0)
    broken = mesh.add_worker("broken", concurrency=1, extra_args=["--import", "no_such_module_xyz"])
    wait_until(lambda: not broken.alive(), 20, "the worker to exit")
    assert broken.popen.returncode not in (0, None)
    output = broken.output()
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if "no_such_module_xyz" in line]
    assert len(errors) == 1, output  # the error is said once, on one line
    assert "cannot find module" in errors[0]
    assert mesh.status()["workers_alive"] == 0


# ------------------------------------------------------------------ --max-memory-per-child


@pytest.mark.timeout(90)
def test_max_memory_per_child_replaces_a_grown_executor(make_mesh) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(workers=0)
    worker = mesh.add_worker("capped", concurrency=1, extra_args=["--max-memory-per-child", "60"])
    mesh.wait_for_workers(1)
    with mesh.client() as client:
        first = client.submit(pid_of, 0).result(timeout=30)
        assert client.submit(pid_of, 1).result(timeout=30) == first  # small: kept
        assert client.submit(hog, 100).result(timeout=30) == first
        after = client.submit(pid_of, 2).result(timeout=30)
        assert after != first
        assert client.submit(pid_of, 3).result(timeout=30) == after  # the new one stays
    wait_until(lambda: not pid_running(first), 10, "the grown executor to end")
    assert "replacing executor 0 at" in worker.output()


# ------------------------------------------------------------------ default worker name


@pytest.mark.timeout(60)
def test_worker_name_defaults_to_host_pid(make_mesh) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(workers=0)
    mesh.add_worker("named", concurrency=1)
    env = {k: v for k, v in mesh.env.items() if k != "TASKMESH_WORKER_NAME"}
    argv = [
        sys.executable,
        "-m",
        "taskmesh",
        "worker",
        "--broker",
        mesh.url,
        "--concurrency",
        "1",
        "--queues",
        "anon",
        "--log-level",
        "INFO",
    ]
    unnamed = ManagedProcess("unnamed", argv, mesh.workdir / "unnamed.log", env)
    mesh.workers.append(unnamed)  # stopped with the mesh, whatever happens
    mesh.wait_for_workers(2)
    expected = f"{socket.gethostname()}-{unnamed.pid}"
    by_pid = {w["pid"]: w for w in mesh.status()["workers"]}
    assert by_pid[unnamed.pid]["name"] == expected
    assert by_pid[unnamed.pid]["host"] == socket.gethostname()
    assert sorted(w["name"] for w in by_pid.values()) == sorted(["named", expected])
    with mesh.client() as client:
        ran = client.submit(_tasks.whoami, _queue="anon").result(timeout=30)
    assert ran["worker"] == expected  # its executors know it by the same name
    assert ran["pgid"] == unnamed.pid
