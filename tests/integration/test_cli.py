"""The CLI as real subprocesses: ``taskmesh status`` against a real broker (and against none),
and what the broker and a worker say when something is wrong with how they were started."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import _tasks
import pytest

from taskmesh import Client
from taskmesh.testing import ManagedProcess, Mesh, wait_until

MESH_OPTIONS = {"workers": 2, "concurrency": 2}

pytestmark = pytest.mark.timeout(60)

CLI_TIMEOUT_S = 30.0


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskmesh", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )


def test_status_json_lists_workers_and_queues(mesh: Mesh, client: Client) -> None:
    before = mesh.status()
    done_before = next((q["done"] for q in before["queues"] if q["name"] == "default"), 0)
    assert [f.result(timeout=20) for f in [client.submit(_tasks.add, i, i) for i in range(4)]] == [
        0,
        2,
        4,
        6,
    ]

    proc = run_cli("status", "--broker", mesh.url, "--json")
    assert proc.returncode == 0, proc.stderr
    snapshot = json.loads(proc.stdout)

    assert snapshot["workers_alive"] == 2
    by_name = {w["name"]: w for w in snapshot["workers"]}
    assert set(by_name) == {w.name for w in mesh.workers}
    for managed in mesh.workers:
        w = by_name[managed.name]
        assert w["host"] == socket.gethostname()
        assert w["pid"] == managed.pid
        assert w["queues"] == ["default"]
        assert w["concurrency"] == 2
        assert 0 <= w["busy"] <= w["concurrency"]
        assert isinstance(w["done"], int) and w["done"] >= 0
        assert isinstance(w["failed"], int) and w["failed"] >= 0
        assert 0 <= w["heartbeat_age_s"] < 3.0  # default heartbeat: 1 s, dead after 3
    assert sum(w["done"] for w in snapshot["workers"]) >= 4

    queues = {q["name"]: q for q in snapshot["queues"]}
    default = queues["default"]
    assert default["done"] >= done_before + 4
    assert default["pending"] == 0
    for key in ("running", "failed"):
        assert isinstance(default[key], int)
    assert snapshot["counters"]["done"] >= 4
    assert snapshot["broker"]["endpoint"] == mesh.url


def test_status_table_names_the_workers(mesh: Mesh) -> None:
    proc = run_cli("status", "--broker", mesh.url)
    assert proc.returncode == 0, proc.stderr
    for managed in mesh.workers:
        assert managed.name in proc.stdout
    assert "default" in proc.stdout


def test_status_without_a_broker_exits_1_with_one_line_on_stderr(dead_url: str) -> None:
    url = dead_url
    proc = run_cli("status", "--broker", url, "--json", "--timeout", "1")
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert url in lines[0]
    assert "Traceback" not in proc.stderr


def test_status_with_an_invalid_address_exits_1_without_traceback() -> None:
    proc = run_cli("status", "--broker", "nonsense", "--timeout", "1")
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "nonsense" in lines[0]
    assert "Traceback" not in proc.stderr


def test_a_broker_that_cannot_write_its_port_file_says_so_in_one_line(tmp_path: Path) -> None:
    port_file = tmp_path / "missing" / "port"
    proc = run_cli("broker", "--bind", "tcp://127.0.0.1:0", "--port-file", str(port_file))
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert f"cannot write the port file {port_file}" in proc.stderr.strip().splitlines()[-1]


def test_a_worker_that_gets_no_answer_from_its_broker_says_so(
    dead_url: str, tmp_path: Path
) -> None:
    argv = [sys.executable, "-m", "taskmesh", "worker", "--broker", dead_url, "-c", "1"]
    argv += ["--heartbeat-interval", "0.2"]
    worker = ManagedProcess("lonely", argv, tmp_path / "lonely.log", dict(os.environ))
    try:
        wait_until(
            lambda: "no answer from broker" in worker.log_path.read_text(),
            20.0,
            "the worker to warn that nobody answers",
        )
        assert worker.alive()  # and it goes on trying
        assert dead_url in worker.log_path.read_text()
    finally:
        worker.stop()


def test_the_dashboard_without_a_terminal_points_to_status(dead_url: str) -> None:
    proc = run_cli("dashboard", "--broker", dead_url)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert "needs a terminal" in proc.stderr and "taskmesh status" in proc.stderr
    assert "Traceback" not in proc.stderr
