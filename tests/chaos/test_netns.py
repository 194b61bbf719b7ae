"""A network partition on a real (virtual) network: hosts are Linux network namespaces.

``workers/netns.py`` builds a private segment of 4 hosts (``10.213.0.1``-``.4``, reachable from
nowhere else: see its docstring): the broker on h1 binds its own address with ``--insecure``,
worker nodes run on h2 and h3 (2 executors each, heartbeat 0.25 s, dead after 3 missed), and the
producer runs on h4. The producer is this very file run as a script inside h4 (``ip netns exec``)
in a subprocess: the pytest process stays in the root namespace, which has no link to the test
network, and the producer writes what its futures saw to a JSON report.

1,000 tasks (most 15 ms, one in twenty 50-100 ms; a fixed mix) go out. Once 250 runs have ended,
h3's cable is pulled (its switch port goes down: packets vanish, nobody gets a reset) and stays
out until ``taskmesh status`` no longer lists worker-h3 and h2 has ended 150 more runs, so that
h3's requeued tasks run again on h2 while h3 still finishes its own copies. Then the cable goes
back, and worker-h3 must register again. Every step waits on an observation, under a deadline.

Every run of a task appends ``begin``/``end`` lines (index, pid, network namespace inode) to a
side file. What must hold: every future resolves exactly once with the right value, every task
ran to the end at least once, the broker lost the worker, and nothing is left queued. Runs of a
task beyond the first (at-least-once delivery) are counted and printed, not failed.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import secrets
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _outcomes import CountingClient, Tally

from taskmesh.testing import wait_until

ROOT = Path(__file__).resolve().parents[2]

N_TASKS = 1_000
HOSTS = 4  # h1 broker, h2 and h3 workers, h4 producer
CONCURRENCY = 2
HEARTBEAT_S = 0.25
LIVENESS = 3  # a silent peer is dead after 0.75 s
MAX_ATTEMPTS = 10  # runs lost to dead workers before WorkerLost: out of reach here
CUT_AFTER_RUNS = 250  # pull h3's cable once this many runs have ended
HOLD_RUNS = 150  # runs h2 ends after h3 is declared dead, before the cable goes back
RUN_BUDGET_S = 45.0  # from starting the producer to its report
STEP_WAIT_S = 15.0  # one step: workers to register, a worker to be declared dead, ...
WORKERS = ("worker-h2", "worker-h3")


def _why_not() -> str | None:
    if not sys.platform.startswith("linux"):
        return "needs Linux network namespaces"
    if os.geteuid() != 0:
        return "needs root for `ip netns` (run the chaos suite as root)"
    if shutil.which("ip") is None:
        return "needs iproute2's `ip` for network namespaces"
    return None


pytestmark = [
    pytest.mark.chaos,
    pytest.mark.skipif(_why_not() is not None, reason=str(_why_not())),
]


def _load_netns() -> Any:
    """``workers/netns.py`` is a script, not a package: load it by path."""
    name = "taskmesh_workers_netns"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "workers" / "netns.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------ the workload


def task_length_s(index: int) -> float:
    """A fixed mix: one task in twenty takes 50-100 ms, the others 15 ms."""
    if index % 20 == 7:
        return (50 + index * 37 % 51) / 1000
    return 0.015


def expected(index: int) -> tuple[int, int]:
    return index, index * index


def netns_task(index: int, length_s: float, side_file: str) -> tuple[int, int]:
    """Record the run (and the network namespace it ran in), sleep ``length_s``, answer."""
    where = os.readlink("/proc/self/ns/net")[5:-1]  # "net:[4026532177]"
    fd = os.open(side_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"begin {index} {os.getpid()} {where}\n".encode())
        time.sleep(length_s)
        os.write(fd, f"end {index} {os.getpid()} {where}\n".encode())
    finally:
        os.close(fd)
    return index, index * index


def read_runs(side_file: Path) -> list[tuple[str, int, int]]:
    """``(kind, index, netns inode)`` of every complete line of the side file."""
    runs: list[tuple[str, int, int]] = []
    try:
        text = side_file.read_text()
    except FileNotFoundError:
        return runs
    for line in text.splitlines(keepends=True):
        if line.endswith("\n"):
            kind, index, _pid, where = line.split()
            runs.append((kind, int(index), int(where)))
    return runs


def runs_ended(side_file: Path) -> int:
    return sum(1 for kind, _, _ in read_runs(side_file) if kind == "end")


# ------------------------------------------------------------------ the producer (inside h4)


def produce(argv: list[str]) -> int:
    """Submit the tasks, wait for every outcome (bounded), write a JSON report."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--broker", required=True)
    parser.add_argument("--tasks", type=int, required=True)
    parser.add_argument("--side-file", required=True)
    parser.add_argument("--report", required=True)
    parser.add_argument("--budget", type=float, required=True)
    args = parser.parse_args(argv)
    started = time.monotonic()
    tally = Tally(expected)
    client = CountingClient(args.broker)
    futures = []
    try:
        for index in range(args.tasks):
            future = client.submit(
                netns_task,
                index,
                task_length_s(index),
                args.side_file,
                _max_attempts=MAX_ATTEMPTS,
            )
            tally.watch(index, future)
            futures.append(future)
        submitted_s = time.monotonic() - started
        print(f"producer: {args.tasks} tasks submitted in {submitted_s:.2f}s", flush=True)
        try:
            wait_until(
                lambda: tally.count() == args.tasks,
                args.budget - (time.monotonic() - started),
                f"all {args.tasks} outcomes",
            )
        except TimeoutError as exc:
            print(f"producer: {exc}", flush=True)  # the report shows which are missing
        all_in_s = time.monotonic() - started
        # a round trip after the last outcome: whatever the broker sent before it is here now
        barrier = client.submit(netns_task, -1, 0.0, args.side_file + ".barrier")
        try:
            barrier_ok = repr(barrier.result(timeout=STEP_WAIT_S) == expected(-1))
        except Exception as exc:
            barrier_ok = repr(exc)
    finally:
        client.close()
    by_id = {f.task_id: i for i, f in enumerate(futures)}
    with tally.lock:
        report = {
            "submitted_s": submitted_s,
            "all_in_s": all_in_s,
            "calls": {str(i): n for i, n in tally.calls.items()},
            "wrong": {str(i): why for i, why in tally.wrong.items()},
            "wire_repeats": {
                str(by_id[t]): n for t, n in client.wire.items() if t in by_id and n > 1
            },
            "conflicts": [by_id.get(t, t) for t in client.conflicts],
            "barrier": barrier_ok,
        }
    tmp = Path(args.report + ".tmp")
    tmp.write_text(json.dumps(report))
    tmp.replace(args.report)
    print(f"producer: all in after {all_in_s:.2f}s, report written", flush=True)
    return 0


