"""One scripted, time-bounded fault-injection run on loopback.

5,000 tasks of mixed length (most a few ms, one in twenty 50-200 ms; a fixed mix, not a random
one) go to 3 worker nodes (2 executors each) behind a broker with an SQLite journal and a short
heartbeat. While they run, a chaos thread works through a fixed script, each step triggered by
how many outcomes the producer has received (never by the clock):

- SIGKILL a worker node's whole process group and start a replacement (twice);
- SIGSTOP a worker node until the broker declares it dead, then SIGCONT it (once);
- SIGKILL the broker and restart it on the same address and journal (twice).

Every run of a task appends ``begin``/``end`` lines with its index and pid to a side file (one
``write`` per short line on an ``O_APPEND`` descriptor, so concurrent runs never interleave).

What must hold at the end (the contract in DESIGN.md): every future resolves exactly once, with
the right value; no task is lost; every task ran to completion at least once. Delivery is
at-least-once, so a task may run more than once: those are counted and printed, not failed.
"""

from __future__ import annotations

import collections
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from _outcomes import CountingClient, Tally

import taskmesh
from taskmesh.testing import Mesh, wait_until

# Workers cannot import the tests folder: the task function travels by value. (Passing
# ``env={"PYTHONPATH": <this folder>}`` to the mesh works too, but only while pytest names this
# module ``test_chaos``, which depends on its import mode.)
cloudpickle.register_pickle_by_value(sys.modules[__name__])

pytestmark = pytest.mark.chaos

N_TASKS = 5_000
WORKERS = 3
CONCURRENCY = 2
HEARTBEAT_S = 0.25
LIVENESS = 3  # a silent peer is dead after 0.75 s
MAX_ATTEMPTS = 10  # runs lost to dead workers before WorkerLost: out of reach of this script

RUN_BUDGET_S = 120.0  # everything, from the first submit to the last outcome
FREEZE_OUTCOMES = 200  # outcomes the others deliver while the frozen worker is declared dead
STEP_WAIT_S = 30.0  # one chaos step: a worker to be declared dead, to register, a broker to bind

#: (outcomes received, action): the chaos script, each step once its threshold is reached
SCRIPT: tuple[tuple[int, str], ...] = (
    (400, "kill_worker"),
    (1_100, "kill_broker"),
    (1_900, "freeze_worker"),
    (2_700, "kill_worker"),
    (3_500, "kill_broker"),
)


# ------------------------------------------------------------------ the workload


def task_length_s(index: int) -> float:
    """A fixed mix: one task in twenty sleeps 50-200 ms, the others 1-4 ms."""
    if index % 20 == 7:
        return (50 + index * 37 % 151) / 1000
    return (1 + index % 4) / 1000


def expected(index: int) -> tuple[int, int]:
    return index, index * index


def chaos_task(index: int, length_s: float, side_file: str) -> tuple[int, int]:
    """Record the run in the side file, sleep ``length_s``, answer."""
    fd = os.open(side_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"begin {index} {os.getpid()}\n".encode())
        time.sleep(length_s)
        os.write(fd, f"end {index} {os.getpid()}\n".encode())
    finally:
        os.close(fd)
    return index, index * index


def read_runs(side_file: Path) -> tuple[collections.Counter[int], collections.Counter[int]]:
    """How many runs of each task began, and how many ended."""
    began: collections.Counter[int] = collections.Counter()
    ended: collections.Counter[int] = collections.Counter()
    if side_file.exists():
        for line in side_file.read_text().splitlines():
            kind, index, _pid = line.split()
            (began if kind == "begin" else ended)[int(index)] += 1
    return began, ended


# ------------------------------------------------------------------ the producer side


# ------------------------------------------------------------------ the chaos script


def live_workers(mesh: Mesh) -> set[str]:
    return {w["name"] for w in mesh.status()["workers"]}


