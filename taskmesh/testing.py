"""An embedded mesh for tests, the demo and the benchmark: a broker and worker nodes as real
processes on a free port, each in its own process group so that ending it ends its executors.

    with Mesh(workers=2, concurrency=2) as mesh:
        with mesh.client() as client:
            assert client.submit(pow, 2, 10).result(timeout=10) == 1024
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from taskmesh.client import Client, fetch_status
from taskmesh.errors import BrokerUnavailable, TaskmeshError
from taskmesh.security import KeyFiles, Role, generate_keypair


class ManagedProcess:
    """A taskmesh process we started, ended by its process group even when a test fails."""

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str]) -> None:
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        self.pid = self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def signal(self, sig: int) -> None:
        """Signal the whole process group (supervisor, forkserver, executors)."""
        try:
            os.killpg(self.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self._reap(5.0)

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM, wait up to ``grace_s``, then SIGKILL; always reaps the process group."""
        if self.alive():
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
        # the leader may be gone while executors linger: sweep the group regardless
        self.signal(signal.SIGKILL)
        self._reap(5.0)
        self._log.close()
        return self.popen.returncode

    def _reap(self, timeout: float) -> None:
        try:
            self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


def group_members(pgid: int) -> list[tuple[int, str]]:
    """``(pid, state)`` of every live process in a process group, read from /proc (Linux).
    Zombies are left out: they run nothing, and PID 1 in a container may never reap them."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state != "Z":
            members.append((int(entry), state))
    return members


def wait_until(
    predicate: Callable[[], bool], timeout: float, what: str, every: float = 0.05
) -> None:
    """Poll ``predicate`` until true; raise ``TimeoutError`` naming ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(every)


