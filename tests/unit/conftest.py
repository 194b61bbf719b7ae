"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from taskmesh import Client


@pytest.fixture
def client() -> Iterator[Client]:
    """A client whose broker never answers: for tests of its bookkeeping, not its socket."""
    c = Client("tcp://127.0.0.1:9", connect_timeout_s=30.0)  # nothing listens on port 9
    try:
        yield c
    finally:
        c.close()
