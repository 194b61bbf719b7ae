"""Worker nodes that die (SIGKILL) or freeze (SIGSTOP) mid-task, each on a fresh mesh with a short
heartbeat: their tasks finish on the other worker, and the producer sees one outcome per task.

Each test starts one worker A, lets it take gated tasks (they block until the test releases the
gate), adds worker B, and only then kills or freezes A: so which tasks A held is known, not
guessed.
"""

from __future__ import annotations

import signal
import time

import _tasks
import pytest

from taskmesh.testing import ManagedProcess, Mesh, group_members, wait_until

pytestmark = pytest.mark.timeout(90)

HEARTBEAT = {"heartbeat_interval_s": 0.2, "heartbeat_liveness": 3}  # dead after 0.6 s
WAIT_S = 30.0


def live_worker_names(mesh: Mesh) -> set[str]:
    return {w["name"] for w in mesh.status()["workers"]}


def stopped(proc: ManagedProcess) -> bool:
    """Whether every process in the group (supervisor, forkserver, executors) is stopped."""
    members = group_members(proc.pid)
    return bool(members) and all(state in "tT" for _, state in members)


def count_resolutions(futures: list) -> dict[str, int]:
    calls: dict[str, int] = {f.task_id: 0 for f in futures}

    def seen(future) -> None:
        calls[future.task_id] += 1

    for f in futures:
        f.add_done_callback(seen)
    return calls


def test_worker_killed_mid_task_its_tasks_finish_on_the_other_worker(
    make_mesh, recording_client, gate
) -> None:
    mesh = make_mesh(workers=1, concurrency=2, **HEARTBEAT)
    a = mesh.workers[0]
    client = recording_client(mesh)
    futures = [_tasks.gated.submit(x, str(gate), _client=client) for x in range(6)]
    resolutions = count_resolutions(futures)
    wait_until(lambda: len(gate.started_on(a.name)) == 2, WAIT_S, "A to start two tasks")
    on_a = gate.started_on(a.name)

    b = mesh.add_worker()
    mesh.wait_for_workers(2)
    wait_until(lambda: len(gate.started_on(b.name)) == 2, WAIT_S, "B to start two tasks")
    assert all(not f.done() for f in futures)

    a.kill()  # SIGKILL to A's whole process group, mid-task
    assert not a.alive()
    wait_until(lambda: live_worker_names(mesh) == {b.name}, WAIT_S, "A to be declared dead")
    gate.release()

    results = [f.result(timeout=WAIT_S) for f in futures]
    assert [value for value, _ in results] == [x * x for x in range(6)]
    assert {worker for _, worker in results} == {b.name}  # A never finished anything
    assert sorted(x for x, w, _ in gate.done() if w == b.name) == list(range(6))
    assert set(on_a) <= set(gate.started_on(b.name))  # A's tasks were rerun on B
    assert not [x for x, w, _ in gate.done() if w == a.name]

    # one outcome per task reached the producer, and each future resolved once
    assert client.outcomes_seen == {f.task_id: 1 for f in futures}
    assert resolutions == {f.task_id: 1 for f in futures}
    snapshot = mesh.status()
    assert snapshot["counters"]["workers_lost"] == 1
    # A held four: the two it ran (charged a loss) and two prefetched, never started there
    # (requeued as they were)
    assert snapshot["counters"]["requeued"] == 4
    assert snapshot["counters"]["done"] == 6
    assert any(
        d["name"] == a.name and d["reason"] == "missed heartbeats" for d in snapshot["dead_workers"]
    )


def test_frozen_worker_is_declared_dead_and_its_late_results_are_dropped(
    make_mesh, recording_client, gate
) -> None:
    mesh = make_mesh(workers=1, concurrency=2, **HEARTBEAT)
    a = mesh.workers[0]
    client = recording_client(mesh)
    futures = [_tasks.gated.submit(x, str(gate), _client=client) for x in range(2)]
    resolutions = count_resolutions(futures)
    wait_until(lambda: len(gate.started_on(a.name)) == 2, WAIT_S, "A to start both tasks")
    b = mesh.add_worker()
    mesh.wait_for_workers(2)

    a.signal(signal.SIGSTOP)
    wait_until(lambda: stopped(a), WAIT_S, "A's process group to stop")
    frozen_at = time.monotonic()
    wait_until(
        lambda: live_worker_names(mesh) == {b.name}, WAIT_S, "A to be declared dead", every=0.02
    )
    declared_after = time.monotonic() - frozen_at
    # dead after interval * liveness = 0.6 s of silence (A may have been silent up to one
    # poll interval before it froze, and the broker checks once per interval)
    assert 0.2 <= declared_after < 3.0, f"declared dead {declared_after:.2f}s after SIGSTOP"

    # its tasks are requeued to B; release the gate only now, while A cannot see it
    wait_until(lambda: sorted(gate.started_on(b.name)) == [0, 1], WAIT_S, "B to rerun A's tasks")
    gate.release()
    results = [f.result(timeout=WAIT_S) for f in futures]
    assert results == [(0, b.name), (1, b.name)]
    counters = mesh.status()["counters"]
    assert counters["workers_lost"] == 1
    assert counters["requeued"] == 2
    assert counters["duplicates_dropped"] == 0

    # A wakes up, finishes its stale runs (at-least-once: the side effect happens twice) ...
    a.signal(signal.SIGCONT)
    wait_until(
        lambda: sorted(x for x, w, _ in gate.done() if w == a.name) == [0, 1],
        WAIT_S,
        "A to finish its stale runs",
    )
    # ... and the broker drops those late outcomes instead of forwarding them
    wait_until(
        lambda: mesh.status()["counters"]["duplicates_dropped"] >= 2,
        WAIT_S,
        "the broker to drop A's late outcomes",
    )
    # A registers again and serves
    wait_until(lambda: live_worker_names(mesh) == {a.name, b.name}, WAIT_S, "A to re-register")

    # a round trip after the drop: anything the broker sent before it has arrived by now
    assert _tasks.square.submit(11, _client=client).result(timeout=WAIT_S) == 121
    assert [f.result(timeout=0) for f in futures] == [(0, b.name), (1, b.name)]
    assert {t: client.outcomes_seen[t] for t in resolutions} == {f.task_id: 1 for f in futures}
    assert resolutions == {f.task_id: 1 for f in futures}
    counters = mesh.status()["counters"]
    assert counters["done"] == 3
    assert counters["failed"] == 0
