"""Prometheus metrics for the broker (``taskmesh broker --metrics-port PORT``).

The broker loop publishes one frozen view of its state per heartbeat tick; the HTTP thread of
prometheus-client only ever reads the latest published view, so a scrape never touches the
scheduler's live structures (and costs the hot path nothing). Metric names are listed in
``docs/metrics.md``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from taskmesh.histogram import BOUNDS, Histogram

#: broker counter -> (metric name, help)
COUNTERS = {
    "submitted": ("taskmesh_tasks_submitted_total", "Tasks accepted from producers."),
    "done": ("taskmesh_tasks_done_total", "Tasks that finished with a result."),
    "failed": ("taskmesh_tasks_failed_total", "Tasks that failed for good."),
    "cancelled": ("taskmesh_tasks_cancelled_total", "Tasks cancelled."),
    "requeued": ("taskmesh_tasks_requeued_total", "Runs lost to dead workers or executors."),
    "retried": ("taskmesh_tasks_retried_total", "Re-runs after a task raised."),
    "workers_lost": ("taskmesh_workers_lost_total", "Workers declared dead."),
    "duplicates_dropped": (
        "taskmesh_duplicate_outcomes_dropped_total",
        "Late or repeated outcomes dropped (first outcome wins).",
    ),
}


@dataclass(frozen=True)
class MetricsView:
    """What one scrape reports: a status snapshot and copies of the histograms."""

    snapshot: dict[str, Any]
    histograms: dict[str, Histogram] = field(default_factory=dict)


def _copy(h: Histogram) -> Histogram:
    out = Histogram()
    out.counts = list(h.counts)
    out.total = h.total
    out.sum = h.sum
    return out


class BrokerCollector:
    """A prometheus-client collector over the latest published ``MetricsView``."""

    def __init__(self) -> None:
        self._view: MetricsView | None = None
        self._lock = threading.Lock()

    def publish(self, snapshot: dict[str, Any], histograms: dict[str, Histogram]) -> None:
        view = MetricsView(snapshot, {name: _copy(h) for name, h in histograms.items()})
        with self._lock:
            self._view = view

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            view = self._view
        if view is None:
            return
        snap = view.snapshot
        counters = snap.get("counters", {})
        for key, (name, text) in COUNTERS.items():
            family = CounterMetricFamily(name, text)
            family.add_metric([], float(counters.get(key, 0)))
            yield family
        by_queue = CounterMetricFamily(
            "taskmesh_queue_tasks_finished_total",
            "Finished tasks by queue and result.",
            labels=["queue", "result"],
        )
        depth = GaugeMetricFamily(
            "taskmesh_queue_tasks", "Tasks in a queue by state.", labels=["queue", "state"]
        )
        submitted = CounterMetricFamily(
            "taskmesh_queue_tasks_submitted_total", "Tasks submitted by queue.", labels=["queue"]
        )
        requeued = CounterMetricFamily(
            "taskmesh_queue_tasks_requeued_total",
            "Runs requeued after a worker or executor was lost, by queue.",
            labels=["queue"],
        )
        for q in snap.get("queues", []):
            by_queue.add_metric([q["name"], "done"], float(q["done"]))
            by_queue.add_metric([q["name"], "failed"], float(q["failed"]))
            submitted.add_metric([q["name"]], float(q.get("submitted", 0)))
            requeued.add_metric([q["name"]], float(q.get("requeued", 0)))
            for state in ("pending", "delayed", "running"):
                depth.add_metric([q["name"], state], float(q.get(state, 0)))
        yield by_queue
        yield submitted
        yield requeued
        yield depth
        alive = GaugeMetricFamily("taskmesh_workers_alive", "Workers registered and alive.")
        alive.add_metric([], float(snap.get("workers_alive", 0)))
        yield alive
        slots = GaugeMetricFamily(
            "taskmesh_worker_slots", "Executor slots by worker and use.", labels=["worker", "use"]
        )
        for w in snap.get("workers", []):
            slots.add_metric([w["name"], "busy"], float(w["busy"]))
            slots.add_metric([w["name"], "total"], float(w["concurrency"]))
        yield slots
        broker = snap.get("broker", {})
        if "uptime_s" in broker:
            uptime = GaugeMetricFamily("taskmesh_broker_uptime_seconds", "Broker uptime.")
            uptime.add_metric([], float(broker["uptime_s"]))
            yield uptime
        for name, h in view.histograms.items():
            yield _histogram(name, h)


_HISTOGRAM_HELP = {
    "queue_wait": ("taskmesh_task_queue_wait_seconds", "From queued to dispatched."),
    "run": ("taskmesh_task_run_seconds", "Task run time measured by the executor."),
    "journal_commit": ("taskmesh_journal_commit_seconds", "Journal transaction time."),
}


def _histogram(name: str, h: Histogram) -> HistogramMetricFamily:
    metric, text = _HISTOGRAM_HELP.get(name, (f"taskmesh_{name}_seconds", name))
    buckets = []
    running = 0
    for bound, count in zip(BOUNDS, h.counts, strict=False):
        running += count
        buckets.append((repr(bound), float(running)))
    buckets.append(("+Inf", float(h.total)))
    family = HistogramMetricFamily(metric, text)
    family.add_metric([], buckets, sum_value=h.sum)
    return family


def serve(collector: BrokerCollector, port: int, host: str = "127.0.0.1") -> Callable[[], None]:
    """Serve ``/metrics`` on a daemon thread; returns what stops it (a broker embedded in a
    longer-lived process must not leave its port behind)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)

    return stop
