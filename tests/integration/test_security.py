"""CurveZMQ over loopback with real handshakes: who gets served, who is refused, and how fast.

One secured mesh for the module (a broker with producer, worker and reader key folders, and one
worker holding the worker key). Keys that must be refused are made per test in ``mesh.keys``.
"""

from __future__ import annotations

import contextlib
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import _tasks
import pytest

from taskmesh import AuthenticationError, BrokerUnavailable, Client
from taskmesh.client import fetch_status
from taskmesh.security import KeyFiles, Role, generate_keypair, load_public_key
from taskmesh.testing import ManagedProcess, Mesh, wait_until

MESH_OPTIONS = {"curve": True, "workers": 1, "concurrency": 2}

pytestmark = pytest.mark.timeout(90)

CONNECT_TIMEOUT_S = 3.0
SLACK_S = 3.0  # scheduling noise on a loaded machine, on top of a timeout


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "taskmesh", *args],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )


@pytest.fixture
def submitted(mesh: Mesh) -> Iterator[None]:
    """The test must not get a single task into the broker."""
    before = mesh.status()["counters"]["submitted"]
    yield
    assert mesh.status()["counters"]["submitted"] == before, "a refused peer got a task in"


def client_with(mesh: Mesh, files: KeyFiles | None) -> Client:
    assert mesh.keys is not None
    kwargs = mesh.keys.client_kwargs(files) if files else {}
    return Client(mesh.url, connect_timeout_s=CONNECT_TIMEOUT_S, **kwargs)


def refused_within(client: Client, deadline_s: float) -> Exception:
    """Submit once; the future must fail within ``deadline_s``; returns its exception."""
    started = time.monotonic()
    future = client.submit(_tasks.add, 1, 2)
    error = future.exception(timeout=deadline_s + SLACK_S)
    assert error is not None, "a refused peer got a result"
    assert time.monotonic() - started < deadline_s + SLACK_S
    return error


def worker_names(mesh: Mesh) -> list[str]:
    return sorted(w["name"] for w in mesh.status()["workers"])


# ------------------------------------------------------------------ allowed peers


def test_allowed_producer_and_worker_run_tasks_end_to_end(mesh: Mesh) -> None:
    with mesh.client() as client:
        assert [f.result(timeout=20) for f in [client.submit(_tasks.add, i, i) for i in range(8)]]
        assert list(client.map(_tasks.add, range(5), range(5))) == [0, 2, 4, 6, 8]
        with pytest.raises(ValueError, match="boom"):
            client.submit(_tasks.fail_with_value_error, "boom").result(timeout=20)
        assert client.status()["workers_alive"] == 1
    assert worker_names(mesh) == ["worker-1"]


def test_reader_key_reads_status_and_nothing_else(mesh: Mesh, submitted: None) -> None:
    assert mesh.keys is not None
    snapshot = fetch_status(mesh.url, 5.0, **mesh.keys.client_kwargs(mesh.keys.reader))
    assert snapshot["workers_alive"] == 1
    with client_with(mesh, mesh.keys.reader) as client:
        error = refused_within(client, CONNECT_TIMEOUT_S)
    assert isinstance(error, AuthenticationError)


