"""The broker's latency histogram: bucket placement and percentiles."""

from __future__ import annotations

from taskmesh.histogram import BOUNDS, Histogram


def test_empty_histogram_has_no_percentiles() -> None:
    h = Histogram()
    assert h.percentile(0.5) is None
    assert h.summary() == {"count": 0, "p50_s": None, "p95_s": None, "p99_s": None}


def test_percentiles_are_bucket_upper_bounds() -> None:
    h = Histogram()
    for _ in range(90):
        h.observe(0.0007)  # in the (0.0005, 0.001] bucket
    for _ in range(9):
        h.observe(0.02)  # (0.01, 0.025]
    h.observe(100.0)  # (60, 300]
    assert h.total == 100
    assert h.percentile(0.5) == 0.001
    assert h.percentile(0.95) == 0.025
    assert h.percentile(1.0) == 300.0
    assert abs(h.sum - (90 * 0.0007 + 9 * 0.02 + 100.0)) < 1e-9


def test_values_past_the_last_bound_land_in_the_infinite_bucket() -> None:
    h = Histogram()
    h.observe(BOUNDS[-1] * 10)
    assert h.counts[-1] == 1
    assert h.percentile(0.5) == float("inf")
