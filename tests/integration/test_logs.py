"""Lifecycle log lines from the broker, plain and as JSON for log collectors."""

from __future__ import annotations

import json
import signal

import pytest

from taskmesh.testing import Mesh, wait_until


def _json_lines(text: str) -> list[dict[str, object]]:
    entries = []
    for line in text.splitlines():
        if line.startswith("{"):
            entries.append(json.loads(line))
    return entries


@pytest.mark.timeout(60)
def test_broker_logs_worker_lifecycle_as_json(make_mesh) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(
        workers=2,
        concurrency=1,
        heartbeat_interval_s=0.2,
        broker_args=["--log-json"],
    )
    assert mesh.broker is not None
    victim = mesh.workers[0]
    victim.signal(signal.SIGKILL)
    mesh.wait_for_workers(1)

    def messages() -> list[str]:
        assert mesh.broker is not None
        return [str(e["message"]) for e in _json_lines(mesh.broker.output())]

    wait_until(lambda: any("declared dead" in m for m in messages()), 10, "the death log line")
    lines = messages()
    assert any(m.startswith(f"worker {victim.name} joined") for m in lines), lines
    assert any(m.startswith(f"worker {victim.name} declared dead") for m in lines), lines
    entry = _json_lines(mesh.broker.output())[0]
    assert {"time", "level", "logger", "message", "pid"} <= set(entry)


@pytest.mark.timeout(60)
def test_sighup_never_kills_a_broker_without_keys(make_mesh) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(workers=1, concurrency=1)
    assert mesh.broker is not None
    mesh.broker.signal(signal.SIGHUP)
    wait_until(
        lambda: "no key folders to reload" in (mesh.broker.output() if mesh.broker else ""),
        10,
        "the broker to log the SIGHUP",
    )
    assert mesh.broker.alive()
    with mesh.client() as client:
        assert client.submit(pow, 2, 5).result(timeout=20) == 32
