"""Fixtures for the integration tests: real brokers and workers over real sockets.

- ``shared_mesh`` (one per test module, options from the module's ``MESH_OPTIONS``) for tests
  that leave the mesh as they found it; ``mesh`` hands it to one test.
- ``make_mesh`` builds a fresh mesh for tests that kill or freeze workers.
- ``gate`` is a folder that ``_tasks.gated`` uses to say when it started and to wait for release.
- ``recording_client`` is a real ``Client`` that also counts every outcome the broker sends it.

Every mesh is stopped in a finalizer, and stopping must leave no process of it behind. When a
test fails, the tail of each process's log is attached to its report.
"""

from __future__ import annotations

import collections
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import _tasks
import cloudpickle
import pytest

from taskmesh import Client
from taskmesh.testing import Mesh, group_members, wait_until

# workers cannot import the tests folder: ship the task functions by value
cloudpickle.register_pickle_by_value(_tasks)

LOG_TAIL_CHARS = 12_000
GROUP_GONE_S = 10.0


# ------------------------------------------------------------------ failure reports


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)
    if report.failed and report.when in ("setup", "call"):
        for mesh in getattr(item, "taskmesh_meshes", []):
            for proc in ([mesh.broker] if mesh.broker else []) + mesh.workers:
                text = proc.output()
                if len(text) > LOG_TAIL_CHARS:
                    text = "...\n" + text[-LOG_TAIL_CHARS:]
                report.sections.append((f"taskmesh log: {proc.name} ({proc.log_path.name})", text))


def _attach(request: pytest.FixtureRequest, mesh: Mesh) -> None:
    node = request.node
    if not hasattr(node, "taskmesh_meshes"):
        node.taskmesh_meshes = []
    node.taskmesh_meshes.append(mesh)


# ------------------------------------------------------------------ processes


def _stop_and_check(mesh: Mesh) -> None:
    """Stop the mesh, then fail if any of its process groups survived."""
    groups = [proc.pid for proc in ([mesh.broker] if mesh.broker else []) + mesh.workers]
    mesh.stop()
    wait_until(
        lambda: not any(group_members(pgid) for pgid in groups),
        GROUP_GONE_S,
        f"the mesh's process groups {groups} to end",
    )


def _client_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name == "taskmesh-client"}


@pytest.fixture(autouse=True)
def no_leaked_client_threads() -> Iterator[None]:
    """Runs around every other function-scoped fixture: a test must close the clients it made."""
    before = _client_threads()
    yield
    wait_until(lambda: not (_client_threads() - before), 10.0, "client I/O threads to end")


def _start(options: dict[str, Any]) -> Mesh:
    mesh = Mesh(**options)
    mesh.start()  # stops what it started and raises (with the logs) if the mesh does not come up
    return mesh


@pytest.fixture(scope="module")
def shared_mesh(request: pytest.FixtureRequest) -> Iterator[Mesh]:
    """One mesh for a whole test module; options from the module's ``MESH_OPTIONS``."""
    mesh = _start(dict(getattr(request.module, "MESH_OPTIONS", {})))
    try:
        yield mesh
    finally:
        _stop_and_check(mesh)


@pytest.fixture
def mesh(request: pytest.FixtureRequest, shared_mesh: Mesh) -> Mesh:
    _attach(request, shared_mesh)
    return shared_mesh


@pytest.fixture
def client(mesh: Mesh) -> Iterator[Client]:
    with Client(mesh.url) as c:
        yield c


@pytest.fixture
def make_mesh(request: pytest.FixtureRequest) -> Iterator[Callable[..., Mesh]]:
    """A factory of fresh meshes, each stopped (and checked) when the test ends."""
    made: list[Mesh] = []

    def factory(**options: Any) -> Mesh:
        mesh = Mesh(**options)
        made.append(mesh)
        _attach(request, mesh)
        return mesh.start()

    yield factory
    errors = []
    for mesh in made:
        try:
            _stop_and_check(mesh)
        except Exception as exc:  # stop every mesh before reporting
            errors.append(exc)
    if errors:
        raise errors[0]


# ------------------------------------------------------------------ clients


class RecordingClient(Client):
    """A real client that counts, per task id, every outcome message the broker sends it."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.outcomes_seen: collections.Counter[str] = collections.Counter()
        super().__init__(*args, **kwargs)

    def _resolve(self, outcomes: list[Any]) -> None:
        for outcome in outcomes:
            self.outcomes_seen[outcome.task_id] += 1
        super()._resolve(outcomes)


@pytest.fixture
def recording_client() -> Iterator[Callable[[Mesh], RecordingClient]]:
    made: list[RecordingClient] = []

    def factory(mesh: Mesh) -> RecordingClient:
        c = RecordingClient(mesh.url)
        made.append(c)
        return c

    yield factory
    for c in made:
        c.close()


@pytest.fixture
def dead_url() -> str:
    """A loopback address where nothing listens (a port bound and released just now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


# ------------------------------------------------------------------ gates


class Gate:
    """The folder ``_tasks.gated`` reports to; see that module's docstring."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir()

    def __str__(self) -> str:
        return str(self.path)

    def _marks(self, kind: str) -> list[tuple[int, str, int]]:
        marks = []
        for f in self.path.glob(f"{kind}__*"):
            _, x, worker, pid = f.name.split("__")
            marks.append((int(x), worker, int(pid)))
        return sorted(marks)

    def started(self) -> list[tuple[int, str, int]]:
        """``(x, worker name, executor pid)`` for every run that began."""
        return self._marks("started")

    def done(self) -> list[tuple[int, str, int]]:
        """``(x, worker name, executor pid)`` for every run that got past the gate."""
        return self._marks("done")

    def started_on(self, worker: str) -> list[int]:
        return [x for x, w, _ in self.started() if w == worker]

    def release(self) -> None:
        (self.path / "release").touch()


@pytest.fixture
def gate(tmp_path: Path) -> Gate:
    return Gate(tmp_path / "gate")