class MeshKeys:
    """Throwaway CurveZMQ keys for a secured mesh, all under ``folder``: every key pair in
    ``secret/``, and the broker's folders of allowed public keys, one per role. It starts with
    ``broker``, and one ``producer``, ``worker`` and ``reader`` key, each allowed in its role."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.secrets = folder / "secret"
        self.folders = {role: folder / f"{role.value}s" for role in Role}
        for path in (self.secrets, *self.folders.values()):
            path.mkdir(parents=True, exist_ok=True)
        self.broker = generate_keypair("broker", self.secrets)
        self.producer = self.add("producer", Role.PRODUCER)
        self.worker = self.add("worker", Role.WORKER)
        self.reader = self.add("reader", Role.READER)

    def add(self, name: str, *roles: Role) -> KeyFiles:
        """A new key pair, allowed in ``roles`` (none: a key the broker does not know)."""
        files = generate_keypair(name, self.secrets)
        for role in roles:
            self.allow(files, role)
        return files

    def allow(self, files: KeyFiles, role: Role) -> None:
        target = self.folders[role] / files.public.name
        tmp = target.with_name(f".{target.name}.tmp")  # not *.key: the broker never half-reads
        shutil.copyfile(files.public, tmp)
        os.replace(tmp, target)

    def revoke(self, files: KeyFiles, role: Role) -> None:
        (self.folders[role] / files.public.name).unlink(missing_ok=True)

    def broker_args(self) -> list[str]:
        args = ["--curve-secret", str(self.broker.secret)]
        for role, folder in self.folders.items():
            args += [f"--{role.value}s", str(folder)]
        return args

    def peer_args(self, files: KeyFiles) -> list[str]:
        return ["--curve-secret", str(files.secret), "--broker-key", str(self.broker.public)]

    def client_kwargs(self, files: KeyFiles) -> dict[str, str]:
        """``Client``/``fetch_status`` keyword arguments for a peer holding ``files``."""
        return {"curve_secret": str(files.secret), "broker_key": str(self.broker.public)}


class Mesh:
    """A broker and worker nodes on a free loopback port, as real ``taskmesh`` processes.

    ``curve=True`` secures it with CurveZMQ and throwaway keys (``mesh.keys``, a ``MeshKeys``):
    workers use the worker key, ``client()`` and ``status()`` the producer key."""

    def __init__(
        self,
        workers: int = 2,
        concurrency: int = 2,
        *,
        queues: Sequence[str] = ("default",),
        heartbeat_interval_s: float = 1.0,
        heartbeat_liveness: int = 3,
        journal: str = ":memory:",
        workdir: str | os.PathLike[str] | None = None,
        log_level: str = "INFO",
        env: dict[str, str] | None = None,
        start_timeout_s: float = 30.0,
        broker_args: Sequence[str] = (),
        curve: bool = False,
    ) -> None:
        self.n_workers = workers
        self.concurrency = concurrency
        self.queues = list(queues)
        self.heartbeat = (heartbeat_interval_s, heartbeat_liveness)
        self.journal = journal
        self.log_level = log_level
        self.start_timeout_s = start_timeout_s
        self.broker_args = list(broker_args)
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        if workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="taskmesh-mesh-")
            workdir = self._tmp.name
        self.workdir = Path(workdir)
        self.env = {**os.environ, **(env or {})}
        self.env.pop("TASKMESH_BROKER", None)
        for name in ("CURVE_SECRET", "BROKER_KEY", "PRODUCER_KEYS", "WORKER_KEYS", "READER_KEYS"):
            self.env.pop(f"TASKMESH_{name}", None)  # the mesh's own keys, or none
        self.keys = MeshKeys(self.workdir / "keys") if curve else None
        self.broker: ManagedProcess | None = None
        self.old_brokers: list[ManagedProcess] = []  # replaced by start_broker, kept for logs
        self.workers: list[ManagedProcess] = []
        self.url = ""
        self._clients: list[Client] = []
        self._count = 0

    # -------------------------------------------------------------- processes

    def _hb_args(self) -> list[str]:
        interval, liveness = self.heartbeat
        return ["--heartbeat-interval", str(interval), "--heartbeat-liveness", str(liveness)]

    def start_broker(self, bind: str | None = None, journal: str | None = None) -> ManagedProcess:
        """Start (or restart) the broker; a restart binds the same address as before.

        A broker still running is stopped first (kill it yourself to simulate a crash)."""
        if self.broker is not None:
            self.broker.stop(grace_s=3.0)
            self.old_brokers.append(self.broker)
        port_file = self.workdir / "broker.endpoint"
        port_file.unlink(missing_ok=True)
        bind = bind or self.url or "tcp://127.0.0.1:0"
        argv = [
            sys.executable,
            "-m",
            "taskmesh",
            "broker",
            "--bind",
            bind,
            "--journal",
            journal or self.journal,
            "--port-file",
            str(port_file),
            "--log-level",
            self.log_level,
            *self._hb_args(),
            *(self.keys.broker_args() if self.keys else ()),
            *self.broker_args,
        ]
        self._count += 1
        proc = ManagedProcess("broker", argv, self.workdir / f"broker-{self._count}.log", self.env)
        self.broker = proc
        try:
            wait_until(
                lambda: port_file.exists() or not proc.alive(),
                self.start_timeout_s,
                "the broker to bind",
            )
        except TimeoutError:
            raise TaskmeshError(f"broker did not start:\n{proc.output()}") from None
        if not proc.alive():
            raise TaskmeshError(f"broker exited at start:\n{proc.output()}")
        self.url = port_file.read_text().strip()
        return proc

    def add_worker(
        self,
        name: str | None = None,
        *,
        concurrency: int | None = None,
        queues: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        key: KeyFiles | None = None,
    ) -> ManagedProcess:
        """Start a worker node; on a CURVE mesh it holds ``key`` (default: the worker key)."""
        self._count += 1
        name = name or f"worker-{len(self.workers) + 1}"
        argv = [
            sys.executable,
            "-m",
            "taskmesh",
            "worker",
            "--broker",
            self.url,
            "--concurrency",
            str(concurrency or self.concurrency),
            "--queues",
            ",".join(queues or self.queues),
            "--name",
            name,
            "--log-level",
            self.log_level,
            *self._hb_args(),
            *(self.keys.peer_args(key or self.keys.worker) if self.keys else ()),
            *extra_args,
        ]
        proc = ManagedProcess(name, argv, self.workdir / f"{name}.log", self.env)
        self.workers.append(proc)
        return proc

    def start(self) -> Mesh:
        try:
            self.start_broker()
            for _ in range(self.n_workers):
                self.add_worker()
            self.wait_for_workers(self.n_workers)
        except BaseException:
            self.stop()
            raise
        return self

    def status(self, timeout_s: float = 2.0) -> dict[str, Any]:
        keys = self.keys.client_kwargs(self.keys.producer) if self.keys else {}
        return fetch_status(self.url, timeout_s, **keys)

    def wait_for_workers(self, n: int, timeout: float | None = None) -> None:
        """Until the broker counts exactly ``n`` live workers."""

        def ready() -> bool:
            try:
                return int(self.status()["workers_alive"]) == n
            except BrokerUnavailable:
                return False

        try:
            wait_until(ready, timeout or self.start_timeout_s, f"{n} workers to register")
        except TimeoutError:
            logs = "\n".join(f"--- {w.name}\n{w.output()[-2000:]}" for w in self.workers)
            raise TaskmeshError(f"workers did not register:\n{logs}") from None

    def client(self, **kwargs: Any) -> Client:
        if self.keys is not None:
            kwargs = {**self.keys.client_kwargs(self.keys.producer), **kwargs}
        client = Client(self.url, **kwargs)
        self._clients.append(client)
        return client

    def stop(self) -> None:
        for client in self._clients:
            client.close()
        self._clients.clear()
        for proc in self.workers:
            proc.stop(grace_s=3.0)
        if self.broker is not None:
            self.broker.stop(grace_s=3.0)
        for old in self.old_brokers:
            old.stop(grace_s=1.0)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def logs(self) -> str:
        procs = [*self.old_brokers, *([self.broker] if self.broker else []), *self.workers]
        return "\n".join(
            f"--- {proc.name} ({proc.log_path.name})\n{proc.output()}" for proc in procs
        )

    def __enter__(self) -> Mesh:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextmanager
def connected(workers: int = 2, concurrency: int = 2) -> Iterator[Client]:
    """The default client (``taskmesh.connect``) on ``TASKMESH_BROKER`` when it is set, else on
    an embedded mesh started for the duration: how an example or a script runs both against a
    real mesh and on its own."""
    from taskmesh.client import connect

    own_broker = os.environ.get("TASKMESH_BROKER")
    if own_broker:
        client = connect(own_broker)
        try:
            yield client
        finally:
            client.close()
        return
    with Mesh(workers=workers, concurrency=concurrency) as mesh:
        client = connect(mesh.url)
        try:
            yield client
        finally:
            client.close()


__all__ = ["ManagedProcess", "Mesh", "MeshKeys", "wait_until"]
