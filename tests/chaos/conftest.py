"""Fixtures for the chaos suite: a fresh mesh per test that is always stopped, whatever happens.

- ``chaos_mesh`` builds and starts a ``ChaosMesh`` (a ``Mesh`` that remembers every broker it
  started, not only the current one) in the test's ``tmp_path``. Its finalizer stops every
  process the mesh ever started and then fails the test if any of their process groups survived.
- When a test fails (an assertion, a bounded wait, or ``pytest.mark.timeout``), the tail of every
  process log of its mesh is attached to the failure report, the brokers killed on purpose too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from taskmesh.testing import ManagedProcess, Mesh, group_members, wait_until

LOG_TAIL_CHARS = 6_000
GROUP_GONE_S = 10.0


class ChaosMesh(Mesh):
    """A ``Mesh`` that can list every process it ever started, replaced brokers included."""

    def processes(self) -> list[ManagedProcess]:
        """Every process this mesh started, oldest broker first, then every worker."""
        current = [self.broker] if self.broker is not None else []
        return [*self.old_brokers, *current, *self.workers]

    def log_tails(self, chars: int = LOG_TAIL_CHARS) -> str:
        """``Mesh.logs()`` for every process ever started, each cut to its last ``chars``."""
        parts = []
        for proc in self.processes():
            text = proc.output()
            if len(text) > chars:
                text = "...\n" + text[-chars:]
            parts.append(f"--- {proc.name} ({proc.log_path.name})\n{text}")
        return "\n".join(parts)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.failed and report.when in ("setup", "call"):
        for mesh in getattr(item, "taskmesh_meshes", []):
            report.sections.append((f"taskmesh logs ({mesh.workdir})", mesh.log_tails()))


@pytest.fixture
def chaos_mesh(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., ChaosMesh]]:
    """A factory of started meshes; each is stopped, and checked to leave no process behind."""
    made: list[ChaosMesh] = []

    def factory(**options: Any) -> ChaosMesh:
        workdir = tmp_path / f"mesh-{len(made) + 1}"
        workdir.mkdir()
        mesh = ChaosMesh(workdir=workdir, **options)
        made.append(mesh)
        if not hasattr(request.node, "taskmesh_meshes"):
            request.node.taskmesh_meshes = []
        request.node.taskmesh_meshes.append(mesh)
        mesh.start()  # on a failed start it stops what it started, then raises
        return mesh

    yield factory
    errors: list[Exception] = []
    for mesh in made:
        try:
            groups = [proc.pid for proc in mesh.processes()]
            mesh.stop()
            wait_until(
                lambda groups=groups: not any(group_members(g) for g in groups),
                GROUP_GONE_S,
                f"the mesh's process groups {groups} to end",
            )
        except Exception as exc:  # stop every mesh before reporting
            errors.append(exc)
    if errors:
        raise errors[0]
