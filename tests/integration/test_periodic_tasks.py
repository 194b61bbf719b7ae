"""Periodic tasks on real processes: runs on its ticks, stops when removed, coalesces the ticks
missed while the broker was down into one run, and `taskmesh schedule add/list/remove`."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import _tasks
import pytest

from taskmesh import TaskmeshError
from taskmesh.testing import Mesh, wait_until

pytestmark = pytest.mark.timeout(120)


def runs(path: Path) -> list[float]:
    return [float(line) for line in path.read_text().split()] if path.exists() else []


def schedule_entry(mesh: Mesh, name: str) -> dict[str, object]:
    found = [s for s in mesh.status()["schedules"] if s["name"] == name]
    return found[0] if found else {}


def idle(mesh: Mesh) -> bool:
    return all(q["running"] == 0 and q["pending"] == 0 for q in mesh.status()["queues"])


def test_a_periodic_task_runs_on_its_ticks_until_removed(make_mesh, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(workers=1, concurrency=1)
    ticks = tmp_path / "ticks"
    with mesh.client() as client:
        assert (
            client.schedule(_tasks.record_tick, str(ticks), _every=0.5, _name="ticker") == "ticker"
        )
        wait_until(lambda: len(runs(ticks)) >= 4, 20, "four runs")
        seen = runs(ticks)
        gaps = [b - a for a, b in itertools.pairwise(seen)]
        assert all(0.3 < gap < 0.9 for gap in gaps), gaps
        entry = client.schedules()[0]
        assert entry["rule"] == "every 0.5s" and entry["runs"] >= 4
        client.unschedule("ticker")
        with pytest.raises(TaskmeshError, match="no periodic task named ticker"):
            client.unschedule("ticker")
        assert client.schedules() == []
        wait_until(lambda: idle(mesh), 10, "the last run to finish")
        stopped_at = len(runs(ticks))
        time.sleep(1.5)  # three ticks' worth: nothing may run now (an absence takes time)
        assert len(runs(ticks)) == stopped_at


def test_missed_ticks_are_coalesced_after_a_broker_restart(make_mesh, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(
        workers=1, concurrency=1, heartbeat_interval_s=0.3, journal=str(tmp_path / "j.db")
    )
    ticks = tmp_path / "ticks"
    with mesh.client() as client:
        client.schedule(_tasks.record_tick, str(ticks), _every=1.0, _name="heartbeat")
    wait_until(lambda: len(runs(ticks)) >= 2, 20, "two runs")
    assert mesh.broker is not None
    mesh.broker.kill()
    down_at = time.time()
    before = len(runs(ticks))
    time.sleep(3.5)  # the broker is down across three or four ticks: that is the test
    mesh.start_broker()
    wait_until(lambda: len(runs(ticks)) > before, 20, "the catch-up run")
    caught_up = runs(ticks)[before]
    assert caught_up - down_at > 3.0
    entry = schedule_entry(mesh, "heartbeat")
    assert int(entry["skipped"]) >= 2  # type: ignore[call-overload]
    # one catch-up run, not a storm: the next one waits for its own tick
    later = [t for t in runs(ticks)[before:] if t - caught_up < 0.6]
    assert len(later) == 1, runs(ticks)
    wait_until(lambda: len(runs(ticks)) >= before + 2, 20, "the next regular run")
    # every run the broker counts happened exactly once
    wait_until(lambda: idle(mesh), 10, "runs to finish")
    entry = schedule_entry(mesh, "heartbeat")
    assert len(runs(ticks)) == entry["runs"]


JOBS = """
from taskmesh import task

@task(every=1.0)
def stamp(path):
    with open(path, "a") as f:
        f.write("stamp\\n")
"""


def taskmesh_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskmesh", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "160"},
    )


def test_the_schedule_command_adds_lists_and_removes(make_mesh, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "jobs_for_schedule.py").write_text(JOBS)
    mesh: Mesh = make_mesh(workers=1, concurrency=1, env={"PYTHONPATH": str(tmp_path)})
    out = tmp_path / "stamps"
    url = ["--broker", mesh.url]
    added = taskmesh_cli(
        "schedule",
        "add",
        "jobs_for_schedule:stamp",
        "--args",
        json.dumps([str(out)]),
        *url,
        cwd=tmp_path,
    )
    assert added.returncode == 0, added.stderr
    assert "scheduled stamp: every 1s" in added.stdout
    wait_until(lambda: out.exists() and len(out.read_text().split()) >= 2, 20, "two stamps")

    listed = taskmesh_cli("schedule", "list", "--json", *url, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    (entry,) = json.loads(listed.stdout)
    assert (
        entry["name"],
        entry["rule"],
        entry["last_state"] in ("done", "running", "pending"),
    ) == (
        "stamp",
        "every 1s",
        True,
    )
    table = taskmesh_cli("schedule", "list", *url, cwd=tmp_path)
    assert "stamp" in table.stdout and "every 1s" in table.stdout

    cron = taskmesh_cli(
        "schedule",
        "add",
        "jobs_for_schedule:stamp",
        "--name",
        "nightly",
        "--cron",
        "0 3 * * *",
        "--args",
        json.dumps([str(out)]),
        *url,
        cwd=tmp_path,
    )
    assert cron.returncode == 0 and "cron 0 3 * * *" in cron.stdout, cron.stderr

    bad = taskmesh_cli(
        "schedule", "add", "jobs_for_schedule:stamp", "--cron", "61 * * * *", *url, cwd=tmp_path
    )
    assert bad.returncode == 1 and "minute field: 61 is outside 0-59" in bad.stderr
    not_json = taskmesh_cli(
        "schedule", "add", "jobs_for_schedule:stamp", "--args", "[1,", *url, cwd=tmp_path
    )
    assert not_json.returncode == 1 and "--args is not valid JSON" in not_json.stderr
    assert "Traceback" not in not_json.stderr

    for name in ("stamp", "nightly"):
        removed = taskmesh_cli("schedule", "remove", name, *url, cwd=tmp_path)
        assert removed.returncode == 0 and f"removed {name}" in removed.stdout, removed.stderr
    missing = taskmesh_cli("schedule", "remove", "stamp", *url, cwd=tmp_path)
    assert missing.returncode == 1 and "no periodic task named stamp" in missing.stderr
    assert taskmesh_cli("schedule", "list", *url, cwd=tmp_path).stdout.strip() == "no periodic task"