def test_status_command_with_keys_and_without(mesh: Mesh) -> None:
    assert mesh.keys is not None
    reader = mesh.keys.reader
    ok = run_cli(
        "status", "--broker", mesh.url, "--json",
        "--curve-secret", str(reader.secret), "--broker-key", str(mesh.keys.broker.public),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert '"workers_alive": 1' in ok.stdout

    plain = run_cli("status", "--broker", mesh.url, "--timeout", "5")
    assert plain.returncode == 1
    assert "--curve-secret" in plain.stderr and "Traceback" not in plain.stderr


# ------------------------------------------------------------------ refused producers


def test_unknown_producer_key_is_refused_at_the_handshake(mesh: Mesh, submitted: None) -> None:
    assert mesh.keys is not None
    stranger = mesh.keys.add("stranger")  # a valid key pair in no allowed folder
    with client_with(mesh, stranger) as client:
        error = refused_within(client, CONNECT_TIMEOUT_S)
    assert isinstance(error, AuthenticationError)
    assert "key" in str(error)
    with pytest.raises(AuthenticationError):
        fetch_status(mesh.url, 5.0, **mesh.keys.client_kwargs(stranger))
    broker, key = mesh.broker, load_public_key(stranger.public).decode()
    assert broker is not None
    wait_until(lambda: key in broker.output(), 10.0, "the broker to log the refused key")


def test_worker_key_cannot_submit(mesh: Mesh, submitted: None) -> None:
    assert mesh.keys is not None
    with client_with(mesh, mesh.keys.worker) as client:
        error = refused_within(client, CONNECT_TIMEOUT_S)
    assert isinstance(error, AuthenticationError)
    assert "worker key" in str(error)


def test_plain_text_client_gets_nothing_run(mesh: Mesh, submitted: None) -> None:
    with client_with(mesh, None) as client:
        error = refused_within(client, CONNECT_TIMEOUT_S)
    assert isinstance(error, AuthenticationError)
    assert "--curve-secret" in str(error), "the message must say what to do"
    with pytest.raises(AuthenticationError):
        fetch_status(mesh.url, 5.0)


def test_wrong_broker_key_fails_within_the_timeout_and_says_check_the_keys(
    mesh: Mesh, submitted: None
) -> None:
    assert mesh.keys is not None
    impostor = generate_keypair("impostor-broker", mesh.keys.secrets)
    with Client(
        mesh.url,
        connect_timeout_s=CONNECT_TIMEOUT_S,
        curve_secret=str(mesh.keys.producer.secret),
        broker_key=str(impostor.public),
    ) as client:
        error = refused_within(client, CONNECT_TIMEOUT_S)
    # the broker cannot decrypt us and hangs up: no refusal to report, so the timeout says it
    assert isinstance(error, BrokerUnavailable)
    assert "--broker-key" in str(error)


# ------------------------------------------------------------------ refused workers


@contextlib.contextmanager
def rogue_worker(mesh: Mesh, name: str, key: KeyFiles) -> Iterator[ManagedProcess]:
    proc = mesh.add_worker(name, key=key)
    try:
        yield proc
    finally:
        proc.stop(grace_s=3.0)


@pytest.mark.parametrize("which", ["producer key", "unknown key"])
def test_worker_with_a_non_worker_key_gets_no_tasks(mesh: Mesh, which: str) -> None:
    assert mesh.keys is not None
    key = mesh.keys.producer if which == "producer key" else mesh.keys.add("rogue-worker-key")
    name = f"rogue-{which.split()[0]}"
    with rogue_worker(mesh, name, key) as proc:
        wait_until(
            lambda: "refused" in proc.output(), 20.0, f"the {which} worker to log its refusal"
        )
        with mesh.client() as client:
            futures = [client.submit(_tasks.whoami) for _ in range(10)]
            ran_on = {f.result(timeout=20)["worker"] for f in futures}
        assert ran_on == {"worker-1"}
        assert worker_names(mesh) == ["worker-1"]
        assert proc.alive(), "a refused worker keeps trying: its key may be allowed later"


# ------------------------------------------------------------------ rotation


def test_keys_are_added_and_revoked_without_a_restart(mesh: Mesh) -> None:
    assert mesh.keys is not None and mesh.broker is not None
    broker_pid = mesh.broker.pid
    newcomer = mesh.keys.add("newcomer")

    with client_with(mesh, newcomer) as client:  # not allowed yet
        assert isinstance(refused_within(client, CONNECT_TIMEOUT_S), AuthenticationError)

    mesh.keys.allow(newcomer, Role.PRODUCER)  # granted: no restart, no signal
    with client_with(mesh, newcomer) as client:
        assert client.submit(_tasks.add, 2, 3).result(timeout=20) == 5

        mesh.keys.revoke(newcomer, Role.PRODUCER)  # revoked while connected
        # the broker looks at the folder at least once per heartbeat interval
        deadline = time.monotonic() + 10.0
        while True:
            future = client.submit(_tasks.add, 1, 1)
            error = future.exception(timeout=20)
            if error is not None or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert isinstance(error, AuthenticationError), "a revoked key kept its service"

    with client_with(mesh, newcomer) as client:  # and a new connection is refused too
        assert isinstance(refused_within(client, CONNECT_TIMEOUT_S), AuthenticationError)
    assert mesh.broker.pid == broker_pid and mesh.broker.alive()


def test_revoked_worker_is_declared_dead_and_gets_no_more_tasks(mesh: Mesh) -> None:
    assert mesh.keys is not None
    key = mesh.keys.add("short-lived-worker", Role.WORKER)
    with rogue_worker(mesh, "short-lived", key) as proc:
        mesh.wait_for_workers(2)
        mesh.keys.revoke(key, Role.WORKER)
        mesh.wait_for_workers(1, timeout=15.0)  # its heartbeats are refused: dead, tasks requeued
        assert worker_names(mesh) == ["worker-1"]
        wait_until(lambda: "refused" in proc.output(), 10.0, "the worker to log its refusal")
        with mesh.client() as client:
            futures = [client.submit(_tasks.whoami) for _ in range(5)]
            ran_on = {f.result(timeout=20)["worker"] for f in futures}
        assert ran_on == {"worker-1"}


def test_sighup_reloads_the_key_folders(mesh: Mesh) -> None:
    broker = mesh.broker
    assert broker is not None
    broker.signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP" in broker.output(), 10.0, "the broker to reload its keys")
    assert broker.alive()
    with mesh.client() as client:
        assert client.submit(_tasks.add, 20, 22).result(timeout=20) == 42


# ------------------------------------------------------------------ keys and binding


def test_keys_generate_and_show(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    made = run_cli("keys", "generate", "--name", "node-7", "--out", str(out))
    assert made.returncode == 0, made.stderr
    public, secret = out / "node-7.key", out / "node-7.key_secret"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    key = load_public_key(public).decode()
    assert key in made.stdout

    for path in (public, secret):
        shown = run_cli("keys", "show", str(path))
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.strip() == key
    secret_text = secret.read_text()
    secret_key = secret_text.split("secret-key")[1].split('"')[1]
    assert secret_key not in run_cli("keys", "show", str(secret)).stdout

    again = run_cli("keys", "generate", "--name", "node-7", "--out", str(out))
    assert again.returncode == 1 and "exists" in again.stderr
    assert secret.read_text() == secret_text
    missing = run_cli("keys", "show", str(out / "nope.key"))
    assert missing.returncode == 1 and "Traceback" not in missing.stderr


def test_mesh_secret_keys_are_0600(mesh: Mesh) -> None:
    assert mesh.keys is not None
    for files in (mesh.keys.broker, mesh.keys.producer, mesh.keys.worker, mesh.keys.reader):
        assert stat.S_IMODE(files.secret.stat().st_mode) == 0o600


def test_public_bind_needs_keys_or_insecure() -> None:
    refused = run_cli("broker", "--bind", "tcp://0.0.0.0:0", "--journal", ":memory:")
    assert refused.returncode == 1
    assert "--curve-secret" in refused.stderr and "--insecure" in refused.stderr

    secured = Mesh(workers=0, curve=True, log_level="INFO")
    try:
        secured.start_broker(bind="tcp://0.0.0.0:0")  # keys: no --insecure needed
        assert secured.broker is not None and secured.broker.alive()
        assert "INSECURE" not in secured.broker.output()
        assert secured.status()["workers_alive"] == 0
    finally:
        secured.stop()
