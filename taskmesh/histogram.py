"""A latency histogram cheap enough for the broker's hot path: fixed buckets, one bisect per
observation, percentiles from the buckets. The same buckets are exported to Prometheus."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

#: upper bounds in seconds, 50 us to 5 min, roughly x2.5 apart (Prometheus-style "le" bounds)
BOUNDS: tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
)  # fmt: skip


class Histogram:
    __slots__ = ("counts", "sum", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(BOUNDS) + 1)  # the last bucket is +Inf
        self.total = 0
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        self.counts[bisect_left(BOUNDS, seconds)] += 1
        self.total += 1
        self.sum += seconds

    def percentile(self, q: float) -> float | None:
        """The upper bound of the bucket holding the q-th quantile (None when empty)."""
        if not self.total:
            return None
        rank = q * self.total
        seen = 0
        for i, count in enumerate(self.counts):
            seen += count
            if seen >= rank and count:
                return BOUNDS[i] if i < len(BOUNDS) else float("inf")
        return float("inf")

    def summary(self) -> dict[str, Any]:
        """p50/p95/p99 for status snapshots (plain data)."""
        return {
            "count": self.total,
            "p50_s": self.percentile(0.50),
            "p95_s": self.percentile(0.95),
            "p99_s": self.percentile(0.99),
        }