# ------------------------------------------------------------------ the test


@pytest.fixture
def testbed(tmp_path: Path) -> Iterator[Any]:
    """A fresh 4-host test bed, always torn down: processes by pgid, links, namespaces."""
    netns = _load_netns()
    reason = netns.probe()
    if reason is not None:
        pytest.skip(reason)
    prefix = f"tmt{os.getpid()}-{secrets.token_hex(3)}"  # unique per run: parallel runs coexist
    bed = netns.Testbed(prefix, state_dir=tmp_path / "netns")
    try:
        bed.up(HOSTS)
        yield bed
    finally:
        problems = bed.down()
        left = [n for n in netns.netns_list() if n.startswith(f"{prefix}-")]
        assert not problems and not left, f"teardown left {problems} {left}"


def live_workers(bed: Any) -> set[str] | None:
    """Worker names the broker lists, via ``taskmesh status --json`` run on h1; None if no
    answer."""
    try:
        return {w["name"] for w in bed.status(timeout=2.0)["workers"]}
    except Exception:
        return None


@pytest.mark.timeout(180)
def test_partitioned_worker_host_loses_no_task(
    testbed: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bed = testbed
    side_file = tmp_path / "runs.txt"
    report_file = tmp_path / "producer.json"
    log: list[str] = []
    t0 = time.monotonic()

    def note(text: str) -> None:
        log.append(f"[{time.monotonic() - t0:6.2f}s, {runs_ended(side_file)} runs ended] {text}")

    def step(predicate: Callable[[], bool], what: str, timeout: float = STEP_WAIT_S) -> None:
        wait_until(predicate, max(0.0, timeout), what, every=0.05)

    try:
        hb = {"heartbeat_interval": HEARTBEAT_S, "heartbeat_liveness": LIVENESS}
        url = bed.start_broker(1, **hb)
        for host, name in ((2, WORKERS[0]), (3, WORKERS[1])):
            bed.start_worker(host, name=name, concurrency=CONCURRENCY, **hb)
        step(lambda: live_workers(bed) == set(WORKERS), f"{WORKERS} to register at {url}")
        note(f"broker {url} on h1, {WORKERS} registered from h2 and h3")

        started = time.monotonic()
        deadline = started + RUN_BUDGET_S
        producer_argv = [sys.executable, str(Path(__file__).resolve())]
        producer_argv += ["--broker", url, "--tasks", str(N_TASKS), "--side-file", str(side_file)]
        producer_argv += ["--report", str(report_file), "--budget", str(RUN_BUDGET_S - 5.0)]
        bed.popen(4, producer_argv, "producer")

        step(
            lambda: runs_ended(side_file) >= CUT_AFTER_RUNS or not bed.alive("producer"),
            f"{CUT_AFTER_RUNS} runs to end",
        )
        assert bed.alive("producer"), "the producer finished before the cut: make tasks longer"
        busy = {w["name"]: w["busy"] for w in bed.status()["workers"]}
        bed.cut(3)
        cut_at = time.monotonic()
        note(f"cable of h3 pulled (busy per worker: {busy})")
        step(lambda: WORKERS[1] not in (live_workers(bed) or {WORKERS[1]}), "h3 declared dead")
        declared = runs_ended(side_file)
        note(f"  taskmesh status no longer lists {WORKERS[1]} ({time.monotonic() - cut_at:.2f}s)")
        step(
            lambda: runs_ended(side_file) >= declared + HOLD_RUNS or not bed.alive("producer"),
            f"{HOLD_RUNS} runs while h3 is out",
        )
        bed.restore(3)
        note(f"  cable of h3 back after {time.monotonic() - cut_at:.2f}s")
        step(lambda: WORKERS[1] in (live_workers(bed) or set()), "h3 to register again")
        note(f"  {WORKERS[1]} registered again ({time.monotonic() - cut_at:.2f}s after the cut)")

        step(
            lambda: not bed.alive("producer"),
            "the producer to report",
            timeout=deadline - time.monotonic(),
        )
        run_s = time.monotonic() - started
        note(f"producer exited with {bed.returncode('producer')} after {run_s:.2f}s")
        assert bed.returncode("producer") == 0, "the producer failed: see its log"
        report = json.loads(report_file.read_text())
        final = bed.status()
        check(bed, report, final, side_file, run_s, log, capsys)
    except BaseException:
        # shown under "Captured stderr" when the test fails: the test bed is gone after teardown
        print(f"=== process logs ({bed.workdir})\n{bed.log_tails()}", file=sys.stderr)
        raise


def check(
    bed: Any,
    report: dict[str, Any],
    final: dict[str, Any],
    side_file: Path,
    run_s: float,
    log: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = {int(i): n for i, n in report["calls"].items()}
    wrong = {int(i): why for i, why in report["wrong"].items()}
    lost = [i for i in range(N_TASKS) if calls.get(i, 0) == 0]
    twice = [i for i, n in calls.items() if n > 1]
    runs = read_runs(side_file)
    ended = collections.Counter(i for kind, i, _ in runs if kind == "end")
    began = collections.Counter(i for kind, i, _ in runs if kind == "begin")
    hosts = {inode: ns.rsplit("-", 1)[1] for ns, inode in bed.inodes.items()}
    by_host = collections.Counter(hosts.get(w, str(w)) for kind, _, w in runs if kind == "end")
    never_ended = [i for i in range(N_TASKS) if ended[i] == 0]
    ran_twice = sorted(i for i in range(N_TASKS) if ended[i] > 1)
    began_twice = sorted(i for i in range(N_TASKS) if began[i] > 1)
    wire = report["wire_repeats"]
    counters, queues = final.get("counters", {}), final.get("queues")

    lines = [
        "",
        "=== taskmesh network partition run (netns) ===",
        f"tasks submitted               {N_TASKS} (in {report['submitted_s']:.2f}s)",
        f"outcomes received             {len(calls)} (all in after {report['all_in_s']:.2f}s)",
        f"  wrong value or error        {len(wrong)} {_sample(wrong)}",
        f"lost (never resolved)         {len(lost)} {_sample(lost)}",
        f"futures resolved twice        {len(twice)} {_sample(twice)}",
        f"  repeats on the wire         {sum(n - 1 for n in wire.values())} on {len(wire)} "
        f"tasks, dropped by the client; conflicting: {len(report['conflicts'])}",
        f"runs begun / completed        {sum(began.values())} / {sum(ended.values())}"
        f" (completed per host: {dict(sorted(by_host.items()))})",
        f"tasks run more than once      {len(ran_twice)} {_sample(ran_twice)}",
        f"  begun more than once        {len(began_twice)}",
        f"tasks never completed         {len(never_ended)} {_sample(never_ended)}",
        f"broker counters               {counters}",
        f"broker queues                 {queues}",
        f"barrier task after the run    right value: {report['barrier']}",
        f"producer run time             {run_s:.2f}s",
        "log:",
        *(f"  {line}" for line in log),
    ]
    with capsys.disabled():  # shown on success too
        print("\n".join(lines), flush=True)

    assert not lost, f"{len(lost)} tasks never resolved: {_sample(lost)}"
    assert not wrong, f"{len(wrong)} futures resolved wrongly: {_sample(wrong)}"
    assert not twice, f"{len(twice)} futures resolved more than once: {_sample(twice)}"
    assert all(calls[i] == 1 for i in range(N_TASKS))
    assert not report["conflicts"], f"repeated outcomes disagree: {report['conflicts'][:10]}"
    assert not never_ended, f"{len(never_ended)} tasks never ran to the end: {_sample(never_ended)}"
    assert report["barrier"] == "True", report["barrier"]
    assert counters.get("workers_lost", 0) >= 1, f"the broker never lost worker-h3: {counters}"
    assert queues and all(q["pending"] == 0 and q["running"] == 0 for q in queues), queues
    assert {w["name"] for w in final["workers"]} == set(WORKERS), final["workers"]


def _sample(items: Any, n: int = 10) -> str:
    if not items:
        return ""
    if isinstance(items, dict):
        return repr(dict(list(items.items())[:n]))
    return repr(list(items)[:n])


if __name__ == "__main__":  # the producer, run inside host h4 by the test above
    sys.exit(produce(sys.argv[1:]))
