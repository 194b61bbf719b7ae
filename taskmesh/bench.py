"""``taskmesh bench``: throughput, latency, dispatch gaps and payload speed, each figure printed
beside a baseline measured in the same run (a local ``ProcessPoolExecutor`` with as many
processes, or a raw pyzmq socket pair), so that a noisy machine does not fool the ratio.

Each workload runs ``repeat`` times and reports the median.
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import pickle
import queue
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import zmq

from taskmesh import protocol as p
from taskmesh.client import Client
from taskmesh.heap import KEEPER, LARGE_PAYLOAD
from taskmesh.serialize import dumps_call, dumps_function
from taskmesh.testing import Mesh

WORKLOADS = ("throughput", "latency", "sleep", "payload", "scale")


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


def _tasks_per_s(executor: Executor, n: int, who: str) -> float:
    """Submit ``n`` no-op tasks, wait for all, check every result."""
    started = time.perf_counter()
    futures = [executor.submit(noop, i) for i in range(n)]
    results = [f.result(timeout=300) for f in futures]
    elapsed = time.perf_counter() - started
    if results != list(range(n)):
        raise AssertionError(f"{who} returned wrong results")
    return n / elapsed


def throughput(client: Client, pool: ProcessPoolExecutor, n: int, repeat: int) -> list[Figure]:
    def run_mesh() -> float:
        return _tasks_per_s(client, n, "taskmesh")

    def run_pool() -> float:
        return _tasks_per_s(pool, n, "the process pool")

    mesh_runs, pool_runs = _alternate(repeat, run_mesh, run_pool)
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

    mesh_p50, mesh_p99, pool_p50, pool_p99, relay_p50, least_p50 = [], [], [], [], [], []
    samples(lambda i: client.submit(noop, i))  # warm up: functions cached, executors hot
    with BareRelay() as relay, BareRelay(executor=False, io_thread=False) as least:
        samples(relay.submit)
        samples(least.submit)
        for _ in range(repeat):
            m = samples(lambda i: client.submit(noop, i))
            b = samples(lambda i: pool.submit(noop, i))
            r = samples(relay.submit)
            q = samples(least.submit)
            mesh_p50.append(_percentile(m, 0.5) * 1000)
            mesh_p99.append(_percentile(m, 0.99) * 1000)
            pool_p50.append(_percentile(b, 0.5) * 1000)
            pool_p99.append(_percentile(b, 0.99) * 1000)
            relay_p50.append(_percentile(r, 0.5) * 1000)
            least_p50.append(_percentile(q, 0.5) * 1000)
    return [
        Figure(
            "latency",
            "bare broker relay p50",
            _median(least_p50),
            _median(pool_p50),
            "ms",
            "lower",
            least_p50,
            note="not taskmesh: caller -> broker -> worker over pyzmq, no logic (BareRelay)",
        ),
        Figure(
            "latency",
            "bare relay p50",
            _median(relay_p50),
            _median(pool_p50),
            "ms",
            "lower",
            relay_p50,
            note="not taskmesh: pyzmq and a pipe in taskmesh's shape, no logic (BareRelay)",
        ),
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

    def speed(round_trip: Callable[[bytes], Any]) -> float:
        started = time.perf_counter()
        back = round_trip(data)
        elapsed = time.perf_counter() - started
        if hashlib.sha256(back).digest() != expected:
            raise AssertionError("payload corrupted")
        return 2 * size_mb / elapsed

    def run_mesh() -> float:
        return speed(lambda d: client.submit(digest, d).result(timeout=300))

    def run_raw() -> float:
        return _raw_zmq_echo(data)

    with BareRelay(executor=False, io_thread=False) as relay:

        def run_relay() -> float:
            return speed(relay.echo)

        _alternate(1, run_mesh, run_raw, run_relay)  # warm up: connections, buffers, heaps
        mesh_runs, raw_runs, relay_runs = _alternate(repeat, run_mesh, run_raw, run_relay)
    return [
        Figure(
            "payload",
            f"{size_mb} MB through a bare broker relay",
            _median(relay_runs),
            _median(raw_runs),
            "MB/s",
            "higher",
            relay_runs,
            note="not taskmesh: pyzmq via a broker process, 4 hops, copy=False (BareRelay)",
        ),
        Figure(
            "payload",
            f"{size_mb} MB argument and result",
            _median(mesh_runs),
            _median(raw_runs),
            "MB/s",
            "higher",
            mesh_runs,
            note="baseline: raw pyzmq socket pair, copy=False, both ways",
        ),
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


# ----------------------------------------------------------------------------- latency floor


class BareRelay:
    """The fastest a round trip of a brokered design can be on this machine: pyzmq sockets,
    processes and wake-ups, with no protocol, no state and no logic, to put beside taskmesh's
    own round trip and the process pool's.

    By default it has taskmesh's shape: a producer thread hands each call to an I/O thread,
    which sends it over a DEALER to a ROUTER "broker" process, which forwards it to a DEALER
    "worker" process, which writes it down a pipe to an "executor" process, and the answer
    comes back the same way. ``executor=False, io_thread=False`` is the least any design with a
    broker in the path can cost: the caller's own thread sends, and the worker answers itself.
    The broker and the worker forward frames without copying them, so a large payload costs
    what the sockets cost and nothing more.
    """

    def __init__(
        self,
        executor: bool = True,
        io_thread: bool = True,
        timeout_s: float = 30.0,
    ) -> None:
        ctx = multiprocessing.get_context("spawn")
        ports_here, ports_there = ctx.Pipe()
        self._broker = ctx.Process(target=_relay_broker, args=(ports_there,), name="relay-broker")
        self._broker.start()
        if not ports_here.poll(timeout_s):
            self._broker.terminate()
            raise TimeoutError("the bare relay's broker did not start")
        front, back = ports_here.recv()
        self._worker = ctx.Process(target=_relay_worker, args=(back, executor), name="relay-worker")
        self._worker.start()
        self._timeout_ms = int(timeout_s * 1000)
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.connect(f"tcp://127.0.0.1:{front}")
        self._outgoing: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._waiting: dict[bytes, Future[int]] = {}
        self._wake_r, self._wake_w = os.pipe()
        self._closed = False
        self._ids = iter(range(1 << 62))
        self._thread: threading.Thread | None = None
        if io_thread:
            self._thread = threading.Thread(target=self._io, name="relay-io", daemon=True)
            self._thread.start()

    def submit(self, value: int) -> Future[int]:
        future: Future[int] = Future()
        if self._thread is None:
            future.set_result(int(bytes(self.echo(b"%d" % value))))
            return future
        key = b"%d" % next(self._ids)
        self._waiting[key] = future
        self._outgoing.put(key + b":" + b"%d" % value)
        os.write(self._wake_w, b"x")
        return future

    def echo(self, data: bytes) -> memoryview:
        """One round trip from the calling thread, the bytes not copied on this side (a relay
        made with ``io_thread=False``)."""
        if self._thread is not None:
            raise RuntimeError("echo() is for a relay without an I/O thread")
        self._sock.send(data, copy=False)
        if not self._sock.poll(self._timeout_ms):
            raise TimeoutError("the bare relay did not answer")
        return self._sock.recv(copy=False).buffer

    def _io(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._closed:
            events = dict(poller.poll(200))
            if self._wake_r in events:
                os.read(self._wake_r, 4096)
                while not self._outgoing.empty():
                    self._sock.send(self._outgoing.get())
            if self._sock in events:
                key, _, value = self._sock.recv().partition(b":")
                self._waiting.pop(key).set_result(int(value))

    def __enter__(self) -> BareRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self._closed = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self._sock.send(b"", zmq.NOBLOCK)  # the empty call stops every part in turn
        except zmq.ZMQError:
            pass
        for process in (self._broker, self._worker):
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        self._sock.close(0)
        self._ctx.term()
        os.close(self._wake_r)
        os.close(self._wake_w)


_RELAY_IDLE_MS = 60_000  # a relay part whose producer is gone gives up after this long


def _keep_payloads_memory() -> None:
    """The relay's processes keep large payloads' memory as taskmesh's broker and supervisor do
    (taskmesh/heap.py), from the start: each lives for one measurement."""
    if KEEPER.keep_large_payloads():
        KEEPER.saw(LARGE_PAYLOAD)


def _relay_broker(ports: Connection) -> None:
    _keep_payloads_memory()
    ctx: zmq.Context[Any] = zmq.Context()
    front = ctx.socket(zmq.ROUTER)
    back = ctx.socket(zmq.ROUTER)
    ports.send(
        (front.bind_to_random_port("tcp://127.0.0.1"), back.bind_to_random_port("tcp://127.0.0.1"))
    )
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    worker: bytes | None = None
    producer: Any = b""
    while True:
        events = dict(poller.poll(_RELAY_IDLE_MS))
        if not events:
            return
        if back in events:
            address, message = back.recv_multipart(copy=False)
            if worker is None:
                worker = bytes(address)  # its first message says it is there
            else:
                front.send_multipart([producer, message], copy=False)
        if front in events and worker is not None:
            producer, message = front.recv_multipart(copy=False)
            back.send_multipart([worker, message], copy=False)
            if not len(message):
                return


def _relay_worker(port: int, executor: bool) -> None:
    _keep_payloads_memory()
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.connect(f"tcp://127.0.0.1:{port}")
    sock.send(b"ready")
    if not executor:
        try:
            while sock.poll(_RELAY_IDLE_MS):
                message = sock.recv(copy=False)
                if not len(message):
                    return
                sock.send(message, copy=False)
        finally:
            sock.close(0)
            ctx.term()
        return
    here, there = multiprocessing.Pipe()
    process = multiprocessing.get_context("spawn").Process(target=_relay_executor, args=(there,))
    process.start()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(here.fileno(), zmq.POLLIN)
    try:
        while True:
            events = dict(poller.poll(_RELAY_IDLE_MS))
            if not events:
                return
            if sock in events:
                message = sock.recv()
                here.send_bytes(message)
                if not message:
                    return
            if here.fileno() in events:
                sock.send(here.recv_bytes())
    finally:
        process.join(timeout=5)
        if process.is_alive():
            process.kill()
        sock.close(0)
        ctx.term()


def _relay_executor(conn: Connection) -> None:
    while conn.poll(_RELAY_IDLE_MS / 1000):
        message = conn.recv_bytes()
        if not message:
            return
        conn.send_bytes(message)


# ----------------------------------------------------------------------------- scale


def _proc_stat(pid: int) -> tuple[float, int]:
    """(CPU seconds, resident bytes) of one process, from /proc."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks
    rss = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
    return cpu, rss