class Chaos(threading.Thread):
    """Works through ``SCRIPT`` in its own thread; every wait is bounded and can be aborted."""

    def __init__(self, mesh: Mesh, progress: Callable[[], int], deadline: float) -> None:
        super().__init__(name="chaos", daemon=True)
        self.mesh = mesh
        self.progress = progress
        self.deadline = deadline
        self.abort = threading.Event()
        self.error: BaseException | None = None
        self.kills: collections.Counter[str] = collections.Counter()
        self.log: list[str] = []
        # the original workers, each hit once, in this order
        self._victims = list(mesh.workers)
        self.roster = {w.name for w in mesh.workers}  # who the broker should list as alive
        self._t0 = time.monotonic()

    def run(self) -> None:
        try:
            for threshold, action in SCRIPT:
                self._wait(lambda t=threshold: self.progress() >= t, f"{threshold} outcomes")
                getattr(self, action)()
        except BaseException as exc:
            self.error = exc

    # -------------------------------------------------------------- steps

    def kill_worker(self) -> None:
        victim = self._victims.pop(0)
        busy = self._busy(victim.name)
        victim.kill()  # SIGKILL to the group: supervisor, forkserver, executors
        self.kills["worker SIGKILL"] += 1
        spare = self.mesh.add_worker()
        self.kills["replacement worker started"] += 1
        self.roster = (self.roster - {victim.name}) | {spare.name}
        self._note(
            f"SIGKILL {victim.name} (the broker saw it busy with {busy}), start {spare.name}"
        )
        self._wait(
            lambda: live_workers(self.mesh) == self.roster,
            f"{victim.name} to be declared dead and {spare.name} to register",
        )
        self._note(f"  the broker lists {sorted(self.roster)}")

    def freeze_worker(self) -> None:
        victim = self._victims.pop(0)
        busy = self._busy(victim.name)
        victim.signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        self.kills["worker SIGSTOP"] += 1
        self._note(f"SIGSTOP {victim.name} (broker saw it busy with {busy})")
        # frozen for longer than the liveness timeout: until the broker has declared it dead,
        # and then while the others finish FREEZE_OUTCOMES more tasks (its requeued ones among
        # them), so that it wakes up holding stale runs whose late outcomes must be dropped
        self._wait(
            lambda: victim.name not in live_workers(self.mesh), f"{victim.name} declared dead"
        )
        declared = self.progress()
        self._note(f"  the broker declared {victim.name} dead")
        self._wait(
            lambda: self.progress() >= declared + FREEZE_OUTCOMES,
            f"{FREEZE_OUTCOMES} outcomes while {victim.name} is frozen",
        )
        victim.signal(signal.SIGCONT)
        self._note(f"  SIGCONT {victim.name} after {time.monotonic() - frozen_at:.2f}s frozen")
        self._wait(lambda: victim.name in live_workers(self.mesh), f"{victim.name} to re-register")
        self._note(f"  {victim.name} registered again")

    def kill_broker(self) -> None:
        old = self.mesh.broker
        assert old is not None
        queues = [(q["pending"], q["running"]) for q in self._status()["queues"]]
        old.kill()
        self.kills["broker SIGKILL"] += 1
        self._note(f"SIGKILL the broker (pending, running: {queues}), restart it")
        restarted_at = time.monotonic()
        self.mesh.start_broker()  # same address, same journal file
        self.kills["broker restart"] += 1
        self._wait(
            lambda: live_workers(self.mesh) == self.roster,
            f"{sorted(self.roster)} to register with the new broker",
        )
        self._note(
            f"  {len(self.roster)} workers back {time.monotonic() - restarted_at:.2f}s later"
        )

    # -------------------------------------------------------------- helpers

    def _note(self, text: str) -> None:
        self.log.append(f"[{time.monotonic() - self._t0:6.2f}s, {self.progress()} outcomes] {text}")

    def _status(self) -> dict[str, Any]:
        try:
            return self.mesh.status()
        except Exception:
            return {"workers": [], "queues": [], "workers_alive": -1}

    def _busy(self, name: str) -> int | str:
        for w in self._status()["workers"]:
            if w["name"] == name:
                return int(w["busy"])
        return "?"

    def _wait(self, predicate: Callable[[], bool], what: str) -> None:
        timeout = min(STEP_WAIT_S, self.deadline - time.monotonic())
        wait_until(
            lambda: self.abort.is_set() or _quietly(predicate), max(timeout, 0.0), what, every=0.02
        )
        if self.abort.is_set():
            raise RuntimeError(f"aborted while waiting for {what}")


def _quietly(predicate: Callable[[], bool]) -> bool:
    """A predicate that asks the broker is simply false while no broker answers."""
    try:
        return predicate()
    except Exception:
        return False


# ------------------------------------------------------------------ the test


