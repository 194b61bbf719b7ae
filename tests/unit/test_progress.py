"""taskmesh.progress: yields every future once, as it completes, and counts the failures."""

from __future__ import annotations

import io
import threading
from concurrent.futures import Future
from typing import Any

import pytest
from rich.console import Console

import taskmesh


def _settle_later(futures: list[Future[Any]], fail: set[int]) -> threading.Thread:
    def run() -> None:
        for i, future in reversed(list(enumerate(futures))):
            if i in fail:
                future.set_exception(ValueError(f"task {i}"))
            else:
                future.set_result(i)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.timeout(10)
def test_progress_yields_each_future_once_and_counts_failures() -> None:
    futures: list[Future[Any]] = [Future() for _ in range(20)]
    out = io.StringIO()
    console = Console(file=out, width=100, force_terminal=False)
    thread = _settle_later(futures, fail={3, 7})
    seen = list(taskmesh.progress(futures, description="work", timeout=5, console=console))
    thread.join()
    assert sorted(id(f) for f in seen) == sorted(id(f) for f in futures)
    assert sum(1 for f in seen if f.exception() is not None) == 2
    text = out.getvalue()
    assert "work" in text and "20/20" in text and "failed 2" in text


@pytest.mark.timeout(10)
def test_progress_times_out_when_a_future_never_completes() -> None:
    futures: list[Future[Any]] = [Future()]
    console = Console(file=io.StringIO(), width=80)
    with pytest.raises(TimeoutError):
        list(taskmesh.progress(futures, timeout=0.2, console=console))
