"""``taskmesh status`` as a real subprocess against a real broker (and against none)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import _tasks
import pytest

from taskmesh import Client
from taskmesh.testing import Mesh

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