@pytest.mark.timeout(300)
def test_chaos_run_loses_no_task_and_resolves_each_future_once(
    chaos_mesh: Callable[..., Mesh], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    journal = tmp_path / "journal.db"
    side_file = tmp_path / "runs.txt"
    mesh = chaos_mesh(
        workers=WORKERS,
        concurrency=CONCURRENCY,
        heartbeat_interval_s=HEARTBEAT_S,
        heartbeat_liveness=LIVENESS,
        journal=str(journal),
    )
    started = time.monotonic()
    deadline = started + RUN_BUDGET_S
    tally = Tally(expected)
    # default options: the client adopts the broker's heartbeat from its Welcome
    client = CountingClient(mesh.url)
    chaos = Chaos(mesh, tally.count, deadline)
    try:
        futures = []
        for index in range(N_TASKS):
            future = client.submit(
                chaos_task, index, task_length_s(index), str(side_file), _max_attempts=MAX_ATTEMPTS
            )
            tally.watch(index, future)
            futures.append(future)
        submitted_s = time.monotonic() - started
        chaos.start()
        try:
            wait_until(
                lambda: tally.count() == N_TASKS or chaos.error is not None,
                RUN_BUDGET_S - (time.monotonic() - started),
                f"all {N_TASKS} outcomes",
            )
        except TimeoutError:
            pass  # reported below as lost tasks
        all_in_s = time.monotonic() - started
        chaos.join(timeout=max(1.0, deadline - time.monotonic()))
        # a round trip after the last outcome: whatever the broker sent before it is here now
        barrier = client.submit(chaos_task, -1, 0.0, str(tmp_path / "barrier.txt"))
        try:
            barrier_ok = repr(barrier.result(timeout=STEP_WAIT_S) == expected(-1))
        except Exception as exc:
            barrier_ok = repr(exc)
    finally:
        chaos.abort.set()
        chaos.join(timeout=STEP_WAIT_S)
        client.close()
    final = _final_status(mesh)
    counters, queues = final.get("counters"), final.get("queues")
    elapsed_s = time.monotonic() - started

    began, ended = read_runs(side_file)
    with tally.lock:
        calls = dict(tally.calls)
        wrong = dict(tally.wrong)
    lost = [i for i in range(N_TASKS) if calls.get(i, 0) == 0]
    twice = [i for i, n in calls.items() if n > 1]
    by_id = {f.task_id: i for i, f in enumerate(futures)}
    wire_repeats = {by_id[t]: n for t, n in client.wire.items() if t in by_id and n > 1}
    never_ended = [i for i in range(N_TASKS) if ended[i] == 0]
    ran_twice = sorted(i for i in range(N_TASKS) if ended[i] > 1)
    began_twice = sorted(i for i in range(N_TASKS) if began[i] > 1)

    report = [
        "",
        "=== taskmesh chaos run ===",
        f"tasks submitted               {N_TASKS} (in {submitted_s:.2f}s)",
        f"outcomes received             {len(calls)} (all in after {all_in_s:.2f}s)",
        f"  with the right value        {sum(1 for i in calls if i not in wrong)}",
        f"  wrong value or error        {len(wrong)} {_sample(wrong)}",
        f"lost (never resolved)         {len(lost)} {_sample(lost)}",
        f"outcomes delivered twice      {len(twice)} (a future resolved again) {_sample(twice)}",
        f"  repeats on the wire         {sum(n - 1 for n in wire_repeats.values())} on "
        f"{len(wire_repeats)} tasks, dropped by the client; conflicting: {len(client.conflicts)}",
        f"  client resyncs              {client.resyncs}",
        f"runs begun / completed        {sum(began.values())} / {sum(ended.values())}",
        f"tasks executed more than once {len(ran_twice)} {_sample(ran_twice)}",
        f"  begun more than once        {len(began_twice)}",
        f"tasks never completed         {len(never_ended)} {_sample(never_ended)}",
        "faults injected               "
        + ", ".join(f"{kind}: {n}" for kind, n in sorted(chaos.kills.items())),
        f"last broker's counters        {counters}",
        f"last broker's queues          {queues}",
        f"chaos error                   {chaos.error!r}",
        f"barrier task after the run    right value: {barrier_ok}",
        f"wall time                     {elapsed_s:.2f}s",
        f"taskmesh under test           {Path(taskmesh.__file__).parent}",
        "chaos log:",
        *(f"  {line}" for line in chaos.log),
    ]
    with capsys.disabled():  # shown on success too, not only in a failure report
        print("\n".join(report), flush=True)

    assert chaos.error is None, f"the chaos script failed: {chaos.error!r}"
    assert chaos.kills == {
        "worker SIGKILL": 2,
        "replacement worker started": 2,
        "worker SIGSTOP": 1,
        "broker SIGKILL": 2,
        "broker restart": 2,
    }
    assert not lost, f"{len(lost)} tasks never resolved: {_sample(lost)}"
    assert not wrong, f"{len(wrong)} futures resolved wrongly: {_sample(wrong)}"
    assert not twice, f"{len(twice)} futures resolved more than once: {_sample(twice)}"
    assert all(calls[i] == 1 for i in range(N_TASKS))
    assert not client.conflicts, f"repeated outcomes that disagree: {client.conflicts[:10]}"
    assert not never_ended, f"{len(never_ended)} tasks never ran to the end: {_sample(never_ended)}"
    # nothing left behind that the broker would still run
    assert queues and all(q["pending"] == 0 and q["running"] == 0 for q in queues), queues


def _final_status(mesh: Mesh) -> dict[str, Any]:
    try:
        return mesh.status()
    except Exception as exc:
        return {"counters": f"status failed: {exc!r}", "queues": None}


def _sample(items: Any, n: int = 10) -> str:
    if not items:
        return ""
    if isinstance(items, dict):
        return repr(dict(list(items.items())[:n]))
    return repr(list(items)[:n])
