"""``taskmesh bench`` end to end, small: every figure comes with its baseline, and nothing the
bench starts outlives it. Speed itself is never asserted here (see docs/performance.md)."""

from __future__ import annotations

import multiprocessing

import pytest

from taskmesh.bench import BareRelay, BenchConfig, run_bench

pytestmark = pytest.mark.timeout(120)


def test_bench_reports_every_figure_beside_a_baseline_and_leaves_no_process() -> None:
    config = BenchConfig(
        workloads=("throughput", "latency", "payload"),
        tasks=300,
        repeat=1,
        latency_samples=50,
        payload_mb=2,
    )
    report = run_bench(config, progress=lambda _: None)
    figures = {(f["workload"], f["metric"]): f for f in report["figures"]}
    assert set(figures) == {
        ("throughput", "300 no-op tasks"),
        ("latency", "bare broker relay p50"),
        ("latency", "bare relay p50"),
        ("latency", "round trip p50"),
        ("latency", "round trip p99"),
        ("payload", "2 MB argument and result"),
        ("payload", "2 MB through a bare broker relay"),
    }
    for figure in figures.values():
        assert figure["taskmesh"] > 0 and figure["baseline"] > 0 and figure["ratio"] > 0
    assert 0 < report["startup_to_first_result_s"] < 60
    assert multiprocessing.active_children() == []


def test_the_bare_relay_answers_every_call_with_its_own_value() -> None:
    with BareRelay() as relay:
        futures = [relay.submit(i) for i in range(200)]
        assert [f.result(timeout=10) for f in futures] == list(range(200))
    assert multiprocessing.active_children() == []


def test_the_bare_broker_relay_answers_from_the_calling_thread() -> None:
    data = bytes(range(256)) * 4096
    with BareRelay(executor=False, io_thread=False) as relay:
        assert [relay.submit(i).result(timeout=0) for i in range(100)] == list(range(100))
        assert bytes(relay.echo(data)) == data
    with BareRelay() as relay, pytest.raises(RuntimeError, match="without an I/O thread"):
        relay.echo(b"x")
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("workloads", [("bogus",), ()])
def test_an_unknown_or_missing_workload_is_refused_before_anything_starts(
    workloads: tuple[str, ...],
) -> None:
    with pytest.raises(ValueError, match="choose from throughput, latency"):
        BenchConfig(workloads=workloads)
    assert multiprocessing.active_children() == []
