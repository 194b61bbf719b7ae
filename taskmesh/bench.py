"""``taskmesh bench``: throughput, latency, dispatch gaps and payload speed, each figure printed
beside a baseline measured in the same run (a local ``ProcessPoolExecutor`` with as many
processes, or a raw pyzmq socket pair), so that a noisy machine does not fool the ratio.

Each workload runs ``repeat`` times and reports the median.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import zmq

from taskmesh.client import Client
from taskmesh.testing import Mesh

WORKLOADS = ("throughput", "latency", "sleep", "payload")


def noop(x: int) -> int:
    return x


def sleeper(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def digest(data: bytes) -> bytes:
    """Return a payload as large as the one received, so the result travels back too."""
    return data


@dataclass
class Figure:
    workload: str
    metric: str
    taskmesh: float
    baseline: float | None
    unit: str
    better: str  # "higher" or "lower"
    runs: list[float] = field(default_factory=list)
    note: str = ""

    @property
    def ratio(self) -> float | None:
        if not self.baseline:
            return None
        if self.better == "higher":
            return self.taskmesh / self.baseline
        return self.baseline / self.taskmesh if self.taskmesh else None


def _median(values: list[float]) -> float:
    return statistics.median(values)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))
    return ordered[index]


# ----------------------------------------------------------------------------- workloads


def throughput(client: Client, pool: ProcessPoolExecutor, n: int, repeat: int) -> list[Figure]:
    def run_mesh() -> float:
        started = time.perf_counter()
        futures = [client.submit(noop, i) for i in range(n)]
        results = [f.result(timeout=300) for f in futures]
        elapsed = time.perf_counter() - started
        if results != list(range(n)):
            raise AssertionError("taskmesh returned wrong results")
        return n / elapsed

    def run_pool() -> float:
        started = time.perf_counter()
        futures = [pool.submit(noop, i) for i in range(n)]
        results = [f.result(timeout=300) for f in futures]
        elapsed = time.perf_counter() - started
        if results != list(range(n)):
            raise AssertionError("the process pool returned wrong results")
        return n / elapsed

    mesh_runs, pool_runs = _alternate(run_mesh, run_pool, repeat)
    return [
        Figure(
            "throughput",
            f"{n} no-op tasks",
            _median(mesh_runs),
            _median(pool_runs),
            "tasks/s",
            "higher",
            mesh_runs,
        )
    ]


def latency(client: Client, pool: ProcessPoolExecutor, n: int, repeat: int) -> list[Figure]:
    def samples(submit: Callable[[int], Any]) -> list[float]:
        out = []
        for i in range(n):
            started = time.perf_counter()
            if submit(i).result(timeout=30) != i:
                raise AssertionError("wrong result")
            out.append(time.perf_counter() - started)
        return out

    mesh_p50, mesh_p99, pool_p50, pool_p99 = [], [], [], []
    samples(lambda i: client.submit(noop, i))  # warm up: functions cached, executors hot
    for _ in range(repeat):
        m = samples(lambda i: client.submit(noop, i))
        b = samples(lambda i: pool.submit(noop, i))
        mesh_p50.append(_percentile(m, 0.5) * 1000)
        mesh_p99.append(_percentile(m, 0.99) * 1000)
        pool_p50.append(_percentile(b, 0.5) * 1000)
        pool_p99.append(_percentile(b, 0.99) * 1000)
    return [
        Figure(
            "latency",
            "round trip p50",
            _median(mesh_p50),
            _median(pool_p50),
            "ms",
            "lower",
            mesh_p50,
        ),
        Figure(
            "latency",
            "round trip p99",
            _median(mesh_p99),
            _median(pool_p99),
            "ms",
            "lower",
            mesh_p99,
        ),
    ]


def sleep(client: Client, slots: int, n: int, task_s: float, repeat: int) -> list[Figure]:
    ideal = n * task_s / slots
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        futures = [client.submit(sleeper, task_s) for _ in range(n)]
        for f in futures:
            f.result(timeout=ideal * 5 + 30)
        runs.append(time.perf_counter() - started)
    return [
        Figure(
            "sleep",
            f"{n} x {task_s * 1000:g} ms on {slots} slots",
            _median(runs),
            ideal,
            "s",
            "lower",
            runs,
            note="baseline is the ideal makespan",
        )
    ]


def payload(client: Client, size_mb: int, repeat: int) -> list[Figure]:
    data = os.urandom(1 << 20) * size_mb
    expected = hashlib.sha256(data).digest()

    def run_mesh() -> float:
        started = time.perf_counter()
        back = client.submit(digest, data).result(timeout=300)
        elapsed = time.perf_counter() - started
        if hashlib.sha256(back).digest() != expected:
            raise AssertionError("payload corrupted")
        return 2 * size_mb / elapsed

    def run_raw() -> float:
        return _raw_zmq_echo(data)

    mesh_runs, raw_runs = _alternate(run_mesh, run_raw, repeat)
    return [
        Figure(
            "payload",
            f"{size_mb} MB argument and result",
            _median(mesh_runs),
            _median(raw_runs),
            "MB/s",
            "higher",
            mesh_runs,
            note="baseline: raw pyzmq socket pair, copy=False, both ways",
        )
    ]


def _raw_zmq_echo(data: bytes) -> float:
    """The same bytes there and back over a raw pair of pyzmq sockets on loopback TCP."""
    ctx: zmq.Context[Any] = zmq.Context()
    a = ctx.socket(zmq.PAIR)
    b = ctx.socket(zmq.PAIR)
    port = a.bind_to_random_port("tcp://127.0.0.1")
    b.connect(f"tcp://127.0.0.1:{port}")

    def echo() -> None:
        frame = b.recv(copy=False)
        b.send(frame, copy=False)

    thread = threading.Thread(target=echo)
    thread.start()
    started = time.perf_counter()
    a.send(data, copy=False)
    back = a.recv(copy=False)
    elapsed = time.perf_counter() - started
    thread.join()
    size_mb = len(data) / (1 << 20)
    assert len(back.buffer) == len(data)
    a.close(0)
    b.close(0)
    ctx.term()
    return 2 * size_mb / elapsed


def _alternate(
    first: Callable[[], float], second: Callable[[], float], repeat: int
) -> tuple[list[float], list[float]]:
    """Run two measurements turn about, so that drifting machine load hits both alike."""
    a_runs, b_runs = [], []
    for _ in range(repeat):
        a_runs.append(first())
        b_runs.append(second())
    return a_runs, b_runs


# ----------------------------------------------------------------------------- driver


@dataclass
class BenchConfig:
    workloads: tuple[str, ...] = WORKLOADS
    broker: str | None = None
    workers: int = 1
    concurrency: int = 2
    journal: str = ":memory:"
    tasks: int = 10_000
    latency_samples: int = 1000
    sleep_tasks: int = 200
    sleep_s: float = 0.05
    payload_mb: int = 100
    repeat: int = 3


def run_bench(config: BenchConfig, progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the chosen workloads; returns a JSON-able report."""
    slots = config.workers * config.concurrency
    mesh: Mesh | None = None
    started = time.perf_counter()
    figures: list[Figure] = []
    try:
        if config.broker is None:
            mesh = Mesh(
                workers=config.workers,
                concurrency=config.concurrency,
                journal=config.journal,
                log_level="WARNING",
            )
            if config.journal != ":memory:" and mesh.workdir:
                mesh.journal = str(mesh.workdir / "bench.db")
            mesh.start()
            url = mesh.url
        else:
            url = config.broker
        startup_s = time.perf_counter() - started
        with Client(url) as client, ProcessPoolExecutor(slots) as pool:
            first = time.perf_counter()
            client.submit(noop, 0).result(timeout=60)
            pool.submit(noop, 0).result(timeout=60)
            first_result_s = startup_s + time.perf_counter() - first
            progress(f"mesh up at {url}: first result after {first_result_s:.2f}s")
            for name in config.workloads:
                progress(f"running {name} ...")
                if name == "throughput":
                    figures += throughput(client, pool, config.tasks, config.repeat)
                elif name == "latency":
                    figures += latency(client, pool, config.latency_samples, config.repeat)
                elif name == "sleep":
                    figures += sleep(client, slots, config.sleep_tasks, config.sleep_s, 1)
                elif name == "payload":
                    figures += payload(client, config.payload_mb, config.repeat)
                else:
                    raise ValueError(f"unknown workload {name!r}; choose from {WORKLOADS}")
    finally:
        if mesh is not None:
            mesh.stop()
    return {
        "config": asdict(config),
        "machine": {"cpus": os.cpu_count()},
        "startup_to_first_result_s": round(first_result_s, 3),
        "figures": [
            {**asdict(f), "ratio": None if f.ratio is None else round(f.ratio, 3)} for f in figures
        ],
    }
