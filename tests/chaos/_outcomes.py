"""What the fault-injection runs count at the producer: every outcome message on the wire
(``CountingClient``) and every resolution of every future (``Tally``). The client drops repeated
outcomes by design (first one wins); these show how many there were, and whether a repeat or a
second resolution ever happened."""

from __future__ import annotations

import collections
import concurrent.futures
import threading
from collections.abc import Callable
from typing import Any

from taskmesh import Client
from taskmesh.protocol import Outcome


class CountingClient(Client):
    """A real client that also counts every outcome message the broker sends it, per task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.wire: collections.Counter[str] = collections.Counter()
        self.first: dict[str, tuple[int, bytes]] = {}
        self.conflicts: list[str] = []
        self.resyncs = 0  # answers to the broker's Reconnect: hello, resend, watch
        super().__init__(*args, **kwargs)

    def _resync(self) -> None:
        self.resyncs += 1
        super()._resync()

    def _resolve(self, outcomes: list[Outcome]) -> None:
        for outcome in outcomes:
            key = (int(outcome.status), bytes(outcome.value))
            self.wire[outcome.task_id] += 1
            if self.first.setdefault(outcome.task_id, key) != key:
                self.conflicts.append(outcome.task_id)
        super()._resolve(outcomes)


class Tally:
    """Every resolution of every future, counted by done callbacks (a second one shows here)."""

    def __init__(self, expected: Callable[[int], Any]) -> None:
        self.expected = expected
        self.lock = threading.Lock()
        self.resolved = 0
        self.calls: collections.Counter[int] = collections.Counter()
        self.wrong: dict[int, str] = {}

    def watch(self, index: int, future: concurrent.futures.Future[Any]) -> None:
        future.add_done_callback(lambda f: self._done(index, f))

    def _done(self, index: int, future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            problem: str | None = "cancelled"
        elif (exc := future.exception()) is not None:
            problem = f"{type(exc).__name__}: {exc}"
        elif future.result() != self.expected(index):
            problem = f"wrong value {future.result()!r}"
        else:
            problem = None
        with self.lock:
            self.calls[index] += 1
            if self.calls[index] == 1:
                self.resolved += 1
            if problem is not None:
                self.wrong[index] = problem

    def count(self) -> int:
        with self.lock:
            return self.resolved