def scale_memory(pending: int, progress: Callable[[str], None]) -> list[Figure]:
    """Broker memory per pending task beyond its payload: ``pending`` tasks queued for a queue
    no worker serves, the broker's resident size measured before and after."""
    with Mesh(workers=0, log_level="WARNING") as mesh:
        assert mesh.broker is not None
        client = Client(mesh.url)
        try:
            client.status()
            _, rss_before = _proc_stat(mesh.broker.pid)
            for start in range(0, pending, 100_000):
                for i in range(start, min(start + 100_000, pending)):
                    client.submit(noop, i, _queue="parked")
                progress(f"  {min(start + 100_000, pending):,} tasks submitted")
            deadline = time.monotonic() + 600
            while mesh.status(timeout_s=30)["counters"]["submitted"] < pending:
                if time.monotonic() > deadline:
                    raise TimeoutError("the broker did not take every task in time")
                time.sleep(0.2)
            _, rss_after = _proc_stat(mesh.broker.pid)
        finally:
            client.close()
    payload = len(dumps_function(noop)) + len(dumps_call("noop", (0,), {}))
    per_task = (rss_after - rss_before) / pending - payload
    return [
        Figure(
            "scale",
            f"broker memory per pending task ({pending:,} queued)",
            per_task,
            1024.0,
            "bytes",
            "lower",
            [per_task],
            note=f"baseline is the 1 KB budget; {payload} payload bytes excluded",
        )
    ]


