"""Operating a mesh: graceful drain, routing, rate limits, size limits, per-child limits,
delayed tasks and the Prometheus endpoint, each with real processes."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
import urllib.request
from datetime import datetime, timedelta

import _tasks
import cloudpickle
import pytest

import taskmesh
from taskmesh import task
from taskmesh.testing import Mesh, wait_until

cloudpickle.register_pickle_by_value(sys.modules[__name__])


@task
def where(tag: str) -> str:
    return os.environ.get("TASKMESH_WORKER_NAME", "?")


@task
def pid_of(i: int) -> int:
    return os.getpid()


@task(rate_limit="20/s")
def limited(i: int) -> float:
    return time.time()


@task
def started_at() -> float:
    return time.time()


@task
def blob(n: int) -> bytes:
    return b"x" * n


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(90)
def test_sigterm_drains_a_worker(make_mesh, gate) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(workers=0, heartbeat_interval_s=0.2)
    a = mesh.add_worker("drained", concurrency=1, extra_args=["--prefetch", "2"])
    mesh.wait_for_workers(1)
    with mesh.client() as client:
        futures = [client.submit(_tasks.gated, i, str(gate)) for i in range(3)]
        wait_until(lambda: len(gate.started()) == 1, 20, "the first task to start")
        os.kill(a.pid, signal.SIGTERM)  # the supervisor only, as systemd's KillMode=mixed does
        wait_until(
            lambda: any(w["state"] == "draining" for w in mesh.status()["workers"]),
            10,
            "the broker to see the worker draining",
        )
        mesh.add_worker("fresh", concurrency=2)
        gate.release()
        results = [f.result(timeout=30) for f in futures]
    assert sorted(x for x, _ in results) == [0, 1, 4]
    assert len(gate.started_on("drained")) == 1  # it finished what it was running...
    assert len(gate.started_on("fresh")) == 2  # ...and handed back what it had not started
    assert len(gate.started()) == 3  # nothing ran twice
    wait_until(lambda: not a.alive(), 20, "the drained worker to exit")
    assert a.popen.returncode == 0
    counters = mesh.status()["counters"]
    assert counters["workers_lost"] == 0


@pytest.mark.timeout(60)
def test_key_affinity_route(make_mesh) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(workers=3, concurrency=1, broker_args=["--route", "default=key"])
    with mesh.client() as client:
        for key in ("user-1", "user-2", "user-3"):
            names = {
                f.result(timeout=20)
                for f in [client.submit(where, key, _key=key) for _ in range(8)]
            }
            assert len(names) == 1, (key, names)


@pytest.mark.timeout(60)
def test_a_task_can_bring_its_own_route(make_mesh) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(workers=3, concurrency=1)  # the queue itself is least-loaded
    with mesh.client() as client:
        for key in ("user-1", "user-2"):
            futures = [client.submit(where, key, _route="key", _key=key) for _ in range(8)]
            names = {f.result(timeout=20) for f in futures}
            assert len(names) == 1, (key, names)
        with pytest.raises(ValueError, match="route must be one of"):
            client.submit(where, "x", _route="nearest")


@pytest.mark.timeout(60)
def test_rate_limit_holds_across_workers(make_mesh) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(workers=2, concurrency=2)
    with mesh.client() as client:
        starts = sorted(
            f.result(timeout=30) for f in [client.submit(limited, i) for i in range(50)]
        )
    # a full bucket starts 20 at once; the other 30 follow at 20 per second
    assert starts[-1] - starts[0] >= 1.2, starts[-1] - starts[0]
    assert mesh.status()["counters"]["rate_limited"] > 0


@pytest.mark.timeout(60)
def test_messages_larger_than_the_broker_takes_fail_clearly(make_mesh) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(workers=1, concurrency=1, broker_args=["--max-message-bytes", "200000"])
    with mesh.client() as client:
        assert client.submit(blob, 10).result(timeout=20) == b"x" * 10  # learns the limit
        with pytest.raises(taskmesh.SerializationError, match="accepts messages up to"):
            client.submit(blob, 300_000).result(timeout=20)  # a result too large
        with pytest.raises(taskmesh.SerializationError, match="accepts messages up to"):
            client.submit(_tasks.echo, b"y" * 300_000)  # a call too large
        assert client.submit(blob, 5).result(timeout=20) == b"xxxxx"  # and the mesh goes on


@pytest.mark.timeout(60)
def test_max_tasks_per_child_replaces_executors(make_mesh) -> None:  # type: ignore[no-untyped-def]
    mesh: Mesh = make_mesh(workers=0)
    mesh.add_worker("recycler", concurrency=1, extra_args=["--max-tasks-per-child", "3"])
    mesh.wait_for_workers(1)
    with mesh.client() as client:
        pids = [client.submit(pid_of, i).result(timeout=20) for i in range(9)]
    assert len(set(pids)) >= 3, pids


@pytest.mark.timeout(60)
def test_eta_delays_a_task(mesh_factory_small) -> None:  # type: ignore[no-untyped-def]
    with mesh_factory_small.client() as client:
        eta = datetime.now() + timedelta(seconds=0.6)
        fut = client.submit(started_at, _eta=eta)
        assert fut.result(timeout=20) >= eta.timestamp() - 0.05


@pytest.fixture
def mesh_factory_small(make_mesh):  # type: ignore[no-untyped-def]
    return make_mesh(workers=1, concurrency=1)


@pytest.mark.timeout(60)
def test_metrics_endpoint_counts_tasks(make_mesh) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    mesh: Mesh = make_mesh(
        workers=1,
        concurrency=2,
        heartbeat_interval_s=0.2,
        broker_args=["--metrics-port", str(port)],
    )
    with mesh.client() as client:
        for f in [client.submit(_tasks.add, i, 1) for i in range(20)]:
            f.result(timeout=20)

    def scraped() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as resp:
            return str(resp.read().decode())

    def done_at_least_20() -> bool:
        for line in scraped().splitlines():
            if line.startswith("taskmesh_tasks_done_total "):
                return float(line.split()[1]) >= 20
        return False

    wait_until(done_at_least_20, 15, "the metrics to count 20 done tasks")
    text = scraped()
    assert "taskmesh_workers_alive 1.0" in text
    assert "taskmesh_task_run_seconds_count" in text