class _FakeWorkers:
    """N worker connections in one thread that answer every task at once: what remains is the
    broker's own cost of dispatching, whatever the number of workers."""

    def __init__(self, url: str, n: int, credit: int) -> None:
        self._ctx: zmq.Context[Any] = zmq.Context()
        self._socks = []
        for i in range(n):
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(url)
            ready = p.Ready(
                uuid.uuid4().hex, f"fake-{i}", "bench", os.getpid(), ["default"], 1, credit
            )
            sock.send_multipart(p.encode(p.WORKER, ready))
            self._socks.append(sock)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        for sock in self._socks:
            poller.register(sock, zmq.POLLIN)
        result = pickle.dumps(None)
        last_beat = time.monotonic()
        while not self._stop.is_set():
            for sock, _ in poller.poll(100):
                while True:
                    try:
                        _, msg = p.decode(sock.recv_multipart(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    if isinstance(msg, p.Tasks):
                        outcomes = [
                            p.Outcome(a.task_id, p.Status.OK, result) for a in msg.assignments
                        ]
                        sock.send_multipart(p.encode(p.WORKER, p.Results(outcomes, len(outcomes))))
            if time.monotonic() - last_beat > 0.5:
                last_beat = time.monotonic()
                for sock in self._socks:
                    sock.send_multipart(p.encode(p.WORKER, p.Heartbeat()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for sock in self._socks:
            sock.close(0)
        self._ctx.term()


def scale_dispatch(
    counts: tuple[int, ...], tasks: int, progress: Callable[[str], None]
) -> list[Figure]:
    """Broker CPU per task with 1, 8, 64 connected workers (answering at once)."""
    costs: dict[int, float] = {}
    for n in counts:
        with Mesh(workers=0, log_level="WARNING") as mesh:
            assert mesh.broker is not None
            fakes = _FakeWorkers(mesh.url, n, credit=16)
            client = Client(mesh.url)
            try:
                mesh.wait_for_workers(n)
                for f in [client.submit(noop, i) for i in range(1000)]:
                    f.result(timeout=60)
                cpu_before, _ = _proc_stat(mesh.broker.pid)
                for f in [client.submit(noop, i) for i in range(tasks)]:
                    f.result(timeout=300)
                cpu_after, _ = _proc_stat(mesh.broker.pid)
            finally:
                client.close()
                fakes.close()
        costs[n] = (cpu_after - cpu_before) / tasks * 1e6
        progress(f"  {n} workers: {costs[n]:.1f} us of broker CPU per task")
    first = costs[counts[0]]
    return [
        Figure(
            "scale",
            f"broker CPU per task, {n} workers",
            cost,
            first,
            "us",
            "lower",
            [cost],
            note=f"baseline: the same with {counts[0]} worker",
        )
        for n, cost in costs.items()
    ]


def _alternate(repeat: int, *measures: Callable[[], float]) -> list[list[float]]:
    """Run measurements turn about, so that drifting machine load hits each alike."""
    runs: list[list[float]] = [[] for _ in measures]
    for _ in range(repeat):
        for measure, out in zip(measures, runs, strict=True):
            out.append(measure())
    return runs


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
    scale_pending: int = 1_000_000
    scale_workers: tuple[int, ...] = (1, 8, 64)
    scale_tasks: int = 20_000
    curve: bool = False  # the embedded mesh over CurveZMQ, with throwaway keys

    def __post_init__(self) -> None:
        # checked before any mesh starts: a typo must not cost a start-up and a teardown
        unknown = [name for name in self.workloads if name not in WORKLOADS]
        if unknown or not self.workloads:
            what = f"unknown workload {unknown[0]!r}" if unknown else "no workload given"
            raise ValueError(f"{what}; choose from {', '.join(WORKLOADS)}")


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
                curve=config.curve,
            )
            if config.journal != ":memory:" and mesh.workdir:
                mesh.journal = str(mesh.workdir / "bench.db")
            mesh.start()
            url = mesh.url
        else:
            url = config.broker
        startup_s = time.perf_counter() - started
        # a secured embedded mesh hands its producer key to the client; against --broker
        # the client takes TASKMESH_CURVE_SECRET and TASKMESH_BROKER_KEY
        with mesh.client() if mesh else Client(url) as client, ProcessPoolExecutor(slots) as pool:
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
                elif name == "scale":
                    figures += scale_memory(config.scale_pending, progress)
                    figures += scale_dispatch(config.scale_workers, config.scale_tasks, progress)
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
